#!/usr/bin/env python
"""Publish a trained generator folder on the Hugging Face Hub.

    python hub_scripts/publish.py DIR REPO_ID [--private] [--base-model-id ID] [--card-data JSON]

Uploads only the generator's own files (``config.json``, the safetensors weights and their index) with a
model card rendered from ``model_cards/generator_card.md.jinja`` and the folder's ``card_data.json`` (training
data, settings, losses and evaluation results recorded by the trainer and the evaluation runner); the base
model is never uploaded. The folder is checked first (config, every weight file present and readable, no
base-model tensors). Prints the commit URL. Needs network access to the Hub (or ``HF_ENDPOINT`` pointing at
a Hub-compatible server) and a token (``huggingface-cli login`` or ``HF_TOKEN``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", metavar="DIR", help="trained generator folder (save_pretrained output)")
    parser.add_argument("repo_id", metavar="REPO_ID", help="repository to publish to, e.g. org/name")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument(
        "--base-model-id",
        default=None,
        help="Hub id of the base model to record in the uploaded config (the folder's config may name a "
        "local folder, e.g. HuggingFaceTB/SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--base-revision", default=None, help="revision of that base model")
    parser.add_argument("--card-data", default=None, help="card data JSON (default: DIR/card_data.json)")
    parser.add_argument("--message", default="Upload ctx2param generator", help="commit message")
    parser.add_argument("--dry-run", action="store_true", help="print the model card instead of uploading")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from ctx2param.cards import CardData
    from ctx2param.errors import Ctx2ParamError
    from ctx2param.hub import folder_card, push_folder_to_hub

    try:
        card_data = CardData.load(args.card_data) if args.card_data else None
        if args.dry_run:
            print(folder_card(args.folder, args.repo_id, card_data))
            return 0
        url = push_folder_to_hub(
            args.folder,
            args.repo_id,
            private=True if args.private else None,
            commit_message=args.message,
            card_data=card_data,
            base_model_id=args.base_model_id,
            base_revision=args.base_revision,
        )
    except (Ctx2ParamError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
