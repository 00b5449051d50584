"""The ``ctx2param`` command: argparse with one subcommand per module of :mod:`ctx2param.commands`.

Each module of the package ``ctx2param.commands`` (``info``, ``adapt``, ``push``, ``demo``, and those that
teammates add: ``train``, ``decode``, ``eval``) defines ``register(subparsers)``, which adds its parser and
sets ``func`` (``args -> int | None``) on it; a command that takes arbitrary arguments of its own (``demo``)
also sets ``pass_extra_args=True`` and finds them in ``args.extra_args``. Modules are found with
:mod:`pkgutil`, so adding a command touches no existing file. A module that fails to import does not break
the others: its command is listed as unavailable and says why when run.

Errors that come from what the user asked for (:class:`~ctx2param.errors.Ctx2ParamError`, ``ValueError``,
``OSError``, a missing optional package, a Hub that cannot be reached) are printed as one ``error: ...``
line with exit status 1, without a traceback; set ``CTX2PARAM_DEBUG=1`` (or pass ``--debug``) to see the
traceback. Usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .errors import Ctx2ParamError

__all__ = ["build_parser", "command_modules", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def command_modules() -> list[str]:
    """Names of the modules of ``ctx2param.commands`` (one subcommand each), sorted."""
    from . import commands

    return sorted(
        info.name for info in pkgutil.iter_modules(commands.__path__) if not info.name.startswith("_")
    )


def _unavailable(name: str, reason: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        raise Ctx2ParamError(f"the command {name!r} could not be loaded: {reason}")

    return run


def build_parser() -> argparse.ArgumentParser:
    """The ``ctx2param`` parser with every discovered subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="ctx2param",
        description="Turn context into adapter parameters for Hugging Face causal language models.",
    )
    parser.add_argument("--version", action="version", version=f"ctx2param {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of errors (also: CTX2PARAM_DEBUG=1)"
    )
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (a package that registers a context-adaptation method of its own)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        try:
            module = importlib.import_module(f"{__package__}.commands.{name}")
            register = module.register
        except Exception as err:  # a broken or incomplete command must not take the others down
            reason = f"{type(err).__name__}: {err}"
            sub = subparsers.add_parser(name, help=f"(unavailable: {reason})")
            sub.set_defaults(func=_unavailable(name, reason))
            continue
        register(subparsers)
    return parser


def _import_plugins(modules: Sequence[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise Ctx2ParamError(f"--import {name}: cannot import it ({err}).") from err


def _one_line(message: str) -> str:
    """An error message on one line (libraries' messages often span several)."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage, 130 interrupted)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "pass_extra_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    debug = args.debug or os.environ.get("CTX2PARAM_DEBUG", "") not in ("", "0")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        _import_plugins(args.imports)
        status = func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (Ctx2ParamError, ValueError, OSError, ImportError) as err:
        if debug:
            raise
        print(f"error: {_one_line(str(err) or type(err).__name__)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as err:
        from .compat import hub_unreachable_message, network_errors

        if debug or not isinstance(err, network_errors()):
            raise
        print(f"error: {_one_line(hub_unreachable_message(err, 'reach the Hub'))}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK if status is None else int(status)
