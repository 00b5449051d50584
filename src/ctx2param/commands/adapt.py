"""``ctx2param adapt``: generate one adapter per context file, compose them with weights, save the result."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_model_arguments, load_model, read_text_file


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "adapt",
        help="turn context files into one adapter",
        description="Generate an adapter from each context file with a trained generator, combine them "
        "(sum_i w_i * adapter_i) and save the result, in ctx2param's format or as a PEFT LoRA folder.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--context", "-c", nargs="+", required=True, metavar="FILE", help="UTF-8 text files ('-': stdin)"
    )
    parser.add_argument(
        "--weights", "-w", nargs="+", type=float, metavar="W", help="one weight per context (default: all 1)"
    )
    parser.add_argument("--compress", type=int, metavar="RANK", help="compress the result to this rank")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="folder to write the adapter to")
    parser.add_argument(
        "--format", choices=("ctx2param", "peft"), default="ctx2param", help="adapter file format"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="contexts per generator pass (default 8)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..adapter import ContextAdapter, compose

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
    adapters: list[ContextAdapter] = []
    for start in range(0, len(texts), args.batch_size):
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
