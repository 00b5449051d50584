"""What a training run measures of itself: per-batch token and FLOP counts (made in the data loader, so the
step never waits for them), throughput, model-FLOPs utilisation, padding, peak memory, the time budget, the
per-log training record and the loss curves.

- :class:`BatchStatistics` wraps a method's collator and adds ``batch["stats"]`` (plain floats: tokens read
  by every pass, their padded token slots and the step's FLOPs;
  :func:`ctx2param.training.flops.batch_statistics`).
- :class:`TrainingMonitor` (a ``TrainerCallback``) stops the run when its time budget is spent (and has the
  Trainer checkpoint), writes one JSON line per log to ``train_log.jsonl`` (losses, learning rate, time,
  cumulative tokens and FLOPs) and sums the run up (:meth:`TrainingMonitor.summary`) over a steady window
  that leaves out the first logged steps (warm-up, kernel selection, allocation).
- :func:`plot_losses` draws every logged loss term against the step (raw and smoothed).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..file_utils import write_text_atomically
from .flops import batch_statistics, peak_bf16_flops

__all__ = ["LOSS_KEYS", "BatchStatistics", "TrainingMonitor", "plot_losses", "read_log"]

#: Logged loss terms, in the order they are plotted (those a run logs).
LOSS_KEYS = ("loss", "alignment", "kl", "ce", "state", "additivity", "reconstruction", "specificity")


class BatchStatistics:
    """A collator that adds ``batch["stats"]`` to the batches of ``collate`` (run in the DataLoader workers).

    Args:
        collate: the method's collator (``model.collate_training_examples``).
        model: the method model (its config and base shapes only are read: no device work).
    """

    def __init__(self, collate: Callable[[Sequence[Any]], dict[str, Any]], model: Any) -> None:
        self.collate = collate
        self.model = model
        batch_statistics(model, None)  # resolve the base's cost once, before any worker forks

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        batch = self.collate(examples)
        batch["stats"] = batch_statistics(self.model, batch)
        return batch


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``train_log.jsonl`` (an empty list when there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class TrainingMonitor(TrainerCallback):
    """Time budget, training log and throughput of a run.

    Args:
        counters: the trainer's running sums of ``batch["stats"]`` (tokens, slots, flops, ...), read at each
            log.
        log_path: where the JSON lines go (appended; on resume, lines after the resumed step are dropped).
        max_seconds: training time after which the run stops and checkpoints (``None``: no budget).
        skip_logs: logged points left out of the steady window (at least the first, which pays for warm-up).
    """

    def __init__(
        self,
        counters: Mapping[str, float],
        log_path: str | os.PathLike | None = None,
        max_seconds: float | None = None,
        skip_logs: int = 1,
    ) -> None:
        if max_seconds is not None and not max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {max_seconds!r}.")
        self.counters = counters
        self.log_path = Path(log_path) if log_path is not None else None
        self.max_seconds = max_seconds
        self.skip_logs = max(1, int(skip_logs))
        self.start: float | None = None
        self.steps = 0
        self.points: list[dict[str, float]] = []

    # ----------------------------------------------------------------------------------------- events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        self.start = time.perf_counter()
        self.steps = 0
        self.points = []
        self.first_step = int(state.global_step)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if self.log_path is not None and self.log_path.is_file():  # a resumed run: drop what came after
            kept = [r for r in read_log(self.log_path) if int(r.get("step", 0)) <= state.global_step]
            write_text_atomically(self.log_path, "".join(json.dumps(r) + "\n" for r in kept))
        return control

    def elapsed(self) -> float:
        return 0.0 if self.start is None else time.perf_counter() - self.start

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        self.steps += 1
        if self.max_seconds is not None and self.elapsed() >= self.max_seconds:
            control.should_training_stop = True
            control.should_save = True
        return control

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        if not logs or "loss" not in logs:
            return control
        # the Trainer has just read the loss back, so the device has finished the logged steps
        point = {"step": float(state.global_step), "time_s": self.elapsed(), **dict(self.counters)}
        self.points.append(point)
        if self.log_path is not None:
            record = {
                "step": state.global_step,
                "time_s": round(point["time_s"], 3),
                **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
                **{k: point[k] for k in ("tokens", "context_tokens", "flops") if k in point},
            }
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        return control

    # ---------------------------------------------------------------------------------------- summary
    def summary(self, device: torch.device | str | None = None) -> dict[str, Any]:
        """Throughput of the steady window (from the ``skip_logs``-th log to the last), padding and memory.

        Returns ``tokens_per_s`` (every token any pass read), ``context_tokens_per_s``, ``flops_per_s``,
        ``mfu`` (against :func:`~ctx2param.training.flops.peak_bf16_flops`; None on the CPU),
        ``padding_fraction`` (padded share of the token slots the passes computed), ``peak_memory_gib``,
        ``steps``, ``seconds`` and ``window`` (which logged steps the rates cover).
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        window = self.points[self.skip_logs - 1 :] if len(self.points) > self.skip_logs else self.points
        totals = dict(self.counters)
        out: dict[str, Any] = {"steps": self.steps, "seconds": round(self.elapsed(), 3)}
        if len(window) >= 2:
            first, last = window[0], window[-1]
            dt = max(last["time_s"] - first["time_s"], 1e-9)
            rate = {
                k: (last.get(k, 0.0) - first.get(k, 0.0)) / dt for k in ("tokens", "context_tokens", "flops")
            }
            out["window"] = {
                "from_step": int(first["step"]),
                "to_step": int(last["step"]),
                "seconds": round(dt, 3),
            }
        else:
            dt = max(self.elapsed(), 1e-9)
            rate = {k: totals.get(k, 0.0) / dt for k in ("tokens", "context_tokens", "flops")}
            out["window"] = {
                "from_step": self.first_step,
                "to_step": self.first_step + self.steps,
                "seconds": dt,
            }
        peak = peak_bf16_flops(device)
        slots = totals.get("slots", 0.0)
        out.update(
            {
                "tokens_per_s": rate["tokens"],
                "context_tokens_per_s": rate["context_tokens"],
                "flops_per_s": rate["flops"],
                "mfu": rate["flops"] / peak if peak else None,
                "peak_bf16_flops": peak,
                "padding_fraction": 1.0 - totals.get("real", 0.0) / slots if slots else None,
                "peak_memory_gib": (
                    torch.cuda.max_memory_allocated(device) / 2**30
                    if device.type == "cuda" and torch.cuda.is_available()
                    else None
                ),
                "totals": totals,
            }
        )
        return out


def plot_losses(log_path: str | os.PathLike, out: str | os.PathLike, title: str) -> Path | None:
    """Draw every loss term of ``train_log.jsonl`` against the step (raw and smoothed) into the PNG ``out``;
    returns its path (None when the log has no loss)."""
    rows = read_log(log_path)
    keys = [k for k in LOSS_KEYS if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        steps, values = [p[0] for p in points], [p[1] for p in points]
        ax.plot(steps, values, lw=0.8)
        window = max(1, len(points) // 20)
        if window > 1:
            smooth = [
                sum(values[max(0, i - window) : i + 1]) / len(values[max(0, i - window) : i + 1])
                for i in range(len(values))
            ]
            ax.plot(steps, smooth, lw=1.6)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return out
