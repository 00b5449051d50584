"""``ctx2param push DIR REPO``: publish a generator folder (or an adapter folder) on the Hub."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="publish a generator or adapter folder on the Hub",
        description="Upload a saved generator (config, own weights, a generated model card; never the base "
        "model) or an adapter folder (as a PEFT LoRA repository with a card) to the Hugging Face Hub.",
    )
    parser.add_argument("folder", metavar="DIR", help="folder written by save_pretrained or the trainer")
    parser.add_argument("repo_id", metavar="REPO", help="repository id, e.g. org/name")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--message", default=None, help="commit message")
    parser.add_argument("--revision", default=None, help="branch to push to")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead")
    parser.add_argument(
        "--base-model-id",
        default=None,
        help="Hub id of the base model to record in the uploaded config (when it names a local folder)",
    )
    parser.add_argument(
        "--card-data", default=None, metavar="JSON", help="card data file (default: DIR/card_data.json)"
    )
    parser.add_argument(
        "--eval-results",
        action="append",
        default=[],
        metavar="DIR_OR_FILE",
        help="results.json written by `ctx2param eval` (or its folder) to add to the card data before "
        "publishing a generator folder; repeatable",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cards import CardData
    from ..errors import Ctx2ParamError

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder.")
    private = True if args.private else None
    if (folder / "config.json").is_file():
        from ..hub import push_folder_to_hub

        card_data = CardData.load(args.card_data) if args.card_data else None
        if args.eval_results:
            from ..evaluation.report import add_to_card_data
            from ..hub import CARD_DATA_NAME

            if card_data is None:
                default = folder / CARD_DATA_NAME
                card_data = CardData.load(default) if default.is_file() else CardData()
            for source in args.eval_results:
                add_to_card_data(card_data, source)
        url = push_folder_to_hub(
            folder,
            args.repo_id,
            private=private,
            commit_message=args.message or "Upload ctx2param generator",
            revision=args.revision,
            create_pr=args.create_pr,
            card_data=card_data,
            base_model_id=args.base_model_id,
        )
    elif (folder / "ctx2param_adapter.json").is_file() or (folder / "adapter_config.json").is_file():
        from ..adapter import ContextAdapter
        from ..hub import _check_online

        _check_online()
        if args.revision or args.create_pr or args.card_data or args.eval_results:
            raise ValueError(
                "--revision, --create-pr, --card-data and --eval-results apply to generator folders only."
            )
        adapter = ContextAdapter.from_pretrained(folder)
        card = {"base_model": args.base_model_id} if args.base_model_id else {}
        url = adapter.push_to_hub(
            args.repo_id,
            private=private,
            commit_message=args.message or "Upload context adapter",
            card_data={"repo_id": args.repo_id, **card},
        )
    else:
        raise Ctx2ParamError(
            f"{folder} holds neither a generator (config.json) nor an adapter (ctx2param_adapter.json or "
            "adapter_config.json)."
        )
    print(f"published {folder} to {args.repo_id}: {url}")
    return 0
