"""The CompAs training losses, as plain functions of logits and adapters (each testable on its own).

The alignment KL and the masked cross-entropy live in :mod:`ctx2param.alignment` (shared by the methods
that align a student to a teacher) and are re-exported here.
"""

from __future__ import annotations

import torch

from ...adapter import ContextAdapter
from ...alignment import alignment_kl, masked_cross_entropy  # shared with other methods
from ...stacked import StackedAdapter

__all__ = ["additivity_loss", "alignment_kl", "masked_cross_entropy", "stacked_additivity_loss"]


def additivity_loss(
    joint: ContextAdapter, first: ContextAdapter, second: ContextAdapter, eps: float = 1e-12
) -> torch.Tensor:
    """Relative additivity error ‖ΔW(c1 ⊕ c2) − ΔW(c1) − ΔW(c2)‖² / (‖ΔW(c1)‖² + ‖ΔW(c2)‖²), averaged.

    Computed with the adapter algebra from the factors alone (``(joint - first - second)`` concatenates
    ranks; squared norms are ``dot`` products of r × r Gram matrices), so it does not depend on how each
    ΔW is factored. The normalisation makes it scale free: shrinking every update to zero does not lower
    it, so the generator cannot satisfy it by switching itself off.

    Args:
        joint, first, second: batched adapters ``[P, ...]`` (or single ones) over the same modules.

    Returns:
        A 0-d float32 tensor, 0 exactly when ΔW(c1 ⊕ c2) = ΔW(c1) + ΔW(c2) for every pair.
    """
    diff = joint - first - second
    num = diff.dot(diff).clamp_min(0)  # == diff.norm() ** 2, without the sqrt's infinite gradient at 0
    den = first.dot(first) + second.dot(second)
    return (num / (den + eps)).mean().float()


def stacked_additivity_loss(
    joint: StackedAdapter, first: StackedAdapter, second: StackedAdapter, eps: float = 1e-12
) -> torch.Tensor:
    """:func:`additivity_loss` on stacked factors ``[P, ...]``: the same number, from one Gram product per
    module kind (the training fast path)."""
    diff = joint.combine([first, second], [1.0, -1.0, -1.0])
    num = diff.sq_norm()
    den = first.sq_norm() + second.sq_norm()
    return (num / (den + eps)).mean().float()
