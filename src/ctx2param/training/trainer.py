"""Training for every method: a ``transformers.Trainer`` that minimises ``model.training_losses(batch)``.

Accelerate, mixed precision, gradient accumulation, checkpoints, resuming, logging and progress bars all come
from ``transformers.Trainer``. What is specific:

- :class:`TrainingExampleDataset` wraps :class:`~ctx2param.training.data.TrainingExample` objects (optionally
  adding distractor contexts, deterministically, so each example has a random number of chunks), and the
  collator is the method's own ``model.collate_training_examples``;
- :class:`ContextAdaptationTrainer` calls ``model.training_losses(batch)`` under the accelerator's autocast,
  logs every loss component (averaged over the logging interval like ``loss``), optimises only the method's
  parameters (the base model is frozen and checked to be), and loads checkpoints through the method's own
  ``load_method_weights`` — a checkpoint holds the method's weights only (``save_pretrained`` writes no base
  weights), plus the Trainer's optimizer, scheduler, RNG and state files, so resuming continues exactly;
- an optimizer step whose gradients are not finite is skipped
  (:class:`~ctx2param.training.callbacks.NonFiniteGradientGuard`; ``skipped_nonfinite_steps`` is logged), so
  one overflow under bf16 autocast cannot turn every weight into NaN;
- the loss is computed with cuDNN attention switched off (:data:`TRAINING_SDPA_BACKENDS`): its backward
  returns NaN for some padded batches on H100 / H200;
- the step never waits for the host: batches come from DataLoader workers, grouped by length
  (:class:`~ctx2param.training.sampler.LengthGroupedBatchSampler`: little padding; examples that share their
  contexts travel together so the methods make those adapters once), with their token and FLOP counts made
  in the workers (:class:`~ctx2param.training.metrics.BatchStatistics`); losses are summed on the device and
  read back only every ``logging_steps``; the frozen base runs in bf16 when training in bf16 on a GPU;
- :class:`~ctx2param.training.metrics.TrainingMonitor` keeps the time budget (``max_minutes``), writes
  ``train_log.jsonl`` and measures throughput, MFU, padding and peak memory (``train_metrics.json``,
  ``loss_curves.png`` beside the weights);
- :func:`train_method` is the one-call API; ``ctx2param train`` and the ``hub_scripts/train_*.py`` recipes
  call it.

Card data (sentence-transformers keeps its ``model_card_data`` the same way): the trainer fills
``ctx2param.hub.get_card_data(model)`` with the training settings (from ``TrainingArguments`` and the method's
loss weights), the logged losses (thinned to at most :data:`MAX_CARD_LOSS_ROWS` rows), the training time,
the hardware and the library versions, and writes it as ``card_data.json`` beside every checkpoint and the
final weights, so that ``ctx2param push`` / ``hub_scripts/publish.py`` render a card that describes the
training. Data sets are recorded by the caller (``train_method(..., datasets=[...])`` or
``get_card_data(model).add_dataset(...)``).

Multi-GPU note: the trainer calls ``training_losses`` on the unwrapped model, which is right on one device
(the GPU scripts' setting); DistributedDataParallel would need the call to go through the wrapper's forward.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Trainer, TrainingArguments

from ..cards import CardData, framework_versions
from ..environment import hardware_info, library_versions
from ..evaluation.datasets import seeded_rng
from ..file_utils import write_text_atomically
from ..hub import CARD_DATA_NAME, get_card_data
from .callbacks import NonFiniteGradientGuard
from .data import TrainingExample
from .metrics import BatchStatistics, TrainingMonitor, plot_losses
from .sampler import LengthGroupedBatchSampler

__all__ = [
    "MAX_CARD_LOSS_ROWS",
    "TRAINING_SDPA_BACKENDS",
    "ContextAdaptationTrainer",
    "TrainingExampleDataset",
    "cast_frozen_base",
    "default_training_arguments",
    "hardware_description",
    "latest_checkpoint",
    "write_training_metrics",
    "train_method",
]

#: The ``scaled_dot_product_attention`` backends that training may use: all but cuDNN attention. In
#: torch >= 2.11 on H100 / H200 (where cuDNN attention is a default backend) its backward returns NaN in the
#: query gradient when an attention mask is passed, the sequence length is 64 mod 128 and a query row is
#: fully masked (pytorch/pytorch#196678), which a left-padded student batch of width 320 meets. On an H200,
#: DyPRAG's gradient norm was NaN at five steps of 1,099, and the seeded sample order gives exactly those
#: five a 320-wide student batch. The other backends (flash, memory-efficient, math) are correct there; only
#: the choice among them is restricted.
TRAINING_SDPA_BACKENDS: tuple[SDPBackend, ...] = tuple(
    b for b in SDPBackend.__members__.values() if b not in (SDPBackend.ERROR, SDPBackend.CUDNN_ATTENTION)
)

#: Most rows of logged losses kept in the card data (evenly spaced, always the first and the last).
MAX_CARD_LOSS_ROWS = 200


class TrainingExampleDataset(torch.utils.data.Dataset):
    """A map-style dataset of :class:`TrainingExample` objects (the collator is the method's own).

    Args:
        examples: the training examples.
        max_chunks: when > 1, each question-answering example (non-empty query) gets a number of chunks
            drawn uniformly from 1..max_chunks by a generator seeded by (seed, index): the missing ones are
            contexts of other examples (distractors), inserted at random positions. The teacher then reads
            all of them, the student sums all their adapters, as in SQuAD-k evaluation. Continuation
            examples (empty query) are left as they are: a distractor would break the continuation (give
            them several chunks with ``passages_to_examples(..., random_chunks=True)``). Examples with more
            contexts than ``max_chunks`` keep them all.
        seed: seed of the chunk counts and distractors; item ``i`` is the same on every access, so a resumed
            run sees the same data.
    """

    def __init__(
        self, examples: Sequence[TrainingExample], max_chunks: int | None = None, seed: int = 0
    ) -> None:
        examples = list(examples)
        if not examples:
            raise ValueError("No training examples: give at least one TrainingExample.")
        for i, ex in enumerate(examples):
            if not isinstance(ex, TrainingExample):
                raise TypeError(
                    f"examples[{i}] is a {type(ex).__name__}, not a TrainingExample; turn passages into "
                    "examples with ctx2param.training.data.to_training_examples(...)."
                )
        if max_chunks is not None and (isinstance(max_chunks, bool) or not isinstance(max_chunks, int)):
            raise TypeError(f"max_chunks must be an int or None, got {type(max_chunks).__name__}.")
        if max_chunks is not None and max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {max_chunks}.")
        self.examples = examples
        self.max_chunks = max_chunks
        self.seed = seed

    def __len__(self) -> int:
        return len(self.examples)

    def lengths(self, tokenizer: Any = None) -> list[int]:
        """A length per item for batching by length: the tokens of its contexts, query and answer (characters
        / 4 without a tokenizer). The teacher reads about this many tokens."""
        items = [self[i] for i in range(len(self))]
        texts = [" ".join([*ex.contexts, ex.query, ex.answer]) for ex in items]
        if tokenizer is None:
            return [max(1, len(t) // 4) for t in texts]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [max(1, len(row)) for row in ids]

    def groups(self) -> list[int]:
        """A group id per item: items with the same contexts share one (several questions about one context
        set: the trainer batches them together and the method makes their adapters once)."""
        ids: dict[tuple[str, ...], int] = {}
        return [ids.setdefault(tuple(self[i].contexts), len(ids)) for i in range(len(self))]

    def __getitem__(self, index: int) -> TrainingExample:
        ex = self.examples[index]
        if not self.max_chunks or self.max_chunks < 2 or not ex.query or len(self.examples) < 2:
            return ex
        rng = seeded_rng("ctx2param/distractors", self.seed, index)
        wanted = rng.randint(1, self.max_chunks)
        contexts = list(ex.contexts)
        own = set(contexts)
        tries = 0
        while len(contexts) < wanted and tries < 8 * self.max_chunks:
            tries += 1
            other = self.examples[rng.randrange(len(self.examples))]
            candidate = other.contexts[rng.randrange(len(other.contexts))]
            if candidate in own:
                continue
            own.add(candidate)
            contexts.insert(rng.randint(0, len(contexts)), candidate)
        if len(contexts) == len(ex.contexts):
            return ex
        return TrainingExample(tuple(contexts), ex.query, ex.answer, source=ex.source)


def hardware_description(device: torch.device | str | None = None, count: int = 1) -> str:
    """What training ran on, for the card: ``"1x NVIDIA H200"``, ``"Apple MPS"`` or ``"CPU"``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{max(1, count)}x {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "Apple MPS"
    if device.type == "cpu":
        return "CPU"
    return f"{max(1, count)}x {device.type}"


def _thin(rows: Sequence[Any], limit: int) -> list[Any]:
    """At most ``limit`` evenly spaced rows, always the first and the last."""
    if len(rows) <= limit:
        return list(rows)
    if limit < 2:
        return list(rows[-1:])
    idx = sorted({round(i * (len(rows) - 1) / (limit - 1)) for i in range(limit)})
    return [rows[i] for i in idx]


def cast_frozen_base(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen base model's floating-point weights and buffers to ``dtype`` (bf16 for GPU training:
    the base then computes in bf16 without autocast recasting its weights at every matrix product).
    Quantized and non-float tensors are left alone. Returns the number of tensors cast."""
    base = model.base_lm
    cast = 0
    with torch.no_grad():
        for tensor in [*base.parameters(), *base.buffers()]:
            if (
                tensor.is_floating_point()
                and tensor.dtype != dtype
                and tensor.dtype in (torch.float32, torch.float16)
            ):
                tensor.data = tensor.data.to(dtype)
                cast += 1
    return cast


def _method_model(model: nn.Module) -> nn.Module:
    """The ctx2param model inside accelerate / DDP / compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class ContextAdaptationTrainer(Trainer):
    """``transformers.Trainer`` for ctx2param methods: the loss is ``model.training_losses(batch)["loss"]``.

    Takes the usual ``Trainer`` arguments; ``data_collator`` defaults to ``model.collate_training_examples``
    (wrapped in :class:`~ctx2param.training.metrics.BatchStatistics`) and ``args.remove_unused_columns`` must
    be False (the batch is the method's own dict). The other keys returned by ``training_losses``
    (``alignment``, ``additivity``, ...) are logged next to ``loss``.

    Args:
        model: the method model.
        args: the training arguments (:func:`default_training_arguments` gives ctx2param's defaults).
        group_by_length: batch a :class:`TrainingExampleDataset` with
            :class:`~ctx2param.training.sampler.LengthGroupedBatchSampler` (examples of similar length, and
            those that share their contexts, together); ``False``: the Trainer's own random sampler.
        megabatch: batches per sorted mega-batch of that sampler.
        max_seconds: training-time budget of this call (the run stops and checkpoints when it is spent).
        log_path: ``train_log.jsonl`` of the run (default: ``args.output_dir/train_log.jsonl``).
        **kwargs: ``transformers.Trainer`` arguments.

    Raises:
        ValueError: a parameter of the base model requires gradients (only the method's parameters train).
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        *,
        group_by_length: bool = True,
        megabatch: int = 32,
        max_seconds: float | None = None,
        log_path: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        for attr in ("training_losses", "collate_training_examples", "method_parameters", "base_lm"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"ContextAdaptationTrainer trains ctx2param methods; {type(model).__name__} lacks {attr}."
                )
        trainable_base = [n for n, p in model.base_lm.named_parameters() if p.requires_grad]
        if trainable_base:
            raise ValueError(
                f"{len(trainable_base)} parameters of the base model require gradients (e.g. "
                f"{trainable_base[:2]}); the base stays frozen: call model.base_lm.requires_grad_(False)."
            )
        if not any(p.requires_grad for p in model.method_parameters()):
            raise ValueError("The method has no trainable parameters (all have requires_grad=False).")
        if args is not None and args.remove_unused_columns:
            args.remove_unused_columns = False
        kwargs.setdefault("data_collator", BatchStatistics(model.collate_training_examples, model))
        super().__init__(model=model, args=args, **kwargs)
        if self.args.bf16 and self.args.device.type == "cuda":
            cast_frozen_base(model, torch.bfloat16)
        # training_losses returns a per-batch mean: let the Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        if hasattr(self, "loss_is_scaled_for_ga"):
            self.loss_is_scaled_for_ga = False
        self.group_by_length = group_by_length
        self.megabatch = megabatch
        self._component_sums: dict[str, torch.Tensor] = {}
        self._component_count = 0
        self._component_keys: set[str] = set()
        self._train_started: float | None = None
        self._time_before = 0.0  # training time of the run a resumed one continues
        self.counters: dict[str, float] = {}
        guards = [cb for cb in self.callback_handler.callbacks if isinstance(cb, NonFiniteGradientGuard)]
        if not guards:
            guards = [NonFiniteGradientGuard()]
            self.add_callback(guards[0])
        self.gradient_guard: NonFiniteGradientGuard = guards[0]
        default_log = Path(self.args.output_dir) / "train_log.jsonl"
        self.monitor = TrainingMonitor(self.counters, log_path or default_log, max_seconds)
        self.add_callback(self.monitor)

    # ------------------------------------------------------------------------------------------- data
    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """Batches from :class:`~ctx2param.training.sampler.LengthGroupedBatchSampler` (for a
        :class:`TrainingExampleDataset` with ``group_by_length``), else the Trainer's own loader."""
        dataset = self.train_dataset
        if not (self.group_by_length and isinstance(dataset, TrainingExampleDataset)):
            return super().get_train_dataloader()
        method = _method_model(self.model)
        sampler = LengthGroupedBatchSampler(
            dataset.lengths(getattr(method, "tokenizer", None)),
            self._train_batch_size,
            groups=dataset.groups(),
            seed=self.args.seed,
            megabatch=self.megabatch,
        )
        workers = self.args.dataloader_num_workers
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=workers > 0,  # no new worker processes (and tokenizer copies) every epoch
            prefetch_factor=(self.args.dataloader_prefetch_factor or 4) if workers > 0 else None,
        )
        return self.accelerator.prepare(loader)

    # ------------------------------------------------------------------------------------------- loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        method = _method_model(self.accelerator.unwrap_model(model))
        batch = {k: v for k, v in inputs.items() if k != "stats"}
        with self.accelerator.autocast(), sdpa_kernel(list(TRAINING_SDPA_BACKENDS)):
            losses = method.training_losses(batch)
        if "loss" not in losses:
            raise ValueError(f"{type(method).__name__}.training_losses must return a 'loss' entry.")
        loss = losses["loss"]
        if model.training:
            for key, value in losses.items():
                if key != "loss" and isinstance(value, torch.Tensor):
                    value = value.detach().float()
                    self._component_sums[key] = self._component_sums.get(key, 0) + value
                    self._component_keys.add(key)
            self._component_count += 1
        return (loss, losses) if return_outputs else loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, None, None]:
        """Evaluation: the batch's loss only (the methods have no predictions to compare)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    @torch.no_grad()
    def heldout_losses(self, dataset: torch.utils.data.Dataset | None = None) -> dict[str, float]:
        """Every loss term (``alignment`` = the held-out KL, ``state``, ``additivity``, ``specificity``, ...)
        averaged over the evaluation set's batches, with the model in eval mode (no gradient)."""
        loader = self.get_eval_dataloader(dataset)
        model = self.model
        was_training = model.training
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        batches = 0
        try:
            for inputs in loader:
                _, losses = self.compute_loss(model, self._prepare_inputs(inputs), return_outputs=True)
                for key, value in losses.items():
                    if isinstance(value, torch.Tensor):
                        sums[key] = sums.get(key, 0) + value.detach().float()
                batches += 1
        finally:
            model.train(was_training)
        return {key: float(total) / max(1, batches) for key, total in sums.items()} | {"batches": batches}

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the mean of every loss component since the last training log to the ``loss`` entries."""
        if "loss" in logs and self._component_count:
            for key, total in self._component_sums.items():
                logs[key] = round(float(total) / self._component_count, 6)
            self._component_sums = {}
            self._component_count = 0
            if self.gradient_guard.skipped_steps:
                logs["skipped_nonfinite_steps"] = self.gradient_guard.skipped_steps
        super().log(logs, *args, **kwargs)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """FLOPs of a batch, from the counts its collator made (``batch["stats"]``: no device work here);
        the batch's tokens, slots and FLOPs are added to :attr:`counters`."""
        stats = inputs.get("stats")
        if not isinstance(stats, Mapping):
            from .flops import batch_statistics

            stats = batch_statistics(_method_model(self.model), inputs)
        for key, value in stats.items():
            self.counters[key] = self.counters.get(key, 0.0) + float(value)
        return int(stats.get("flops", 0.0))

    # ------------------------------------------------------------------------------------ card data
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, timed for the card data (a resumed run adds the time its checkpoint records)."""
        self._time_before = 0.0
        checkpoint = resume_from_checkpoint
        if checkpoint is True:  # the newest *complete* checkpoint: a half-written one is skipped (warned)
            from .checkpoints import latest_complete_checkpoint

            found = latest_complete_checkpoint(self.args.output_dir, not self.args.save_only_model)
            if found is None:
                raise ValueError(f"No complete checkpoint to resume from in {self.args.output_dir}.")
            checkpoint = resume_from_checkpoint = str(found)
        if isinstance(checkpoint, (str, os.PathLike)) and (Path(checkpoint) / CARD_DATA_NAME).is_file():
            try:
                self._time_before = CardData.load(Path(checkpoint) / CARD_DATA_NAME).training_time_s or 0.0
            except ValueError:
                self._time_before = 0.0
        self._train_started = time.perf_counter()
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self.update_card_data()
            self._time_before += time.perf_counter() - self._train_started
            self._train_started = None

    def update_card_data(self) -> CardData:
        """Fill ``get_card_data(model)`` with this run's settings, losses, time, hardware and library
        versions; returns it."""
        method = _method_model(self.accelerator.unwrap_model(self.model))
        data = get_card_data(method)
        args = self.args
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
        world = max(1, int(args.world_size or 1))
        devices = world if world > 1 else max(1, int(args.n_gpu or 0))
        settings: dict[str, Any] = {
            "method": str(getattr(method.config, "method", None) or method.config.model_type),
            "learning_rate": float(args.learning_rate),
            "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "warmup_steps": int(args.warmup_steps or 0),
            "weight_decay": float(args.weight_decay),
            "max_grad_norm": float(args.max_grad_norm),
            "steps": int(self.state.global_step),
            "epochs": round(float(self.state.epoch or 0.0), 4),
            "per_device_batch_size": int(args.per_device_train_batch_size),
            "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
            "effective_batch_size": int(
                args.per_device_train_batch_size * args.gradient_accumulation_steps * devices
            ),
            "precision": precision,
            "seed": int(args.seed),
        }
        if isinstance(self.train_dataset, TrainingExampleDataset):
            settings["num_examples"] = len(self.train_dataset)
            if self.train_dataset.max_chunks:
                settings["max_chunks"] = self.train_dataset.max_chunks
        config = method.config.to_dict()
        settings.update(
            {k: v for k, v in sorted(config.items()) if k.endswith("_weight") and isinstance(v, (int, float))}
        )
        data.add_hyperparameters(**settings)
        keys = ["loss", *sorted(self._component_keys)]
        rows = []
        for entry in self.state.log_history:
            if "loss" in entry and "step" in entry:
                values = {k: float(entry[k]) for k in keys if isinstance(entry.get(k), (int, float))}
                rows.append({"step": int(entry["step"]), **values})
        data.losses = _thin(rows, MAX_CARD_LOSS_ROWS)
        elapsed = time.perf_counter() - self._train_started if self._train_started is not None else 0.0
        data.training_time_s = round(self._time_before + elapsed, 3)
        data.hardware = hardware_description(args.device, devices)
        data.framework_versions = framework_versions()
        return data

    def write_card_data(self, folder: str | os.PathLike) -> Path:
        """Update the card data and write it to ``folder/card_data.json`` (atomically)."""
        return self.update_card_data().save(Path(folder) / CARD_DATA_NAME)

    # ------------------------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        """``Trainer._save`` (the method's weights only), plus ``card_data.json`` beside them."""
        super()._save(output_dir, state_dict=state_dict)
        self.write_card_data(output_dir if output_dir is not None else self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load the method's weights from a checkpoint folder (no base weights are in it or expected)."""
        target = _method_model(self.accelerator.unwrap_model(model if model is not None else self.model))
        target.load_method_weights(resume_from_checkpoint)


def default_training_arguments(output_dir: str | os.PathLike, **overrides: Any) -> TrainingArguments:
    """``TrainingArguments`` with ctx2param's defaults (overridable): lr 1e-4, batch 4, log every step, no
    reporting integrations, a checkpoint every 500 steps (2 kept), cosine schedule, gradient clipping 1,
    fused AdamW (so that the non-finite-gradient guard never waits for the device), and no per-step NaN check
    of the loss (a host sync every step; the guard catches non-finite gradients instead)."""
    defaults: dict[str, Any] = {
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-4,
        "weight_decay": 0.0,
        "lr_scheduler_type": "cosine",
        "max_grad_norm": 1.0,
        "logging_steps": 1,
        "save_steps": 500,
        "save_total_limit": 2,
        "report_to": "none",
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),
        "optim": "adamw_torch_fused",
        "logging_nan_inf_filter": False,
    }
    defaults.update(overrides)
    if defaults.get("dataloader_pin_memory") and "accelerator_config" not in defaults:
        # pinned batches copied without blocking: a blocking copy would wait for the step before it
        defaults["accelerator_config"] = {"non_blocking": True}
    return TrainingArguments(output_dir=str(output_dir), **defaults)


def train_method(
    model: nn.Module,
    examples: Sequence[TrainingExample] | torch.utils.data.Dataset,
    output_dir: str | os.PathLike,
    *,
    max_chunks: int | None = None,
    chunk_seed: int = 0,
    eval_examples: Sequence[TrainingExample] | None = None,
    resume_from_checkpoint: str | bool | None = None,
    callbacks: list[Any] | None = None,
    datasets: Sequence[str | Mapping[str, Any]] | None = None,
    max_minutes: float | None = None,
    group_by_length: bool = True,
    megabatch: int = 32,
    **training_args: Any,
) -> ContextAdaptationTrainer:
    """Train a ctx2param method on examples and save its weights to ``output_dir``; returns the trainer.

    Args:
        model: a method model (``CompAsModel.from_base(...)`` or one loaded with ``from_pretrained`` to
            fine-tune a released generator); only its own parameters are trained.
        examples: :class:`TrainingExample` objects (or a ready dataset).
        output_dir: checkpoints go to ``output_dir/checkpoint-<step>``; the final weights and config to
            ``output_dir`` itself (loadable with ``AutoModelForContextAdaptation.from_pretrained``), beside
            ``train_log.jsonl`` (one line per log), ``train_metrics.json`` (this call's throughput, MFU,
            padding and peak memory, and the earlier calls' of a resumed run) and ``loss_curves.png``.
        max_chunks: see :class:`TrainingExampleDataset`.
        chunk_seed: seed of the data's chunk counts and distractors (the Trainer's own ``seed``, of data
            order and initialisation-free randomness, is a training argument).
        eval_examples: optional held-out examples: after training, every loss term on them (the held-out KL
            among them) goes into ``trainer.metrics["heldout"]`` and ``train_metrics.json``.
        resume_from_checkpoint: a checkpoint folder, or True for the latest one in ``output_dir``.
        callbacks: Trainer callbacks.
        datasets: training data for the model card: names, or ``CardData.add_dataset`` arguments
            (``{"name": "CoQA", "id": "stanfordnlp/coqa", "num_examples": 7983, "license": "..."}``).
            Recorded in ``get_card_data(model)``, which the trainer also fills with settings, losses, time
            and hardware and writes as ``card_data.json`` beside every checkpoint and the final weights.
        max_minutes: training-time budget of this call; when it is spent the run checkpoints and stops (a
            later call with ``resume_from_checkpoint=True`` continues exactly).
        group_by_length, megabatch: see :class:`ContextAdaptationTrainer`.
        **training_args: any ``transformers.TrainingArguments`` field (``max_steps``, ``num_train_epochs``,
            ``learning_rate``, ``per_device_train_batch_size``, ``bf16``, ``save_steps``, ...).

    Example:
        >>> trainer = train_method(model, examples, "out/", max_steps=200, learning_rate=3e-4)
        >>> trainer.metrics["tokens_per_s"], trainer.state.log_history[-1]
    """
    training_args.setdefault(
        "per_device_eval_batch_size", training_args.get("per_device_train_batch_size", 4)
    )
    args = default_training_arguments(output_dir, **training_args)
    get_card_data(_method_model(model)).add_datasets(datasets or ())
    if isinstance(examples, torch.utils.data.Dataset):
        dataset = examples
    else:
        dataset = TrainingExampleDataset(examples, max_chunks=max_chunks, seed=chunk_seed)
    eval_dataset = TrainingExampleDataset(eval_examples) if eval_examples else None
    trainer = ContextAdaptationTrainer(
        model,
        args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        callbacks=callbacks,
        group_by_length=group_by_length,
        megabatch=megabatch,
        max_seconds=None if max_minutes is None else 60.0 * max_minutes,
    )
    if resume_from_checkpoint is True:
        found = latest_checkpoint(args.output_dir, not args.save_only_model)
        resume_from_checkpoint = str(found) if found is not None else None
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.metrics = trainer.monitor.summary(args.device)
    trainer.metrics.update(
        {
            "global_step": int(trainer.state.global_step),
            "resumed_from": resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None,
            "skipped_nonfinite_steps": trainer.gradient_guard.skipped_steps,
            "batch_size": int(args.per_device_train_batch_size),
            "examples": len(dataset),
            "parameters": int(_method_model(trainer.model).num_method_parameters()),
            "hardware": hardware_info(args.device),
            "versions": library_versions(),
        }
    )
    if eval_dataset is not None:
        trainer.metrics["heldout"] = trainer.heldout_losses(eval_dataset)
        trainer.metrics["heldout"]["examples"] = len(eval_dataset)
    if args.should_save:
        out = Path(args.output_dir)
        _method_model(trainer.model).save_pretrained(out)
        trainer.write_card_data(out)
        write_training_metrics(out / TRAIN_METRICS_NAME, trainer.metrics)
        method = _method_model(trainer.model)
        title = f"{type(method).__name__.removesuffix('Model')} training losses"
        plot_losses(trainer.monitor.log_path, out / "loss_curves.png", title)
    return trainer


#: The metrics file :func:`train_method` writes beside the weights.
TRAIN_METRICS_NAME = "train_metrics.json"


def write_training_metrics(path: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write ``{"latest": metrics, "calls": [... every call's metrics]}`` atomically (a resumed run appends
    its call to those of the runs it continues)."""
    path = Path(path)
    calls: list[Any] = []
    if path.is_file():
        try:
            calls = list(json.loads(path.read_text(encoding="utf-8")).get("calls", []))
        except (ValueError, AttributeError):
            calls = []
    calls.append(dict(metrics))
    return write_text_atomically(
        path, json.dumps({"latest": dict(metrics), "calls": calls}, indent=2, default=str) + "\n"
    )


def latest_checkpoint(output_dir: str | os.PathLike, require_optimizer: bool = True) -> Path | None:
    """The newest *complete* ``checkpoint-<step>`` folder of ``output_dir`` (None when there is none): a
    half-written one is skipped with a warning (:func:`.checkpoints.latest_complete_checkpoint`)."""
    from .checkpoints import latest_complete_checkpoint

    return latest_complete_checkpoint(output_dir, require_optimizer)
