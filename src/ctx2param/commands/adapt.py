"""``ctx2param adapt``: generate one adapter per context file, compose them with weights, save the result;
or, with ``--corpus FILE.jsonl``, one adapter per record of a corpus into an adapter store
(:func:`ctx2param.corpus.adapt_corpus`: batched, resumable, shared by ``accelerate launch`` processes)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..errors import Ctx2ParamError
from . import add_model_arguments, load_model, progress_enabled, read_text_file


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "adapt",
        help="turn context files into one adapter",
        description="Generate an adapter from each context file with a trained generator, combine them "
        "(sum_i w_i * adapter_i) and save the result, in ctx2param's format or as a PEFT LoRA folder. With "
        "--corpus, make one adapter per record of a JSON Lines corpus into an adapter store instead "
        "(AdapterStore(DIR)); records already stored are skipped, so a stopped run is continued by running "
        "the same command again; under `accelerate launch` the processes share the work.",
    )
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--context", "-c", nargs="+", metavar="FILE", help="UTF-8 text files ('-': stdin)")
    source.add_argument(
        "--corpus",
        metavar="FILE.jsonl",
        help='JSON Lines, one {"id": ..., "text": ...} per line: one adapter per record, stored in --out',
    )
    parser.add_argument(
        "--weights", "-w", nargs="+", type=float, metavar="W", help="one weight per context (default: all 1)"
    )
    parser.add_argument("--compress", type=int, metavar="RANK", help="compress the result to this rank")
    parser.add_argument(
        "--out", "-o", required=True, metavar="DIR", help="folder to write the adapter (or the store) to"
    )
    parser.add_argument(
        "--format",
        choices=("ctx2param", "peft"),
        default=None,
        help="adapter file format (default ctx2param)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="contexts per generator pass (default 8)")
    corpus = parser.add_argument_group("corpus (--corpus)")
    corpus.add_argument(
        "--update",
        action="store_true",
        help="make records whose text changed since they were stored again (default: that is an error)",
    )
    corpus.add_argument(
        "--shard-mb", type=int, default=256, metavar="MB", help="size of each shard file (default 256)"
    )
    corpus.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..adapter import ContextAdapter, compose

    if args.corpus is not None:
        return run_corpus(args)
    for flag, value in (("--update", args.update), ("--no-progress", args.no_progress)):
        if value:
            raise ValueError(f"{flag} applies to --corpus.")
    args.format = args.format or "ctx2param"

    weights = args.weights if args.weights is not None else [1.0] * len(args.context)
    if len(weights) != len(args.context):
        raise ValueError(
            f"--weights has {len(weights)} values for {len(args.context)} context files; give one per file."
        )
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.compress is not None and args.compress < 1:
        raise ValueError(f"--compress must be a positive rank, got {args.compress}.")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is a file.")
    texts = [read_text_file(path) for path in args.context]  # read all first: fail before loading a model
    model = load_model(args)
    from tqdm.auto import tqdm

    adapters: list[ContextAdapter] = []
    starts = range(0, len(texts), args.batch_size)
    for start in tqdm(starts, desc="generating adapters", unit="batch", disable=not progress_enabled()):
        adapters += model.generate_adapter(texts[start : start + args.batch_size])
    adapters = [a.detach() for a in adapters]
    result = compose(adapters, weights)
    if args.compress is not None:
        result = result.compress(args.compress)
    result = ContextAdapter(
        dict(result.items()),
        result.base_model,
        result.base_revision,
        {
            "generator": str(args.model),
            "method": model.config.method,
            "contexts": [Path(p).name for p in args.context],
            "weights": weights,
        },
    )
    folder = result.save_pretrained(out, format=args.format)
    print(
        f"wrote a {args.format} adapter to {folder}: {len(result)} modules, rank {result.rank}, "
        f"{result.num_parameters():,} parameters, from {len(texts)} context(s)"
    )
    return 0


def process_state(args: argparse.Namespace) -> Any:
    """``accelerate.PartialState`` when this is one of several processes (``accelerate launch``, which sets
    ``WORLD_SIZE``), else ``None`` (one process; accelerate's global state is left alone).

    On the CPU (``--device`` unset or ``cpu``) the processes talk through gloo. With ``--device cuda`` (or
    ``auto``) each process takes the GPU of its local rank.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched <= 1:
        return None
    from accelerate import PartialState

    device = args.device or "cpu"
    state = PartialState(cpu=device.startswith("cpu"))
    if state.num_processes == 1:
        raise Ctx2ParamError(
            f"This is one of {launched} processes, but accelerate set up no process group for --device "
            f"{device}: on a machine without GPUs use --device cpu."
        )
    if state.num_processes > 1 and device in ("cuda", "auto"):
        args.device = f"cuda:{state.local_process_index}"
    return state


def run_corpus(args: argparse.Namespace) -> int:
    """``--corpus``: one adapter per record into the adapter store ``--out``."""
    from ..corpus import adapt_corpus, changed_records, check_store_folder, read_corpus
    from ..store import HEADER_NAME, read_view

    for flag, value in (
        ("--weights", args.weights),
        ("--compress", args.compress),
        ("--format", args.format),
    ):
        if value is not None:
            raise ValueError(f"{flag} applies to --context; --corpus stores one adapter per record.")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.shard_mb < 1:
        raise ValueError(f"--shard-mb must be at least 1, got {args.shard_mb}.")
    records = read_corpus(args.corpus)  # fail on a bad corpus, or changed texts, before loading a model
    check_store_folder(args.out)
    if (Path(args.out) / HEADER_NAME).is_file():
        stored = read_view(args.out).records
        changed_records(records, {i: e["content_sha256"] for i, e in stored.items()}, args.out, args.update)
    state = process_state(args)
    model = load_model(args)
    result = adapt_corpus(
        model,
        records,
        args.out,
        batch_size=args.batch_size,
        update=args.update,
        max_shard_bytes=args.shard_mb * 2**20,
        progress=not args.no_progress,
        state=state,
        generator_name=str(args.model),
    )
    if state is None or state.is_main_process:
        remade = f" ({result.remade} of them for changed texts)" if result.remade else ""
        processes = f" in {state.num_processes} processes" if state is not None else ""
        print(
            f"stored {result.made} new adapter(s){remade} in {args.out}{processes}; "
            f"{result.skipped} record(s) "
            f"were already there; the store holds {result.store_records} record(s)"
        )
    return 0
