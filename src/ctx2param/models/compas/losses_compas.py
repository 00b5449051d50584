"""The CompAs training losses, as plain functions of logits and adapters (each testable on its own)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...adapter import ContextAdapter

__all__ = ["additivity_loss", "alignment_kl", "masked_cross_entropy"]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def alignment_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher ‖ student) per answer token, averaged over the tokens of ``mask``, times ``temperature²``.

    Args:
        teacher_logits: ``[N, L, V]`` (no gradient needed).
        student_logits: ``[N, L, V]``.
        mask: ``[N, L]``, 1 on answer tokens.

    Returns:
        A 0-d float32 tensor (0 when the distributions agree).
    """
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    s = F.log_softmax(student_logits.float() / temperature, -1)
    kl = (t.exp() * (t - s)).sum(-1)  # [N, L]
    return _masked_mean(kl, mask) * temperature**2


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [N, L, V]`` against ``targets [N, L]`` where ``mask`` is 1."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return _masked_mean(ce.view_as(targets), mask)


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
