"""Trainer callbacks of ctx2param's training (``transformers.TrainerCallback`` subclasses)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

__all__ = ["NonFiniteGradientGuard"]

logger = logging.getLogger(__name__)


class NonFiniteGradientGuard(TrainerCallback):
    """Skip an optimizer step whose gradients hold NaN or inf, so one bad step cannot ruin the weights.

    ``transformers.Trainer`` clips the gradients and then steps the optimizer whatever their values: with
    bf16 autocast there is no gradient scaler to catch an overflow, and a single NaN gradient (after
    clipping, every gradient is NaN) turns every weight into NaN, and the checkpoints saved after it too.
    This callback runs just before each optimizer step: when the total gradient norm of the trainable
    parameters is not finite it drops their gradients (``p.grad = None``; torch's optimizers leave such
    parameters, and their moment estimates, untouched), counts the step in :attr:`skipped_steps` and warns.
    After ``max_consecutive`` skipped steps in a row it stops the training (the weights are still the last
    finite ones), since the run has diverged rather than hit one bad batch.

    Args:
        max_consecutive: consecutive skipped steps after which training stops (0: never stop).
    """

    def __init__(self, max_consecutive: int = 20) -> None:
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive}.")
        self.max_consecutive = max_consecutive
        self.skipped_steps = 0
        self.consecutive = 0

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        if model is None:
            return control
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return control
        # one norm per gradient, then of those: a single host sync (works on torch < 2.6, no get_total_norm)
        device = params[0].grad.device  # a model spread over devices: gather the norms on one
        norms = [torch.linalg.vector_norm(p.grad.float()).to(device) for p in params]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        if bool(torch.isfinite(norm)):
            self.consecutive = 0
            return control
        for p in params:
            p.grad = None
        self.skipped_steps += 1
        self.consecutive += 1
        logger.warning(
            "Step %d: the gradient norm is %s; the optimizer step is skipped and the weights are left as "
            "they were (%d skipped so far).",
            state.global_step + 1,
            float(norm),
            self.skipped_steps,
        )
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            logger.warning(
                "%d optimizer steps in a row had non-finite gradients; training stops here with the last "
                "finite weights. Lower the learning rate or the loss weights, or train in float32.",
                self.consecutive,
            )
            control.should_training_stop = True
        return control
