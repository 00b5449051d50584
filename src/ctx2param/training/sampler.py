"""Length-grouped, seeded batches for training: little padding, groups kept together, exact resumption.

:class:`LengthGroupedBatchSampler` is a ``torch.utils.data`` batch sampler. Each epoch it shuffles the units
(an example, or all examples that share a ``group`` id: several questions about one context set, which the
methods then serve with one set of chunk adapters), lays them out one after the other, cuts that order into
mega-batches of ``megabatch`` batches, sorts each mega-batch by its units' lengths (a group's examples stay
next to each other) and cuts it into batches of ``batch_size`` examples: the rows of a batch have similar
lengths and a group shares a batch (one that straddles a batch boundary is split in two). The batch order is
shuffled again, with the batch that holds the most tokens first (an out-of-memory shows at the first step,
not in the middle of a run). Everything depends only on ``(seed, epoch)``: a resumed run, which skips the
batches it already trained on, sees exactly the batches of an uninterrupted one; every epoch has
``ceil(N / batch_size)`` batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

__all__ = ["LengthGroupedBatchSampler"]


class LengthGroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset indices grouped by length (see the module docstring).

    Args:
        lengths: a length (tokens, or any proxy) per example.
        batch_size: examples per batch (the last batch of the epoch may have fewer).
        groups: optional group id per example; examples with the same id land in the same batch.
        seed: seed of the shuffles (combined with the epoch).
        megabatch: batches per sorted mega-batch (1: no length grouping beyond a batch; larger: less
            padding, less randomness).
        drop_last: drop batches with fewer than ``batch_size`` examples (``False``: keep them).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        groups: Sequence[int] | None = None,
        seed: int = 0,
        megabatch: int = 32,
        drop_last: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if megabatch < 1:
            raise ValueError(f"megabatch must be >= 1, got {megabatch}.")
        if not lengths:
            raise ValueError("LengthGroupedBatchSampler needs at least one example.")
        if groups is not None and len(groups) != len(lengths):
            raise ValueError(f"Got {len(groups)} group ids for {len(lengths)} examples.")
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.seed = seed
        self.megabatch = megabatch
        self.drop_last = drop_last
        self.epoch = 0
        units: dict[object, list[int]] = {}
        for i in range(len(self.lengths)):
            key = ("group", groups[i]) if groups is not None else ("example", i)
            units.setdefault(key, []).append(i)
        self.units = list(units.values())
        self._batches: dict[int, list[list[int]]] = {}

    def set_epoch(self, epoch: int) -> None:
        """Use the batches of ``epoch`` (the Trainer calls this at the start of every epoch)."""
        self.epoch = int(epoch)

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """The batches of an epoch, in order (cached)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if epoch not in self._batches:
            self._batches = {epoch: self._make(epoch)}
        return self._batches[epoch]

    def _make(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"ctx2param/batches/{self.seed}/{epoch}")
        units = list(self.units)
        rng.shuffle(units)
        order = [(rank, i) for rank, unit in enumerate(units) for i in unit]  # groups stay adjacent
        unit_length = [max(self.lengths[i] for i in unit) for unit in units]
        per_mega = self.batch_size * self.megabatch
        batches: list[list[int]] = []
        for start in range(0, len(order), per_mega):
            mega = sorted(order[start : start + per_mega], key=lambda item: (-unit_length[item[0]], item[0]))
            flat = [i for _, i in mega]
            batches += [flat[k : k + self.batch_size] for k in range(0, len(flat), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size] or batches[:1]
        rng.shuffle(batches)
        heaviest = max(
            range(len(batches)), key=lambda b: len(batches[b]) * max(self.lengths[i] for i in batches[b])
        )
        batches.insert(0, batches.pop(heaviest))
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())

    def padding_fraction(self, epoch: int | None = None) -> float:
        """Share of the token slots of the epoch's batches that padding to each batch's longest row fills."""
        slots = real = 0
        for batch in self.batches(epoch):
            width = max(self.lengths[i] for i in batch)
            slots += width * len(batch)
            real += sum(self.lengths[i] for i in batch)
        return 1.0 - real / slots if slots else 0.0
