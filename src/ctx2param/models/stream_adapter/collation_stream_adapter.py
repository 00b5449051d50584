"""The layout of a StreamAdapter training batch: row orders, length buckets and flat gather indices.

:meth:`StreamAdapterModel.collate_training_examples` tokenizes the examples (in DataLoader workers, on the
CPU) and hands each example's token rows to :func:`layout_batch`, which decides everything the training step
would otherwise have to read back from the device:

- examples are ordered by student length (longest first), so that the student rows fall into contiguous
  length buckets (``student_buckets``) and each bucket takes a contiguous slice of the stacked adapters;
- chunks are ordered by length and read in length buckets (``chunk_buckets``); ``chunk_index [S, N]`` /
  ``chunk_active [S, N]`` say which chunk row each stream reads at each of the ``S = num_steps`` recurrence
  steps (a stream with fewer chunks keeps its state), so the recurrence is ``S`` batched folds;
- teacher rows are read in length buckets over ``teacher_order`` (teacher lengths sorted);
- ``teacher_scored`` / ``student_scored`` index the scored positions (those that predict an answer token)
  in the concatenation of a role's bucket outputs ``[Σ rows · width, D]``, in one canonical order (row by
  row, position by position), so that the logits are computed only where scored and teacher and student
  tokens line up; ``answer_targets`` are the answer tokens in that order.

Shapes: ``N`` examples, ``C`` chunks, ``S`` most chunks in one stream, ``P`` scored answer tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...alignment import length_buckets, pad_token_lists

__all__ = ["BUCKET_MAX_PADDING", "BUCKET_MIN_ROWS", "IGNORE_INDEX", "ExampleRows", "layout_batch"]

IGNORE_INDEX = -100
#: Length buckets of a batch's chunk, teacher and student rows: a bucket grows while its padded share of
#: token slots stays within this fraction (each bucket has at least ``BUCKET_MIN_ROWS`` rows but the last).
BUCKET_MAX_PADDING = 0.05
BUCKET_MIN_ROWS = 16


@dataclass(frozen=True)
class ExampleRows:
    """One example's token rows, as the collator made them.

    Attributes:
        chunks: the chunks' token ids in stream order (at least one).
        student, teacher: the student's and the teacher's token ids.
        student_targets, teacher_targets: per position the next token where it is an answer token, else
            ``IGNORE_INDEX``; both have the same number of answer tokens.
    """

    chunks: tuple[tuple[int, ...], ...]
    student: tuple[int, ...]
    student_targets: tuple[int, ...]
    teacher: tuple[int, ...]
    teacher_targets: tuple[int, ...]


def _pad_targets(rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    out = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
    return out


def _scored_positions(
    targets: Sequence[Sequence[int]],
    order: Sequence[int],
    buckets: Sequence[tuple[int, int, int]],
) -> list[int]:
    """Flat indices of the scored positions in the concatenated bucket outputs ``[Σ (e - s) · w, D]``.

    Bucket ``(s, e, w)`` reads rows ``order[s:e]`` cut to width ``w``; the indices come row by row (row 0
    first, in batch order), position by position."""
    start: dict[int, int] = {}
    offset = 0
    for s, e, w in buckets:
        for j in range(s, e):
            start[order[j]] = offset + (j - s) * w
        offset += (e - s) * w
    return [
        start[row] + pos
        for row in range(len(targets))
        for pos, t in enumerate(targets[row])
        if t != IGNORE_INDEX
    ]


def layout_batch(
    examples: Sequence[ExampleRows],
    pad_id: int,
    max_padding: float = BUCKET_MAX_PADDING,
    min_rows: int = BUCKET_MIN_ROWS,
) -> dict[str, Any]:
    """The training batch of ``examples`` (CPU tensors and plain numbers; see the module docstring).

    Returns:
        ``example_index [N]`` (each row's position in ``examples``); ``chunk_ids`` / ``chunk_mask``
        ``[C, Tc]`` (right padded, longest first), ``chunk_owner`` / ``chunk_step`` ``[C]`` (row of the
        example, position in its stream), ``chunk_buckets``, ``chunk_index`` / ``chunk_active`` ``[S, N]``,
        ``num_steps`` (``S``, an int); ``student_ids`` / ``student_mask`` / ``student_targets`` ``[N, Ts]``,
        ``student_buckets``, ``student_scored [P]``; ``teacher_ids`` / ``teacher_mask`` /
        ``teacher_targets`` ``[N, Tt]``, ``teacher_order [N]``, ``teacher_buckets``, ``teacher_scored [P]``;
        ``answer_targets [P]``; ``token_counts`` (plain numbers for FLOP counting: ``chunks``, ``teacher``,
        ``student`` lengths and ``answers`` = P).
    """
    if not examples:
        raise ValueError("layout_batch got no examples.")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].student))  # stable: ties keep order
    rows = [examples[i] for i in order]
    n = len(rows)

    # chunks: longest first; each stream's chunks found by (step, example) for the recurrence
    chunk_items = [(e, step, ids) for e, ex in enumerate(rows) for step, ids in enumerate(ex.chunks)]
    chunk_items.sort(key=lambda item: -len(item[2]))
    chunk_ids, chunk_mask = pad_token_lists([ids for _, _, ids in chunk_items], pad_id)
    num_steps = max(len(ex.chunks) for ex in rows)
    chunk_index = torch.zeros((num_steps, n), dtype=torch.long)
    chunk_active = torch.zeros((num_steps, n), dtype=torch.bool)
    for c, (e, step, _) in enumerate(chunk_items):
        chunk_index[step, e] = c
        chunk_active[step, e] = True

    student_lengths = [len(ex.student) for ex in rows]
    student_buckets = length_buckets(student_lengths, max_padding, min_rows)
    student_targets = [ex.student_targets for ex in rows]
    teacher_lengths = [len(ex.teacher) for ex in rows]
    teacher_order = sorted(range(n), key=lambda i: -teacher_lengths[i])
    teacher_buckets = length_buckets([teacher_lengths[i] for i in teacher_order], max_padding, min_rows)
    teacher_targets = [ex.teacher_targets for ex in rows]
    student_scored = _scored_positions(student_targets, range(n), student_buckets)
    teacher_scored = _scored_positions(teacher_targets, teacher_order, teacher_buckets)
    if len(student_scored) != len(teacher_scored):
        raise ValueError(
            f"Teacher and student rows target {len(teacher_scored)} and {len(student_scored)} answer tokens; "
            "every example needs the same answer tokens in both."
        )
    answer_targets = [t for targets in student_targets for t in targets if t != IGNORE_INDEX]

    student_ids, student_mask = pad_token_lists([ex.student for ex in rows], pad_id)
    teacher_ids, teacher_mask = pad_token_lists([ex.teacher for ex in rows], pad_id)
    return {
        "example_index": torch.tensor(order, dtype=torch.long),
        "chunk_ids": chunk_ids,
        "chunk_mask": chunk_mask,
        "chunk_owner": torch.tensor([e for e, _, _ in chunk_items], dtype=torch.long),
        "chunk_step": torch.tensor([step for _, step, _ in chunk_items], dtype=torch.long),
        "chunk_buckets": length_buckets([len(ids) for _, _, ids in chunk_items], max_padding, min_rows),
        "chunk_index": chunk_index,
        "chunk_active": chunk_active,
        "num_steps": num_steps,
        "student_ids": student_ids,
        "student_mask": student_mask,
        "student_targets": _pad_targets(student_targets, student_ids.shape[1]),
        "student_buckets": student_buckets,
        "student_scored": torch.tensor(student_scored, dtype=torch.long),
        "teacher_ids": teacher_ids,
        "teacher_mask": teacher_mask,
        "teacher_targets": _pad_targets(teacher_targets, teacher_ids.shape[1]),
        "teacher_order": torch.tensor(teacher_order, dtype=torch.long),
        "teacher_buckets": teacher_buckets,
        "teacher_scored": torch.tensor(teacher_scored, dtype=torch.long),
        "answer_targets": torch.tensor(answer_targets, dtype=torch.long),
        "token_counts": {
            "chunks": [len(ids) for _, _, ids in chunk_items],
            "teacher": teacher_lengths,
            "student": student_lengths,
            "answers": len(answer_targets),
        },
    }
