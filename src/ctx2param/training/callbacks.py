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
    This callback runs just before each optimizer step and computes the total gradient norm on the device.

    - With a fused optimizer (``optim="adamw_torch_fused"``, the ctx2param default) it never waits for the
      device: it hands the optimizer a ``found_inf`` flag, as ``torch.amp.GradScaler`` does, and the fused
      kernel leaves the parameters, their moment estimates and the step count untouched when it is set.
    - With other optimizers it reads the norm back (one host sync per step) and drops the gradients of a
      non-finite step (``p.grad = None``: torch's optimizers then leave those parameters alone).

    Skipped steps are counted on the device (:attr:`skipped_steps` reads the count). After ``max_consecutive``
    skipped steps in a row the training stops (the weights are still the last finite ones), since the run has
    diverged rather than hit one bad batch; with a fused optimizer that is noticed at the next log (every
    ``logging_steps``), where the Trainer reads its losses back anyway.

    Args:
        max_consecutive: consecutive skipped steps after which training stops (0: never stop).
    """

    def __init__(self, max_consecutive: int = 20) -> None:
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive}.")
        self.max_consecutive = max_consecutive
        self._skipped: torch.Tensor | int = 0
        self._consecutive: torch.Tensor | int = 0
        self._reported = 0

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far (reads the device counter)."""
        return int(self._skipped)

    @property
    def consecutive(self) -> int:
        """Skipped steps in a row up to the last step."""
        return int(self._consecutive)

    @staticmethod
    def _fused(optimizer: Any) -> Any:
        """The torch optimizer inside accelerate's wrapper when all its groups are fused, else None."""
        inner = getattr(optimizer, "optimizer", optimizer)
        groups = getattr(inner, "param_groups", None)
        if groups and all(group.get("fused") for group in groups):
            return inner
        return None

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> TrainerControl:
        if model is None:
            return control
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not grads:
            return control
        device = grads[0].device  # a model spread over devices: gather the norms on one
        norms = [n.to(device) for n in torch._foreach_norm(grads)]
        bad = ~torch.isfinite(torch.linalg.vector_norm(torch.stack(norms).float()))
        fused = self._fused(optimizer)
        if fused is not None:
            fused.found_inf = bad.to(torch.float32)
            self._skipped = self._skipped + bad.to(torch.int64)
            self._consecutive = (self._consecutive + 1) * bad.to(torch.int64)
            return control
        if not bool(bad):
            self._consecutive = 0
            return control
        for p in model.parameters():
            if p.grad is not None:
                p.grad = None
        self._skipped = int(self._skipped) + 1
        self._consecutive = int(self._consecutive) + 1
        self._warn(state.global_step + 1, control)
        return control

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kw: Any,
    ) -> TrainerControl:
        fused = self._fused(optimizer)
        if fused is not None and hasattr(fused, "found_inf"):
            del fused.found_inf  # only the guard's own step may be skipped through it
        return control

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> TrainerControl:
        if isinstance(self._skipped, torch.Tensor) and self.skipped_steps > self._reported:
            self._warn(state.global_step, control)
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> TrainerControl:
        if isinstance(self._skipped, torch.Tensor) and self.skipped_steps > self._reported:
            self._warn(state.global_step, control)
        return control

    def _warn(self, step: int, control: TrainerControl) -> None:
        skipped = self.skipped_steps
        logger.warning(
            "Up to step %d, %d optimizer step(s) had a non-finite gradient norm and were skipped; the "
            "weights were left as they were (%d skipped in all).",
            step,
            skipped - self._reported,
            skipped,
        )
        self._reported = skipped
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            logger.warning(
                "%d optimizer steps in a row had non-finite gradients; training stops here with the last "
                "finite weights. Lower the learning rate or the loss weights, or train in float32.",
                self.consecutive,
            )
            control.should_training_stop = True
