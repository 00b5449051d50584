"""The base model's own data, generated once and cached: self-written questions and teacher responses.

Both steps run the base model greedily over many prompts with the evaluation runner's lean greedy loop
(:func:`ctx2param.evaluation.runner._greedy`: one prefill, one forward a token, stop when every row has
ended), prompts built by :meth:`ctx2param.evaluation.runner.EvalModel.prompt_ids` (the chat template when
the tokenizer has one, contexts joined by a blank line before the query), batched longest first under a
token budget (:func:`ctx2param.evaluation.runner._batches`).

- :func:`self_questions`: the model is asked for ``n`` questions about each passage of a mix; its reply is
  parsed and cleaned (:func:`ctx2param.training.questions.clean_generated_questions`) and the questions are
  added to the mix (source ``self-<passage source>``, no gold answer).
- :func:`teacher_examples` + :func:`teacher_responses`: for each question, ``k`` passages (the gold one and
  ``k - 1`` distractors of other titles, shuffled; ``k`` drawn from weights) and the query
  ``"Question: <q>\\nAnswer:"``, exactly as ``ctx2param eval``'s SQuAD-k builds its ICL prompt; the
  teacher's whole greedy reply (to its end of turn, or ``max_new_tokens``) becomes the example's answer.

Long runs are resumable: every finished batch is appended to a ``*.partial`` file next to the output
(first line: a fingerprint of the inputs and settings); a rerun with the same inputs skips what is there,
and the final files are written atomically, the partial file removed afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..evaluation.datasets import seeded_rng
from ..evaluation.runner import EvalModel, _autocast, _batches, _greedy, _pad
from ..file_utils import sha256_file, write_text_atomically
from .data import TrainingExample
from .mix import Mix, MixError, MixPassage, MixQuestion, card_datasets, write_jsonl
from .questions import clean_generated_questions

__all__ = [
    "GreedyResult",
    "TeacherExample",
    "greedy_replies",
    "self_question_prompt",
    "self_questions",
    "teacher_examples",
    "teacher_prompt_ids",
    "teacher_query",
    "teacher_responses",
]


# ---------------------------------------------------------------------------------------------- greedy


@dataclass(frozen=True)
class GreedyResult:
    """One greedy reply.

    Attributes:
        tokens: the generated token ids before the first end token (the end token itself excluded).
        ended: whether an end token came within ``max_new_tokens`` (False: the reply hit the limit).
    """

    tokens: tuple[int, ...]
    ended: bool


def _default_budget(device: torch.device) -> tuple[int, int]:
    """``(rows, tokens)`` per batch: 1024 rows and 2^20 tokens on CUDA, 16 and 16384 on the CPU."""
    return (1024, 1 << 20) if device.type == "cuda" else (16, 16384)


def _read_partial(path: Path, fingerprint: str) -> dict[str, GreedyResult]:
    """Replies already in ``path`` when its fingerprint matches (a torn last line is ignored)."""
    done: dict[str, GreedyResult] = {}
    if not path.is_file():
        return done
    with path.open("r", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    if not lines:
        return done
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError:
        return done
    if head.get("fingerprint") != fingerprint:
        return done
    for line in lines[1:]:
        try:
            row = json.loads(line)
            done[str(row["key"])] = GreedyResult(tuple(int(t) for t in row["tokens"]), bool(row["ended"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line torn by an interruption
    return done


def greedy_replies(
    model: EvalModel,
    keys: Sequence[str],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int | None = None,
    batch_tokens: int | None = None,
    partial: str | os.PathLike[str] | None = None,
    fingerprint: str = "",
    progress: bool = True,
    desc: str = "generating",
) -> dict[str, GreedyResult]:
    """Greedy replies of ``model.lm`` to ``prompts`` (token ids), batched longest first.

    A batch holds at most ``batch_size`` rows and ``batch_tokens`` = rows x (longest prompt +
    ``max_new_tokens``) tokens (defaults by device, see :func:`_default_budget`). On CUDA the forward runs
    under bf16 autocast, as in evaluation.

    Args:
        model: the base model, its tokenizer and end tokens (:class:`EvalModel`).
        keys: a distinct key per prompt.
        prompts: the prompts, one per key.
        max_new_tokens: most tokens per reply.
        partial: a file that records finished replies (see the module docstring); None keeps nothing.
        fingerprint: identifies the inputs and settings; a ``partial`` file with another one is ignored.
        progress: show a tqdm bar.

    Returns:
        ``{key: GreedyResult}`` for every key.
    """
    if len(keys) != len(prompts):
        raise ValueError(f"Got {len(keys)} keys for {len(prompts)} prompts.")
    if len(set(keys)) != len(keys):
        raise ValueError("Keys are repeated: give every prompt its own key.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    device = model.device
    rows, tokens = _default_budget(device)
    batch_size = batch_size or rows
    batch_tokens = batch_tokens or tokens
    if batch_size < 1 or batch_tokens < 1:
        raise ValueError(f"batch_size and batch_tokens must be positive, got {batch_size}, {batch_tokens}.")
    partial_path = Path(partial) if partial is not None else None
    done = _read_partial(partial_path, fingerprint) if partial_path is not None else {}
    todo = [i for i, key in enumerate(keys) if key not in done]
    results = {key: done[key] for key in keys if key in done}
    if not todo:
        return results
    lengths = [len(prompts[i]) + max_new_tokens for i in todo]
    batches = [[todo[j] for j in batch] for batch in _batches(lengths, batch_size, batch_tokens)]
    handle = None
    if partial_path is not None:
        partial_path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not done
        torn = not fresh and not partial_path.read_bytes().endswith(b"\n")  # stopped mid-line
        handle = partial_path.open("w" if fresh else "a", encoding="utf-8")
        if fresh:
            handle.write(json.dumps({"fingerprint": fingerprint}) + "\n")
        elif torn:
            handle.write("\n")
    stop = set(model.eos_ids)
    from tqdm.auto import tqdm

    try:
        with tqdm(total=len(keys), initial=len(done), desc=desc, disable=not progress, unit="q") as bar:
            for batch in batches:
                ids, mask = _pad([prompts[i] for i in batch], model.pad_id, device, left=True)
                with torch.no_grad(), _autocast(device):
                    generated = _greedy(model.lm, ids, mask, model.pad_id, model.eos_ids, max_new_tokens)
                lines = []
                for i, row in zip(batch, generated, strict=True):
                    end = next((j for j, t in enumerate(row) if t in stop), None)
                    result = GreedyResult(tuple(row[:end] if end is not None else row), end is not None)
                    results[keys[i]] = result
                    lines.append(
                        json.dumps({"key": keys[i], "tokens": list(result.tokens), "ended": result.ended})
                    )
                if handle is not None:
                    handle.write("\n".join(lines) + "\n")
                    handle.flush()
                bar.update(len(batch))
    finally:
        if handle is not None:
            handle.close()
    return results


def _fingerprint(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:32]


def _file_digest(path: str | os.PathLike[str]) -> str:
    return sha256_file(path)[:16]


# ---------------------------------------------------------------------------------------------- questions


def self_question_prompt(n: int) -> str:
    """The instruction that asks the base model for ``n`` questions about the passage before it."""
    words = {1: "one question", 2: "two different questions", 3: "three different questions"}
    what = words.get(n, f"{n} different questions")
    return f"Write {what} about the text above, one per line. Only write the questions."


def self_questions(
    mix: Mix,
    model: EvalModel,
    per_passage: int = 3,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    batch_tokens: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    partial: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Ask the base model for ``per_passage`` questions about each passage and add the usable ones to
    ``mix`` (in place; ids ``<passage>/s<n>``, source ``self-<passage source>``, empty gold).

    Passages that already have self-generated questions are skipped (a rerun adds nothing twice).

    Args:
        mix: the mix (changed in place; save it with :func:`~ctx2param.training.mix.save_mix`).
        model: the base model (:class:`EvalModel`; chat template when the tokenizer has one).
        per_passage: questions asked for (and kept at most) per passage.
        max_new_tokens: reply length (default ``24 * per_passage + 16``).
        limit: ask about at most this many passages (a seeded choice), e.g. to measure on a CPU.
        seed: seed of the ``limit`` choice.
        partial: resume file (see :func:`greedy_replies`).

    Returns:
        A record of the run: settings, passages asked, questions kept, replies that hit the limit, and the
        seconds taken; also stored under ``mix.header["self_questions"]``.
    """
    if isinstance(per_passage, bool) or not isinstance(per_passage, int) or per_passage < 1:
        raise MixError(f"per_passage must be a positive integer, got {per_passage!r}.")
    max_new_tokens = max_new_tokens or 24 * per_passage + 16
    existing = mix.questions_by_passage()
    asked = [p for p in mix.passages if not any(q.source.startswith("self-") for q in existing.get(p.id, []))]
    if limit is not None:
        if limit < 1:
            raise MixError(f"limit must be a positive integer, got {limit}.")
        order = list(range(len(asked)))
        seeded_rng("ctx2param/self-questions/limit", seed).shuffle(order)
        asked = [asked[i] for i in sorted(order[:limit])]
    instruction = self_question_prompt(per_passage)
    start = time.perf_counter()
    prompts = model.prompt_ids([instruction] * len(asked), [[p.text] for p in asked]) if asked else []
    fingerprint = _fingerprint(
        step="questions",
        model=str(model.name),
        passages=[p.id for p in asked],
        n=per_passage,
        mnt=max_new_tokens,
    )
    replies = greedy_replies(
        model, [p.id for p in asked], prompts, max_new_tokens, batch_size, batch_tokens, partial, fingerprint,
        progress, desc="self questions",
    ) if asked else {}  # fmt: skip
    kept = hit_limit = 0
    added: list[MixQuestion] = []
    for passage in asked:
        reply = replies[passage.id]
        hit_limit += not reply.ended
        text = model.tokenizer.decode(list(reply.tokens), skip_special_tokens=True)
        known = [q.question for q in existing.get(passage.id, [])]
        for i, question in enumerate(clean_generated_questions(text, passage.text, per_passage, known)):
            added.append(MixQuestion(f"{passage.id}/s{i}", passage.id, f"self-{passage.source}", question))
            kept += 1
    mix.questions.extend(added)
    record = {
        "model": str(model.name),
        "instruction": instruction,
        "per_passage": per_passage,
        "max_new_tokens": max_new_tokens,
        "passages_asked": len(asked),
        "questions_added": kept,
        "replies_at_token_limit": hit_limit,
        "seconds": round(time.perf_counter() - start, 3),
        "device": str(model.device),
    }
    mix.header.setdefault("self_questions", []).append(record)
    mix.recount()
    return record


# ---------------------------------------------------------------------------------------------- responses


def teacher_query(question: str) -> str:
    """The query of SQuAD-k (``ctx2param eval --task squad-k``): ``"Question: <q>\\nAnswer:"``."""
    return f"Question: {question}\nAnswer:"


@dataclass(frozen=True)
class TeacherExample:
    """A question with the passages the teacher reads.

    Attributes:
        question: the mix question.
        group: the group id (questions of one group share ``contexts``).
        passage_ids: ids of the ``k`` passages in prompt order.
        contexts: their texts, in prompt order.
        gold_index: position of the passage that answers the question.
    """

    question: MixQuestion
    group: str
    passage_ids: tuple[str, ...]
    contexts: tuple[str, ...]
    gold_index: int

    @property
    def k(self) -> int:
        return len(self.contexts)

    @property
    def query(self) -> str:
        return teacher_query(self.question.question)


def teacher_prompt_ids(model: EvalModel, examples: Sequence[TeacherExample]) -> list[list[int]]:
    """The teacher's prompts: ``model.prompt_ids`` of each example's query after its contexts, the prompt
    that ``ctx2param eval`` gives the ``icl`` system on SQuAD-k (one batch, tokenized together)."""
    if not examples:
        return []
    return model.prompt_ids([e.query for e in examples], [list(e.contexts) for e in examples])


def _check_ks(ks: Sequence[int], weights: Sequence[float] | None) -> list[float]:
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise MixError(f"k values must be positive integers, got {list(ks)}.")
    if len(set(ks)) != len(ks):
        raise MixError(f"k values are repeated: {list(ks)}.")
    if weights is None:
        return [1.0] * len(ks)
    if len(weights) != len(ks):
        raise MixError(f"Got {len(weights)} k weights for {len(ks)} k values ({list(ks)}): give one each.")
    if any(w < 0 for w in weights) or not sum(weights) > 0:
        raise MixError(f"k weights must be >= 0 with a positive sum, got {list(weights)}.")
    return [float(w) for w in weights]


def teacher_examples(
    mix: Mix,
    ks: Sequence[int] = (1, 2, 4, 8),
    k_weights: Sequence[float] | None = None,
    seed: int = 0,
    questions_per_example: int = 1,
    part: str = "train",
    usable: Callable[[MixPassage], bool] | None = None,
    limit: int | None = None,
    keep: Callable[[MixQuestion], bool] | None = None,
) -> list[TeacherExample]:
    """The questions of ``mix`` with their ``k`` passages, drawn reproducibly.

    Questions about one passage are shuffled (seeded by the passage) and cut into groups of at most
    ``questions_per_example``; each group draws ``k`` from ``ks`` with ``k_weights``, then ``k - 1``
    distractors uniformly from the other usable passages of the same ``part`` whose title (when they
    have one) differs from the gold passage's, and shuffles the ``k`` passages; every question of a group
    gets the same passages in the same order.

    Args:
        mix: the mix.
        ks: the values of k.
        k_weights: their relative weights (default: equal).
        seed: the seed of every draw; the same inputs and seed give the same examples.
        questions_per_example: most questions sharing one context set.
        part: ``"train"`` (passages not marked dev), ``"dev"`` or ``"all"``.
        usable: a passage filter (e.g. its token count fits the generator's chunk); both gold passages
            and distractors must pass it.
        limit: at most this many questions (whole groups in a seeded order; the last one may be cut).
        keep: a question filter applied before grouping and ``limit`` (e.g. questions with a gold answer).

    Returns:
        Examples group by group.

    Raises:
        MixError: bad settings, or too few distractors for the largest k.
    """
    weights = _check_ks(ks, k_weights)
    if part not in ("train", "dev", "all"):
        raise MixError(f"part must be 'train', 'dev' or 'all', got {part!r}.")
    if (
        isinstance(questions_per_example, bool)
        or not isinstance(questions_per_example, int)
        or (questions_per_example < 1)
    ):
        raise MixError(f"questions_per_example must be a positive integer, got {questions_per_example!r}.")
    if limit is not None and limit < 1:
        raise MixError(f"limit must be a positive integer, got {limit}.")
    pool = [
        p for p in mix.passages
        if (part == "all" or p.dev == (part == "dev")) and (usable is None or usable(p))
    ]  # fmt: skip
    index = {p.id: i for i, p in enumerate(pool)}
    by_passage = mix.questions_by_passage()
    groups: list[tuple[str, MixPassage, list[MixQuestion]]] = []
    for passage in pool:
        questions = [q for q in by_passage.get(passage.id, []) if keep is None or keep(q)]
        if not questions:
            continue
        seeded_rng("ctx2param/teacher/questions", seed, passage.id).shuffle(questions)
        for g in range(0, len(questions), questions_per_example):
            groups.append(
                (
                    f"{passage.id}#{g // questions_per_example}",
                    passage,
                    questions[g : g + questions_per_example],
                )
            )
    if limit is not None:
        order = list(range(len(groups)))
        seeded_rng("ctx2param/teacher/limit", seed).shuffle(order)
        chosen, count = [], 0
        for i in order:
            if count >= limit:
                break
            group_id, passage, questions = groups[i]
            questions = questions[: limit - count]
            chosen.append((i, (group_id, passage, questions)))
            count += len(questions)
        groups = [g for _, g in sorted(chosen, key=lambda item: item[0])]
    out: list[TeacherExample] = []
    for group_id, gold, questions in groups:
        rng = seeded_rng("ctx2param/teacher/group", seed, group_id)
        k = rng.choices(list(ks), weights=weights)[0]
        distractors = _draw_distractors(pool, index[gold.id], k - 1, rng)
        if len(distractors) < k - 1:
            raise MixError(
                f"k={k} needs {k - 1} distractors for passage {gold.id!r}, but only {len(distractors)} "
                "usable "
                f"passages of other titles are in the {part!r} part: lower the largest k or use a larger mix."
            )
        chosen_passages = [gold, *distractors]
        positions = list(range(k))
        rng.shuffle(positions)
        ordered = [chosen_passages[p] for p in positions]
        for question in questions:
            out.append(
                TeacherExample(
                    question, group_id, tuple(p.id for p in ordered), tuple(p.text for p in ordered),
                    positions.index(0),
                )
            )  # fmt: skip
    return out


def _draw_distractors(pool: Sequence[MixPassage], gold: int, count: int, rng: Any) -> list[MixPassage]:
    """``count`` distinct passages of ``pool`` other than ``pool[gold]``, none sharing its title or text."""
    if count <= 0:
        return []
    target = pool[gold]

    def fits(p: MixPassage) -> bool:
        return p.id != target.id and p.text != target.text and not (target.title and p.title == target.title)

    picked: list[MixPassage] = []
    for i in rng.sample(range(len(pool)), min(len(pool), count + 16)):
        if fits(pool[i]) and pool[i] not in picked:
            picked.append(pool[i])
            if len(picked) == count:
                return picked
    rest = [p for p in pool if fits(p) and p not in picked]  # rare: many rejections (small pools)
    rng.shuffle(rest)
    return (picked + rest)[:count]


def teacher_responses(
    mix: Mix,
    model: EvalModel,
    out: str | os.PathLike[str],
    ks: Sequence[int] = (1, 2, 4, 8),
    k_weights: Sequence[float] | None = None,
    seed: int = 0,
    max_new_tokens: int = 32,
    questions_per_example: int = 1,
    part: str = "train",
    max_context_tokens: int | None = 256,
    batch_size: int | None = None,
    batch_tokens: int | None = None,
    limit: int | None = None,
    progress: bool = True,
    mix_path: str | os.PathLike[str] | None = None,
    answers: str = "teacher",
    heldout_out: str | os.PathLike[str] | None = None,
    heldout_frac: float | None = None,
) -> dict[str, Any]:
    """The teacher's greedy responses to the mix's questions, written as training JSONL to ``out``.

    Each line is ``{"contexts": [k passages in prompt order], "query": "Question: ...\\nAnswer:",
    "answer": <the teacher's reply>, "id": "<question source>:<question id>", "group": ..., "gold": ...}``
    (``gold`` only when the data set has one), readable by :func:`ctx2param.training.data.load_jsonl` and so
    by ``ctx2param train --data``. The prompt is ``model.prompt_ids([query], [contexts])``, the ICL prompt of
    ``ctx2param eval``; the reply is the whole greedy continuation up to the end of turn (or
    ``max_new_tokens``), decoded without special tokens and stripped; an empty reply is dropped. Lines are
    ordered by prompt length (longest group first), the lines of a group together.

    Beside each output ``X.jsonl[.gz]`` go ``X.stats.json`` (settings, counts, the k histogram, mean response
    tokens, replies at the token limit, per-source counts, time) and ``X.jsonl[.gz].sources.json`` (the
    ``CardData.add_dataset`` entries of the gold passages' sources, which ``ctx2param train`` records).

    Args:
        mix: the mix.
        model: the teacher (the base model); with ``answers="gold"`` only its tokenizer and window are used
            (``lm`` may be None).
        out: ``*.jsonl`` or ``*.jsonl.gz``.
        ks, k_weights, seed, questions_per_example, part: see :func:`teacher_examples`.
        limit: at most this many questions in each output file (see :func:`teacher_examples`).
        max_new_tokens: longest reply.
        max_context_tokens: passages with more tokens than this (the generator's ``chunk_tokens``) are
            neither gold passages nor distractors, so that each context is one chunk; None: no limit.
        batch_size, batch_tokens: see :func:`greedy_replies`.
        mix_path: the mix file, to fingerprint the resume file and record its digest.
        answers: ``"teacher"`` (generate) or ``"gold"`` (the data set's answer, no model run; questions
            without one are dropped): examples of the same shape without a GPU, e.g. for throughput tests.
        heldout_out: also write the examples of the mix's ``dev`` passages (distractors from the dev part
            too) to this file, from the same generation pass; needs ``part="train"``.
        heldout_frac: the held-out fraction asked for; it must be the mix's ``dev_frac`` (the dev part is
            fixed when the mix is built).

    Returns:
        The stats record of ``out`` (with ``"heldout"``: the held-out file's, when written).
    """
    outputs = [Path(out)] + ([Path(heldout_out)] if heldout_out is not None else [])
    for path in outputs:
        if not path.name.endswith((".jsonl", ".jsonl.gz")):
            raise MixError(f"{path} must end in .jsonl or .jsonl.gz.")
    if heldout_out is not None and Path(heldout_out) == Path(out):
        raise MixError("--heldout-out must differ from --out.")
    if answers not in ("teacher", "gold"):
        raise MixError(f"answers must be 'teacher' or 'gold', got {answers!r}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise MixError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    parts = [part]
    if heldout_out is not None:
        if part != "train":
            raise MixError(
                "--heldout-out writes the dev part beside the train part; part must be 'train', not "
                f"{part!r}."
            )
        dev_frac = mix.header.get("settings", {}).get("dev_frac")
        if heldout_frac is not None and dev_frac is not None and abs(heldout_frac - dev_frac) > 1e-12:
            raise MixError(
                f"The mix holds out dev_frac={dev_frac} of its passages (its dev part); rebuild it with "
                f"`ctx2param data mix --dev-frac {heldout_frac}` for another fraction."
            )
        parts.append("dev")
    elif heldout_frac is not None:
        raise MixError("--heldout-frac needs --heldout-out (the file for the held-out examples).")
    start = time.perf_counter()
    lengths: dict[str, int] = {}
    if max_context_tokens is not None:
        counts = model.tokenizer([p.text for p in mix.passages], add_special_tokens=False)["input_ids"]
        lengths = {p.id: len(c) for p, c in zip(mix.passages, counts, strict=True)}
    too_long = sum(1 for n in lengths.values() if max_context_tokens is not None and n > max_context_tokens)
    drawn: list[list[TeacherExample]] = []
    no_gold: list[int] = []
    usable = None if max_context_tokens is None else (lambda p: lengths[p.id] <= max_context_tokens)
    has_gold = (lambda q: bool(q.answer.strip())) if answers == "gold" else None
    index = mix.passage_index()
    for which in parts:
        examples = teacher_examples(
            mix, ks, k_weights, seed, questions_per_example, which, usable=usable, limit=limit, keep=has_gold
        )
        no_gold.append(
            sum(
                1 for q in mix.questions
                if has_gold is not None and not has_gold(q)
                and (which == "all" or index[q.passage].dev == (which == "dev"))
                and (usable is None or usable(index[q.passage]))
            )
        )  # fmt: skip
        if not examples:
            raise MixError(f"No questions to answer in the {which!r} part of the mix (after the filters).")
        drawn.append(examples)
    window = model.window
    prompted: list[tuple[list[TeacherExample], list[list[int]], int]] = []
    for examples in drawn:
        prompts = teacher_prompt_ids(model, examples)
        keep = [i for i, p in enumerate(prompts) if window is None or len(p) + max_new_tokens <= window]
        if not keep:
            raise MixError(
                f"Every prompt exceeds the model's window of {window} tokens: lower the largest k."
            )
        prompted.append(([examples[i] for i in keep], [prompts[i] for i in keep], len(examples) - len(keep)))
    settings = {
        "ks": list(ks), "k_weights": list(k_weights) if k_weights else None, "seed": seed,
        "max_new_tokens": max_new_tokens, "questions_per_example": questions_per_example, "part": part,
        "max_context_tokens": max_context_tokens, "limit": limit, "answers": answers,
    }  # fmt: skip
    digest = _file_digest(mix_path) if mix_path is not None else None
    replies: dict[str, GreedyResult] = {}
    if answers == "teacher":
        keys = [e.question.id for examples, _, _ in prompted for e in examples]
        prompts = [p for _, ps, _ in prompted for p in ps]
        fingerprint = _fingerprint(step="responses", model=str(model.name), mix=digest, keys=keys, **settings)
        partial = outputs[0].with_name(outputs[0].name + ".partial")
        replies = greedy_replies(
            model, keys, prompts, max_new_tokens, batch_size, batch_tokens, partial, fingerprint, progress,
            desc="teacher responses",
        )  # fmt: skip
    generation_s = time.perf_counter() - start
    source_of = {p.id: p.source for p in mix.passages}
    context = {
        "mix": str(mix_path) if mix_path is not None else None, "mix_sha256_16": digest, "settings": settings,
        "passages_over_max_context_tokens": too_long, "generation_seconds": round(generation_s, 3),
        "model": model.info() if answers == "teacher" else {"name": str(model.name), "answers": "gold"},
        "prompt_format": "chat template (one user turn)" if model.chat else "plain text",
        "context_separator": model.separator,
        "device": str(model.device) if answers == "teacher" else None,
    }  # fmt: skip
    all_stats = []
    for path, (examples, prompts, over_window), dropped_no_gold, which in zip(
        outputs, prompted, no_gold, parts, strict=True
    ):
        stats = _write_examples(path, examples, prompts, replies, model, answers, source_of, context)
        stats.update(part=which, dropped_over_window=over_window, skipped_without_gold=dropped_no_gold)
        stats["seconds_per_question"] = round(generation_s / sum(len(e) for e, _, _ in prompted), 4)
        _write_json(_stats_path(path), stats)
        all_stats.append(stats)
    outputs[0].with_name(outputs[0].name + ".partial").unlink(missing_ok=True)
    if len(all_stats) > 1:
        all_stats[0]["heldout"] = {k: v for k, v in all_stats[1].items() if k not in context}
        _write_json(_stats_path(outputs[0]), all_stats[0])
    return all_stats[0]


def _stats_path(path: Path) -> Path:
    """``X.stats.json`` beside ``X.jsonl`` / ``X.jsonl.gz``."""
    return path.with_name(path.name.removesuffix(".gz").removesuffix(".jsonl") + ".stats.json")


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomically(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _write_examples(
    out: Path,
    examples: Sequence[TeacherExample],
    prompts: Sequence[Sequence[int]],
    replies: dict[str, GreedyResult],
    model: EvalModel,
    answers: str,
    source_of: dict[str, str],
    context: dict[str, Any],
) -> dict[str, Any]:
    """Write one output file (and its ``.sources.json``); returns its stats."""
    longest: dict[str, int] = {}
    for e, p in zip(examples, prompts, strict=True):
        longest[e.group] = max(longest.get(e.group, 0), len(p))
    # group order: longest prompt first, then the group id; questions in draw order within a group
    order = sorted(range(len(examples)), key=lambda i: (-longest[examples[i].group], examples[i].group, i))
    records = []
    k_hist: dict[str, int] = {}
    per_source: dict[str, int] = {}
    per_passage_source: dict[str, dict[str, int]] = {}
    empty = at_limit = response_tokens = 0
    prompt_tokens = []
    for i in order:
        e = examples[i]
        if answers == "gold":
            text, tokens, ended = e.question.answer.strip(), [], True
        else:
            reply = replies[e.question.id]
            text = model.tokenizer.decode(list(reply.tokens), skip_special_tokens=True).strip()
            tokens, ended = list(reply.tokens), reply.ended
        if not text:
            empty += 1
            continue
        example = TrainingExample(
            e.contexts, e.query, text, source=f"{e.question.source}:{e.question.id}", group=e.group,
            gold=e.question.answer,
        )  # fmt: skip
        records.append(example.to_json())
        k_hist[str(e.k)] = k_hist.get(str(e.k), 0) + 1
        per_source[e.question.source] = per_source.get(e.question.source, 0) + 1
        by = per_passage_source.setdefault(source_of[e.question.passage], {})
        by[e.question.source] = by.get(e.question.source, 0) + 1
        at_limit += not ended
        response_tokens += len(tokens)
        prompt_tokens.append(len(prompts[i]))
    if not records:
        raise MixError(f"{out}: the teacher gave only empty responses; nothing to write.")
    write_jsonl(out, records)
    what = "gold answers" if answers == "gold" else "teacher responses"
    _write_json(Path(f"{out}.sources.json"), _response_sources(per_passage_source, len(records), what))
    return {
        "output": out.name,
        **context,
        "questions": len(examples),
        "examples": len(records),
        "groups": len({r["group"] for r in records}),
        "dropped_empty_responses": empty,
        "k_histogram": dict(sorted(k_hist.items(), key=lambda kv: int(kv[0]))),
        "per_source": dict(sorted(per_source.items())),
        "mean_response_tokens": response_tokens / len(records) if answers == "teacher" else None,
        "responses_at_token_limit": at_limit,
        "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens),
        "max_prompt_tokens": max(prompt_tokens),
    }


def _response_sources(
    per_passage_source: dict[str, dict[str, int]], total: int, what: str
) -> list[dict[str, Any]]:
    """``CardData.add_dataset`` entries of a responses file: one per passage source, ``num_examples`` its
    examples (summing to the file's), licences from :data:`~ctx2param.training.mix.SOURCE_INFO`."""
    entries = card_datasets(
        {name: {"passages": 0, "questions": by} for name, by in sorted(per_passage_source.items())}
    )
    for entry in entries:
        entry["description"] = f"{what} over k passages; " + entry["description"].split("; ", 1)[1]
    if sum(int(e["num_examples"]) for e in entries) != total:  # cannot happen: every example has a source
        raise AssertionError("responses' source counts do not add up")
    return entries
