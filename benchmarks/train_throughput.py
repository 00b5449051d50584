"""Training throughput of every method through the one trainer: tokens/s, MFU, GPU busy, kernels per step.

Each method trains alone, for ``--seconds`` of training time, at its production settings (read from its
recipe in ``hub_scripts/``: generator config, batch, learning rate) through ``train_method`` — the code
``ctx2param train`` and the recipes run. CompAs and DyPRAG read ``--data`` (a training JSONL); StreamAdapter
reads its recipe's mix of demonstrations and continuation (``--stream-examples`` per source). Counted as the
trainer counts them:

- ``tokens_per_s``: every token any pass of a step reads (generator over the chunks and additivity pairs,
  teacher, student), over the steady window (the first logged steps, warm-up, left out);
- ``mfu``: the step's model FLOPs (``ctx2param.training.flops``) per second over the dense bf16 peak of
  ``ctx2param.training.flops.PEAK_BF16_FLOPS``;
- ``gpu_busy``: mean utilisation that NVML reports while it trains (after the first 15 s);
- ``padding_fraction``: padded share of the token slots the passes computed; ``peak_gib``: peak allocated;
- ``kernels_per_step`` and ``profile``: a ``torch.profiler`` trace of ``--profile-steps`` training steps on
  one batch after the timed run: kernels launched per step, and device time per part of the step (the
  ``ctx2param.*`` ranges the methods mark: generator, teacher, student, additivity; backward; optimizer). On
  the CPU the count is of operators (there are no kernels) and the times are CPU times.

With ``--random-init CONFIG_DIR`` the base model is built from a ``config.json`` (and tokenizer) with
random weights of that architecture: a step's work does not depend on the weights' values, so the
throughput of SmolLM2-135M's shape can be measured before its weights are on the machine.

Usage:
    python benchmarks/train_throughput.py --base BASE_DIR --data runs/responses.jsonl --device cuda \\
        --seconds 130 --out benchmarks/results/train_throughput_cuda.json
    python benchmarks/train_throughput.py --tiny --device cpu --seconds 20 \\
        --out benchmarks/results/train_throughput_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import _common  # noqa: E402
import torch  # noqa: E402

METHODS = ("compas", "dyprag", "stream_adapter")
PARTS = ("ctx2param.generator", "ctx2param.teacher", "ctx2param.student", "ctx2param.additivity")


def load_recipe(name: str) -> Any:
    """A recipe module of ``hub_scripts/`` (its settings are the production settings)."""
    path = ROOT / "hub_scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ the base
def load_base(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, Any, str]:
    """The base model (bf16 on CUDA), its tokenizer and a description."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        from ctx2param.testing_utils import tiny_model, tiny_tokenizer

        return tiny_model("llama").to(device), tiny_tokenizer(), "tiny random Llama (ctx2param.testing_utils)"
    if args.random_init:
        config = AutoConfig.from_pretrained(args.random_init)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(args.random_init)
        return model, tokenizer, f"random weights of the architecture in {args.random_init}"
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype).to(device)
    return model, AutoTokenizer.from_pretrained(args.base), str(args.base)


# ---------------------------------------------------------------------------------------------- the method
def build(method: str, base: torch.nn.Module, tokenizer: Any, args: argparse.Namespace) -> tuple[Any, dict]:
    """The method model with its recipe's settings, and the training settings of the run."""
    if method in ("compas", "dyprag"):
        recipe = load_recipe("train_compas")
        settings = dict(recipe.SETTINGS[method])
        training = {"batch": args.batch or recipe.TRAINING["batch_size"], "lr": recipe.TRAINING["lr"]}
    else:
        recipe = load_recipe("train_stream_adapter")
        settings = dict(getattr(recipe, "SETTINGS", {}))
        training = dict(getattr(recipe, "TRAINING", {}))
        training = {"batch": args.batch or training.get("batch_size", 32), "lr": training.get("lr", 1e-3)}
    if args.tiny:
        settings = {k: v for k, v in settings.items() if k not in ("target_modules",)}
        settings.update(tiny_settings(method))
    from ctx2param.commands.train import training_methods

    config_class, model_class = training_methods()[method.replace("_", "-")]
    model = model_class.from_base(base, config_class(**settings), tokenizer=tokenizer)
    return model, {"config": settings, **training}


def tiny_settings(method: str) -> dict[str, Any]:
    from ctx2param.testing_utils import TARGET_MODULES

    small = {"target_modules": TARGET_MODULES["llama"], "chunk_tokens": 48}
    if method == "compas":
        return {**small, "latent_dim": 32, "num_attention_heads": 2, "head_dim": 16, "decoder_hidden": 32}
    if method == "dyprag":
        return {**small, "translator_hidden": 16}
    return {**small, "state_dim": 16}


def examples_for(method: str, model: Any, args: argparse.Namespace) -> list[Any]:
    from ctx2param.commands.train import load_training_examples

    if method == "stream_adapter" and args.stream_data:  # the recipe's mix, exported (stream_mix)
        return load_training_examples(args.stream_data, model.tokenizer, max_chunks=1, seed=0)
    if method == "stream_adapter":  # the recipe's mix: seen-task demonstrations and passage continuation
        recipe = load_recipe("train_stream_adapter")
        data = recipe.DATA
        sources = [f"demos-{task}" for task in recipe.SEEN_TASKS] + ["passages"]
        return load_training_examples(
            sources, model.tokenizer, max_chunks=1, seed=0, max_examples=args.stream_examples,
            demo_k=[int(k) for k in str(data["demo_k"]).split(",")], demo_draws=int(data["demo_draws"]),
            context_tokens=int(data["context_tokens"]), target_tokens=int(data["target_tokens"]),
        )  # fmt: skip
    if not args.data:  # the tiny CPU run: a small synthetic QA mix, 1-4 passages each
        return synthetic_examples()
    # the responses' examples carry their context sets: no distractors are added (max_chunks=1)
    return load_training_examples(args.data, model.tokenizer, max_chunks=1, seed=0)


def synthetic_examples(n: int = 256) -> list[Any]:
    from ctx2param.training.data import TrainingExample

    words = ["red", "green", "blue", "amber", "violet", "silver", "golden", "copper", "ivory", "black"]
    out = []
    for i in range(n):
        passages = tuple(
            f"Item {i}-{j} is kept in the {words[(i + j) % 10]} room on floor {(i * 7 + j) % 9}. "
            + " ".join(words[(i + j + t) % 10] for t in range(3 + (i + j) % 20))
            for j in range(1 + i % 4)
        )
        out.append(
            TrainingExample(passages, f"Question: where is item {i}-0?\nAnswer:", f"the {words[i % 10]} room")
        )
    return out


# ------------------------------------------------------------------------------------------ measurements
class UtilisationSampler:
    """GPU utilisation (NVML, or nvidia-smi) sampled every ``interval`` seconds in a thread."""

    def __init__(self, device: torch.device, interval: float = 0.5) -> None:
        self.device, self.interval = device, interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.source = None

    def _reader(self) -> Any:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)
            self.source = "nvml"
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # noqa: BLE001 - no NVML: fall back to nvidia-smi
            import subprocess

            def smi() -> float:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5, check=True,
                )  # fmt: skip
                return float(out.stdout.split()[self.device.index or 0])

            self.source = "nvidia-smi"
            return smi

    def __enter__(self) -> UtilisationSampler:
        if self.device.type != "cuda":
            return self
        read = self._reader()
        start = time.perf_counter()

        def loop() -> None:
            while not self._stop.is_set():
                with contextlib.suppress(Exception):  # a failed read is a missing sample
                    self.samples.append((time.perf_counter() - start, read()))
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def mean(self, after_s: float = 15.0) -> float | None:
        values = [u for t, u in self.samples if t >= after_s] or [u for _, u in self.samples]
        return sum(values) / len(values) / 100.0 if values else None


def profile_steps(model: Any, batch: dict[str, Any], steps: int, device: torch.device, lr: float) -> dict:
    """Kernels (operators on the CPU) per training step and time by part, from ``torch.profiler``."""
    from torch.nn.attention import sdpa_kernel
    from torch.profiler import ProfilerActivity, profile, record_function

    from ctx2param.training.trainer import TRAINING_SDPA_BACKENDS

    params = [p for p in model.method_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast, sdpa_kernel(list(TRAINING_SDPA_BACKENDS)), record_function("ctx2param.forward"):
            loss = model.training_losses(batch)["loss"]
        with record_function("ctx2param.backward"):
            loss.backward()
        with record_function("ctx2param.optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    _common.sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    wall = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _common.sync(device)
    wall = (time.perf_counter() - wall) / steps
    events = prof.events()
    if device.type == "cuda":
        kernels = sum(1 for e in events if e.device_type.name == "CUDA")
    else:
        kernels = sum(
            1
            for e in events
            if e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))
        )
    parts = {}
    for avg in prof.key_averages():
        if avg.key.startswith("ctx2param."):
            device_us = getattr(avg, "device_time_total", None) or getattr(avg, "cuda_time_total", 0)
            parts[avg.key.removeprefix("ctx2param.")] = {
                "cpu_ms_per_step": avg.cpu_time_total / 1000 / steps,
                "device_ms_per_step": device_us / 1000 / steps if device.type == "cuda" else None,
            }
    top = sorted(
        (
            {
                "name": a.key[:80],
                "calls_per_step": a.count / steps,
                "device_ms_per_step": (getattr(a, "self_device_time_total", 0) or 0) / 1000 / steps,
            }
            for a in prof.key_averages()
            if device.type == "cuda" and (getattr(a, "self_device_time_total", 0) or 0) > 0
        ),
        key=lambda row: -row["device_ms_per_step"],
    )[:15]
    return {
        "steps": steps,
        "wall_ms_per_step": wall * 1000,
        "kernels_per_step": kernels / steps,
        "counted": "CUDA kernels" if device.type == "cuda" else "top-level aten operators (CPU)",
        "parts": parts,
        "top_kernels": top,
    }


def measure(method: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from ctx2param.training.trainer import train_method

    base, tokenizer, base_name = load_base(args, device)
    model, settings = build(method, base, tokenizer, args)
    model.to(device)
    examples = examples_for(method, model, args)
    size = model.num_method_parameters()
    print(f"[{method}] {len(examples)} examples, batch {settings['batch']}, {size:,} parameters", flush=True)
    with tempfile.TemporaryDirectory() as tmp, UtilisationSampler(device) as sampler:
        trainer = train_method(
            model, examples, tmp, max_minutes=args.seconds / 60.0, max_steps=10**7,
            per_device_train_batch_size=settings["batch"], learning_rate=settings["lr"], warmup_steps=20,
            bf16=device.type == "cuda", use_cpu=device.type != "cuda", logging_steps=args.logging_steps,
            save_steps=10**9, dataloader_num_workers=args.workers if device.type == "cuda" else 0,
            disable_tqdm=True, seed=0,
        )  # fmt: skip
        metrics = dict(trainer.metrics)
        loader = trainer.get_train_dataloader()
        batch = next(iter(loader))
    batch = {k: v for k, v in batch.items() if k != "stats"}
    profile = profile_steps(model, batch, args.profile_steps, device, settings["lr"])
    totals = metrics.get("totals", {})
    steps = max(1, metrics.get("steps", 1))
    result = {
        "tokens_per_s": metrics["tokens_per_s"],
        "context_tokens_per_s": metrics["context_tokens_per_s"],
        "mfu": metrics["mfu"],
        "gpu_busy": sampler.mean(),
        "gpu_busy_source": sampler.source,
        "kernels_per_step": profile["kernels_per_step"],
        "padding_fraction": metrics["padding_fraction"],
        "peak_gib": metrics["peak_memory_gib"],
        "batch": settings["batch"],
        "settings": {
            **settings,
            "base": base_name,
            "workers": args.workers,
            "logging_steps": args.logging_steps,
        },
        "steps": metrics["steps"],
        "train_seconds": metrics["seconds"],
        "window": metrics["window"],
        "tokens_per_step": totals.get("tokens", 0.0) / steps,
        "examples_per_step": totals.get("examples", 0.0) / steps,
        "flops_per_step_by_part": {
            k.removeprefix("flops_"): v / steps for k, v in totals.items() if k.startswith("flops_")
        },
        "skipped_nonfinite_steps": metrics["skipped_nonfinite_steps"],
        "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "profile": profile,
    }
    del trainer, model, base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="base model folder")
    p.add_argument("--random-init", metavar="CONFIG_DIR", help="random weights of this config's architecture")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama and synthetic data (CPU check)")
    p.add_argument("--data", nargs="+", help="training JSONL for CompAs and DyPRAG")
    p.add_argument(
        "--stream-examples", type=int, default=2000, help="StreamAdapter: examples per source of its mix"
    )
    p.add_argument(
        "--stream-data", nargs="+", help="StreamAdapter: its mix as JSONL (--export-stream-mix wrote it)"
    )
    p.add_argument(
        "--export-stream-mix", metavar="FILE", help="write StreamAdapter's recipe mix as JSONL and exit"
    )
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seconds", type=float, default=130.0, help="training time per method")
    p.add_argument("--batch", type=int, help="override the recipes' batch size")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--logging-steps", type=int, default=20)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.export_stream_mix:  # on a machine with the evaluation data (the passages' contamination check)
        from transformers import AutoTokenizer

        from ctx2param.training.data import save_jsonl

        tokenizer = AutoTokenizer.from_pretrained(args.random_init or args.base)
        examples = examples_for("stream_adapter", argparse.Namespace(tokenizer=tokenizer), args)
        save_jsonl(examples, args.export_stream_mix)
        print(f"wrote {len(examples)} StreamAdapter examples to {args.export_stream_mix}")
        return 0
    if not (args.base or args.random_init or args.tiny):
        p.error("give --base, --random-init or --tiny")
    if not args.out:
        p.error("--out is required")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    report: dict[str, Any] = {"methods": {}, "complete": False}
    if out.is_file():  # a run split over calls: keep the methods measured before
        previous = json.loads(out.read_text())
        report["methods"] = previous.get("methods", {})
    load_before = _common.load_average()
    from ctx2param.environment import hardware_info, library_versions
    from ctx2param.file_utils import write_text_atomically

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        if method not in METHODS:
            p.error(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        report["methods"][method] = measure(method, args, device)
        report.update({"hardware": hardware_info(device), "versions": library_versions()})
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(out, json.dumps(report, indent=2, default=str) + "\n")  # after every method
        row = report["methods"][method]
        print(f"[{method}] {row['tokens_per_s']:,.0f} tokens/s", flush=True)
    report["complete"] = all(m in report["methods"] for m in METHODS)
    report["load_average"] = {"before": load_before, "after": _common.load_average()}
    write_text_atomically(out, json.dumps(report, indent=2, default=str) + "\n")
    print("\n| method | tokens/s | MFU | GPU busy | kernels/step | padding | peak GiB | batch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in report["methods"].items():
        mfu = f"{100 * row['mfu']:.1f} %" if row.get("mfu") else "n/a"
        busy = f"{100 * row['gpu_busy']:.0f} %" if row.get("gpu_busy") is not None else "n/a"
        pad = f"{100 * row['padding_fraction']:.1f} %" if row.get("padding_fraction") is not None else "n/a"
        peak = f"{row['peak_gib']:.1f}" if row.get("peak_gib") else "n/a"
        cells = [f"{row['tokens_per_s']:,.0f}", mfu, busy, f"{row['kernels_per_step']:,.0f}", pad, peak]
        print(f"| {name} | " + " | ".join(cells) + f" | {row['batch']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
