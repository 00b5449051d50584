"""Subcommands of the ``ctx2param`` command, one module each, discovered by :mod:`ctx2param.cli`.

A command module defines ``register(subparsers)``, which adds its parser (``subparsers.add_parser(name,
help=...)``) and sets ``func`` (``args -> int | None``) with ``set_defaults``. Import heavy libraries
inside ``func``, not at module level, so that ``ctx2param --help`` stays fast. Raise
:class:`~ctx2param.errors.Ctx2ParamError`, ``ValueError`` or ``OSError`` for bad input: the command line
prints them as ``error: ...`` without a traceback.

The helpers here are shared by the commands that load a generator (``adapt``, ``decode``, ``eval``).
Wherever a model goes (``--model``, ``--base``), the name ``smollm2`` means the bundled SmolLM2-135M-Instruct
(:func:`ctx2param.testing_utils.resolve_model_name`). Long steps (loading, decoding) report progress on
standard error when it is a terminal (or when ``CTX2PARAM_PROGRESS=1``; ``0`` turns it off).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ContextError

__all__ = [
    "add_model_arguments",
    "base_load_kwargs",
    "forward_progress",
    "load_model",
    "progress_enabled",
    "quantization_config",
    "read_text_file",
    "resolve_model_arguments",
    "status",
    "torch_dtype",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """Add ``--model``, ``--base``, ``--revision``, ``--dtype``, ``--device`` and ``--quantize``."""
    group = parser.add_argument_group("generator")
    group.add_argument(
        "--model", "-m", required=required, metavar="ID_OR_DIR", help="generator: Hub id or local folder"
    )
    group.add_argument(
        "--base",
        metavar="ID_OR_DIR",
        help="base model to adapt (default: the one the generator's config names; 'smollm2': the bundled "
        "SmolLM2-135M-Instruct)",
    )
    group.add_argument("--revision", help="revision (branch, tag, commit) of the generator repository")
    group.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of the base model")
    group.add_argument(
        "--device", default=None, help="device map of the base model: cpu, cuda, cuda:1, auto (default: cpu)"
    )
    group.add_argument(
        "--quantize",
        choices=("4bit", "8bit"),
        default=None,
        help="load the base model quantized with bitsandbytes (nf4 or int8)",
    )


def torch_dtype(name: str | None) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``None`` and ``"auto"`` pass through."""
    if name is None or name == "auto":
        return name
    import torch

    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; choose one of {', '.join(DTYPES)}.")
    return getattr(torch, name)


def quantization_config(kind: str | None, dtype: Any = None) -> Any:
    """A transformers ``BitsAndBytesConfig`` for ``"4bit"`` (nf4) or ``"8bit"``, or ``None``."""
    if kind is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        compute = dtype if isinstance(dtype, torch.dtype) else torch.float32
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"Unknown quantization {kind!r}; use 4bit or 8bit.")


def base_load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments of the base model from the :func:`add_model_arguments` options:
    ``dtype``, ``device_map`` and ``quantization_config``, each only when given."""
    dtype = torch_dtype(args.dtype)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if args.device:
        kwargs["device_map"] = args.device
    quant = quantization_config(args.quantize, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    return kwargs


def progress_enabled() -> bool:
    """Whether to report progress: standard error is a terminal, or ``CTX2PARAM_PROGRESS=1``."""
    forced = os.environ.get("CTX2PARAM_PROGRESS", "")
    if forced:
        return forced not in ("0", "false", "no")
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def status(message: str) -> None:
    """One progress line on standard error (when :func:`progress_enabled`)."""
    if progress_enabled():
        print(message, file=sys.stderr, flush=True)


def resolve_model_arguments(args: argparse.Namespace, names: tuple[str, ...] = ("model", "base")) -> None:
    """Replace the name ``smollm2`` in the options ``names`` with the bundled model's folder (in place)."""
    from ..testing_utils import SMOLLM2_ALIAS, resolve_model_name, smollm2_is_converted

    for name in names:
        value = getattr(args, name, None)
        if not isinstance(value, str) or value.strip().lower() != SMOLLM2_ALIAS or Path(value).exists():
            continue
        if not smollm2_is_converted():
            status(
                "preparing the bundled SmolLM2-135M-Instruct (converted once from its GGUF, about 20 s) ..."
            )
        setattr(args, name, resolve_model_name(value))


def load_model(args: argparse.Namespace) -> Any:
    """Load the generator named by the :func:`add_model_arguments` options (and its base model)."""
    from ..auto import AutoModelForContextAdaptation

    resolve_model_arguments(args)
    start = time.perf_counter()
    status(f"loading the generator {args.model} and its base model{f' {args.base}' if args.base else ''} ...")
    model = AutoModelForContextAdaptation.from_pretrained(
        args.model, base_model=args.base, revision=args.revision, **base_load_kwargs(args)
    )
    status(f"loaded in {time.perf_counter() - start:.1f} s")
    return model


@contextlib.contextmanager
def forward_progress(module: Any, total: int, desc: str) -> Iterator[None]:
    """A progress bar on standard error that advances with every forward pass of ``module`` (one per
    generated token in a decoding loop); shown when :func:`progress_enabled`."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, disable=not progress_enabled())

    def tick(*_: Any) -> None:  # returns None: the module's output stays as it is
        if bar.n < total:
            bar.update(1)

    handle = module.register_forward_hook(tick)
    try:
        yield
    finally:
        handle.remove()
        bar.close()


def read_text_file(path: str | os.PathLike) -> str:
    """The UTF-8 text of ``path`` (``-`` reads standard input); clear errors for missing or empty files."""
    if str(path) == "-":
        import sys

        text = sys.stdin.read()
    else:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Context file {path} does not exist.")
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; pass a text file.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ContextError(f"{path} is not UTF-8 text ({err}).") from err
    if not text.strip():
        raise ContextError(f"Context file {path} is empty; there is nothing to adapt to.")
    return text
