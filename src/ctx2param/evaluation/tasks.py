"""The evaluation tasks of ``ctx2param eval``: names, data, splits, metrics, and how their items are built.

Every task turns the offline data of :mod:`ctx2param.evaluation.datasets` into :class:`EvalItem` objects:
a ``query`` (what the model is asked), ``contexts`` (the passages or demonstrations: in the prompt for ICL,
one adapter each for ``adapter``, streamed chunks for ``stream``) and what it is scored against.

=================  =========  =====================================================================
Task               Kind       Items
=================  =========  =====================================================================
``squad-k``        generate   SQuAD v1.1 validation (CC BY-SA 4.0): the gold passage and k−1 distractors
                              from other titles, shuffled (:func:`~.datasets.build_squad_k`); query
                              ``"Question: <q>\\nAnswer:"``; greedy answer scored by EM / F1. k >= 1.
``arc-easy-k``     choice     ARC-Easy test (2376; CC BY-SA 4.0), k demonstrations from validation.
``arc-challenge-k`` choice    ARC-Challenge test (1172), k demonstrations from validation.
``mmlu-k``         choice     MMLU test (14042; MIT), k demonstrations from dev (same subject first).
``boolq``          choice     BoolQ held-out half (CC BY-SA 3.0; :func:`~.datasets.heldout_split` keyed
                              on the passage: the other half is training data); the passage is the one
                              context; choices ``no`` / ``yes``. k is not used (always 1 passage).
``sst2-k``,        choice     Demonstration tasks: the held-out half of each classification set
``rte-k``,                    (:func:`~.datasets.load_classification`, its templates and label words;
``cb-k``,                     the hash split of :func:`~.datasets.heldout_split`, as the training data
``copa-k``,                   uses it) with ONE set of k demonstrations from the train half shared by all
``boolq-k``,                  questions (``demo_set`` j of seed s: the train half shuffled by
``mrpc-k``                    ``seeded_rng("stream-adapter/eval-demos", s + j, task)``, its first k); the
                              questions a seeded shuffle (``"stream-adapter/eval-sample"``) cut to n.
                              Plain-text prompts (the tokenizer's own special tokens, no chat
                              template), contexts joined by blank lines: the protocol of the first
                              StreamAdapter evaluation (``hub_scripts/train_stream_adapter.py`` before
                              it became a recipe), so its numbers compare. k >= 0.
``reconstruction`` reconstruct  BoolQ held-out passages (distinct); the decoder reads each passage back
                              out of its adapter; token accuracy and ROUGE-L. k is not used.
=================  =========  =====================================================================

Sampling is deterministic given the seed: SQuAD-k uses the loaders' own seeded draws; MC questions are a
seeded subsample (:func:`~.datasets.seeded_rng`) of the test split when ``n`` is given (all when ``None``),
demonstrations come from :func:`~.datasets.build_mc_k` (the draw for a smaller k is a prefix of the draw for
a larger one, and the questions are the same for every k). The demonstration tasks draw one demonstration
set per ``demo_set`` (``ctx2param eval --demo-seeds N``: sets 0..N-1, mean ± std); there too a smaller k's
set is a prefix of a larger one's and the questions do not depend on k or the set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .datasets import (
    build_mc_k,
    build_squad_k,
    content_free_example,
    heldout_split,
    load_boolq,
    load_classification,
    load_mc,
    load_squad,
    seeded_rng,
)

__all__ = ["TASKS", "EvalItem", "TaskSpec", "build_items", "get_task"]

Kind = Literal["generate", "choice", "reconstruct"]


@dataclass(frozen=True)
class EvalItem:
    """One evaluated example.

    Attributes:
        id: the data set's id of the question (or passage).
        query: the question part of the prompt (chat templates wrap it as the user's turn).
        contexts: passages or solved demonstrations; empty for zero-shot.
        answers: gold answers (``generate``) or the reference text (``reconstruct``).
        choices: answer options (``choice``), scored as continuations of the prompt.
        label: index of the correct choice (``choice``), else -1.
        subject: MMLU subject / task name, when there is one.
        demo_ids: ids of the demonstrations in ``contexts`` (demonstration tasks), else empty.
    """

    id: str
    query: str
    contexts: tuple[str, ...] = ()
    answers: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    label: int = -1
    subject: str | None = None
    demo_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskSpec:
    """What the runner needs to know of a task.

    Attributes:
        name: the task's name on the command line.
        kind: ``"generate"`` (greedy answer), ``"choice"`` (log-likelihood of choices) or ``"reconstruct"``.
        split: the evaluated split, as recorded in ``results.json``.
        dataset: readable data set name (with its licence).
        metrics: metric ids in ``results.json`` (fractions in [0, 1]); the first is the primary one.
        min_k: the smallest valid k.
        uses_k: False when k means nothing (boolq, reconstruction: one passage per item).
        cut: how an ICL prompt that exceeds the window is cut: ``"shorten"`` (every context shortened
            alike, from its end) or ``"drop"`` (demonstrations dropped from the last one).
        build: ``(k, n, seed) -> items`` (demonstration tasks also take ``demo_set=j``).
        size: number of available evaluation items (``n`` may not exceed it).
        prompt_format: ``"model"`` (the generator's own prompt format, else the tokenizer's chat template,
            else plain text after the start token) or ``"plain"`` (the contexts and the query joined as
            plain text with the tokenizer's own special tokens, for every model and system).
        demo_sets: the items share one demonstration set, drawn anew per ``demo_set``.
        content_free: the task's query with every input replaced by "N/A" (contextual calibration), when
            the task has fixed label words; else None.
    """

    name: str
    kind: Kind
    split: str
    dataset: str
    metrics: tuple[str, ...]
    min_k: int
    uses_k: bool
    cut: Literal["shorten", "drop"]
    build: Callable[..., list[EvalItem]]
    size: Callable[[], int]
    prompt_format: Literal["model", "plain"] = "model"
    demo_sets: bool = False
    content_free: Callable[[], str] | None = None


def _check_n(n: int | None, available: int, task: str) -> int:
    if n is None:
        return available
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int or None, got {type(n).__name__}.")
    if n < 1:
        raise ValueError(f"n must be at least 1 (or omitted for the whole split), got {n}.")
    if n > available:
        raise ValueError(f"n={n} exceeds the {available} examples of {task}; lower n or omit it for all.")
    return n


def _subsample(items: list, n: int | None, task: str, seed: int) -> list:
    count = _check_n(n, len(items), task)
    if count == len(items):
        return list(items)
    order = list(range(len(items)))
    seeded_rng("eval/questions", task, seed).shuffle(order)
    return [items[i] for i in sorted(order[:count])]


def _squad(k: int, n: int | None, seed: int) -> list[EvalItem]:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"squad-k needs k >= 1 (the gold passage is one of the k), got k={k}.")
    squad = load_squad("validation")
    _check_n(n, len(squad), "squad-k")
    return [
        EvalItem(
            id=ex.id,
            query=f"Question: {ex.question}\nAnswer:",
            contexts=ex.passages,
            answers=ex.answers,
            subject=ex.title,
        )
        for ex in build_squad_k(squad, k, n=n, seed=seed)
    ]


def _mc(task: str, pool_split: str) -> Callable[[int, int | None, int], list[EvalItem]]:
    def build(k: int, n: int | None, seed: int) -> list[EvalItem]:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"{task} needs k >= 0 demonstrations, got k={k}.")
        questions = _subsample(load_mc(task, "test"), n, task, seed)
        pool = load_mc(task, pool_split) if k > 0 else []
        return [
            EvalItem(
                id=item.id,
                query=item.prompt(),
                contexts=tuple(item.demonstration_texts()),
                choices=item.choices,
                label=item.label,
                subject=item.subject,
            )
            for item in build_mc_k(questions, pool, k, seed=seed)
        ]

    return build


def _boolq_heldout() -> list:
    return heldout_split(load_boolq("validation"), "heldout")


def _boolq(k: int, n: int | None, seed: int) -> list[EvalItem]:
    examples = _subsample(_boolq_heldout(), n, "boolq", seed)
    return [
        EvalItem(
            id=ex.id,
            query=f"Question: {ex.question.strip().rstrip('?')}?\nAnswer:",
            contexts=(ex.passage,),
            choices=("no", "yes"),
            label=int(ex.answer),
        )
        for ex in examples
    ]


#: The seeded draws of the demonstration tasks, named as the first StreamAdapter evaluation named them (so
#: that the same questions and demonstration sets come out and old and new numbers compare).
DEMO_SAMPLE_RNG = "stream-adapter/eval-sample"
DEMO_SET_RNG = "stream-adapter/eval-demos"


def _demonstration_task(task: str) -> Callable[..., list[EvalItem]]:
    name = f"{task}-k"

    def build(k: int, n: int | None, seed: int, demo_set: int = 0) -> list[EvalItem]:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"{name} needs k >= 0 demonstrations, got k={k}.")
        if isinstance(demo_set, bool) or not isinstance(demo_set, int) or demo_set < 0:
            raise ValueError(f"demo_set must be an integer >= 0, got {demo_set!r}.")
        examples = load_classification(task)
        questions = heldout_split(examples, "heldout")
        seeded_rng(DEMO_SAMPLE_RNG, seed, task).shuffle(questions)
        questions = questions[: _check_n(n, len(questions), name)]
        pool = heldout_split(examples, "train")
        if k > len(pool):
            raise ValueError(f"{name}: k={k} exceeds the {len(pool)} examples of the train half.")
        seeded_rng(DEMO_SET_RNG, seed + demo_set, task).shuffle(pool)
        demos = pool[:k]
        contexts = tuple(d.demonstration() for d in demos)
        return [
            EvalItem(
                id=q.id,
                query=q.prompt(),
                contexts=contexts,
                choices=q.choices,
                label=q.label,
                subject=task,
                demo_ids=tuple(d.id for d in demos),
            )
            for q in questions
        ]

    return build


def _demonstration_spec(task: str, dataset: str) -> TaskSpec:
    content_free = None if task == "copa" else (lambda: content_free_example(task).prompt())
    return TaskSpec(
        f"{task}-k", "choice", "validation (held-out half)", dataset, ("accuracy",), 0, True, "drop",
        _demonstration_task(task), lambda: len(heldout_split(load_classification(task), "heldout")),
        prompt_format="plain", demo_sets=True, content_free=content_free,
    )  # fmt: skip


def _passages() -> list[str]:
    return list(dict.fromkeys(ex.passage for ex in _boolq_heldout()))


def _reconstruction(k: int, n: int | None, seed: int) -> list[EvalItem]:
    passages = _subsample(_passages(), n, "reconstruction", seed)
    return [
        EvalItem(id=f"boolq-passage/{i}", query="", contexts=(p,), answers=(p,))
        for i, p in enumerate(passages)
    ]


TASKS: dict[str, TaskSpec] = {
    "squad-k": TaskSpec(
        "squad-k", "generate", "validation", "SQuAD v1.1 (CC BY-SA 4.0)", ("exact_match", "f1"),
        1, True, "shorten", _squad, lambda: len(load_squad("validation")),
    ),
    "arc-easy-k": TaskSpec(
        "arc-easy-k", "choice", "test", "ARC-Easy (CC BY-SA 4.0)", ("accuracy",),
        0, True, "drop", _mc("arc_easy", "validation"), lambda: len(load_mc("arc_easy", "test")),
    ),
    "arc-challenge-k": TaskSpec(
        "arc-challenge-k", "choice", "test", "ARC-Challenge (CC BY-SA 4.0)", ("accuracy",),
        0, True, "drop", _mc("arc_challenge", "validation"), lambda: len(load_mc("arc_challenge", "test")),
    ),
    "mmlu-k": TaskSpec(
        "mmlu-k", "choice", "test", "MMLU (MIT)", ("accuracy",),
        0, True, "drop", _mc("mmlu", "dev"), lambda: len(load_mc("mmlu", "test")),
    ),
    "boolq": TaskSpec(
        "boolq", "choice", "validation (held-out half)", "BoolQ (CC BY-SA 3.0)", ("accuracy",),
        1, False, "shorten", _boolq, lambda: len(_boolq_heldout()),
    ),
    "reconstruction": TaskSpec(
        "reconstruction", "reconstruct", "BoolQ validation passages (held-out half)",
        "BoolQ passages (CC BY-SA 3.0)", ("token_accuracy", "rouge_l"),
        1, False, "shorten", _reconstruction, lambda: len(_passages()),
    ),
}  # fmt: skip
for _task, _dataset in (
    ("sst2", "SST-2 (GLUE; Stanford Sentiment Treebank terms)"),
    ("rte", "RTE (GLUE; PASCAL RTE terms)"),
    ("cb", "CB (SuperGLUE; CommitmentBank terms)"),
    ("copa", "COPA (SuperGLUE; BSD 2-Clause)"),
    ("boolq", "BoolQ (CC BY-SA 3.0)"),
    ("mrpc", "MRPC (GLUE; Microsoft Research Paraphrase Corpus terms)"),
):
    TASKS[f"{_task}-k"] = _demonstration_spec(_task, _dataset)


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``name`` (``"squad-k"``, ``"arc-easy-k"``, ...); clear error otherwise."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in TASKS:
        raise ValueError(f"Unknown task {name!r}: choose one of {', '.join(TASKS)}.")
    return TASKS[key]


def build_items(
    task: str, k: int, n: int | None = None, seed: int = 0, demo_set: int | None = None
) -> list[EvalItem]:
    """The evaluated items of ``task`` with ``k`` contexts each (deterministic given ``seed``; demonstration
    tasks: demonstration set ``demo_set``, default 0)."""
    spec = get_task(task)
    if demo_set is None:
        return spec.build(k, n, seed)
    if not spec.demo_sets:
        raise ValueError(f"{spec.name} has no demonstration sets: demo_set applies to the <task>-k tasks.")
    return spec.build(k, n, seed, demo_set=demo_set)
