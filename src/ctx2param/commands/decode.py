"""``ctx2param decode``: read the context back out of an adapter with a CompAs generator's decoder."""

from __future__ import annotations

import argparse

from . import add_model_arguments, forward_progress, load_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "decode",
        help="print the context recovered from an adapter (CompAs)",
        description="Load an adapter (a ctx2param or PEFT LoRA folder, or a Hub id) and the generator that "
        "made it, and print the text its decoder reads out of ΔW (greedy decoding). A sum of adapters "
        "decodes to what the decoder makes of the summed features: a mix of the pieces' content.",
    )
    parser.add_argument("adapter", metavar="ADAPTER_DIR", help="adapter folder or Hub id")
    add_model_arguments(parser)
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="most tokens to write (default: the decoder's training length)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..adapter import ContextAdapter
    from ..errors import Ctx2ParamError

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    adapter = ContextAdapter.from_pretrained(args.adapter)  # fail on a bad folder before loading a model
    model = load_model(args)
    if not callable(getattr(model, "decode_context", None)):
        raise Ctx2ParamError(
            f"The generator {args.model} ({model.config.method}) has no decoder: only CompAs generators read "
            "context back out of adapters."
        )
    total = args.max_new_tokens or int(getattr(model.config, "decoder_max_tokens", 0) or 1)
    with forward_progress(model.base_lm, total, "decoding"):  # one forward of the base per token
        text = model.decode_context(adapter, max_new_tokens=args.max_new_tokens)
    if isinstance(text, list):  # a batched adapter file: one text per adapter
        for i, item in enumerate(text):
            print(f"[{i}] {item}")
    else:
        print(text)
    return 0
