"""``ctx2param demo [ARGS...]``: run the interactive demonstration in :mod:`ctx2param.demo`."""

from __future__ import annotations

import argparse
import importlib


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the demonstration (ctx2param.demo)",
        description="Run ctx2param's demonstration; arguments after 'demo' are passed on to it "
        "(see: ctx2param demo --help).",
        add_help=False,
    )
    # everything after "demo" goes to the demo (ctx2param.cli passes unparsed arguments on as extra_args)
    parser.set_defaults(func=run, pass_extra_args=True)


def run(args: argparse.Namespace) -> int:
    from ..errors import Ctx2ParamError

    try:
        demo = importlib.import_module(f"{__package__.rsplit('.', 1)[0]}.demo")
    except ModuleNotFoundError as err:
        if err.name and err.name.endswith("ctx2param.demo"):
            raise Ctx2ParamError(
                "this installation of ctx2param has no demo (ctx2param.demo is missing)."
            ) from err
        raise
    entry = getattr(demo, "main", None)
    if not callable(entry):
        raise Ctx2ParamError("ctx2param.demo has no main(argv) function to run.")
    status = entry(list(args.extra_args))
    return 0 if status is None else int(status)
