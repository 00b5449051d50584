"""``ctx2param info DIR_OR_ID``: what a generator or an adapter is, without loading a base model.

For a generator: method, base model, target modules, rank, number of the method's own parameters and the
size of its weights (from ``config.json`` and the safetensors headers). For an adapter folder, ctx2param's own
format or a PEFT LoRA: base model, modules, rank, parameters, dtype and size. A plain transformers model (a
base causal LM, e.g. ``info smollm2``) is described as what it is: a base model, not a generator.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

GENERATOR_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json"]
ADAPTER_FILES = [
    "ctx2param_adapter.json",
    "adapter_config.json",
    "adapter.safetensors",
    "adapter_model.safetensors",
]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="describe a generator or an adapter (folder or Hub id)",
        description="Describe a ctx2param generator or a context adapter (ctx2param or PEFT LoRA format): "
        "method, base model, modules, rank, parameter count and size. Loads no base model.",
    )
    parser.add_argument("target", metavar="DIR_OR_ID", help="local folder or Hub repository id")
    parser.add_argument("--revision", help="revision of a Hub repository")
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    parser.set_defaults(func=run)


def _fetch(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from ..errors import Ctx2ParamError

    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=GENERATOR_FILES + ADAPTER_FILES)
        )
    except HFValidationError as err:
        raise Ctx2ParamError(
            f"{repo_id!r} is neither an existing folder nor a valid Hub repository id."
        ) from err
    except RepositoryNotFoundError as err:
        raise Ctx2ParamError(f"No repository {repo_id!r} on the Hub (or no access to it).") from err
    except RevisionNotFoundError as err:
        raise Ctx2ParamError(f"{repo_id!r} has no revision {revision!r}.") from err
    except LocalEntryNotFoundError as err:
        raise Ctx2ParamError(
            f"{repo_id!r} is not in the local cache and the Hub cannot be reached (HF_HUB_OFFLINE=1 or no "
            "network)."
        ) from err


def describe_adapter(folder: Path) -> dict[str, Any]:
    """Summary of an adapter folder (ctx2param or PEFT format)."""
    from ..adapter import ContextAdapter

    adapter = ContextAdapter.from_pretrained(folder)
    own = (folder / "ctx2param_adapter.json").is_file()
    weights = folder / ("adapter.safetensors" if own else "adapter_model.safetensors")
    suffixes = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in adapter))
    return {
        "kind": "adapter",
        "format": "ctx2param" if own else "peft",
        "base_model": adapter.base_model,
        "base_revision": adapter.base_revision,
        "num_modules": len(adapter),
        "module_suffixes": suffixes,
        "rank": adapter.rank,
        "batch_size": adapter.batch_size,
        "num_parameters": adapter.num_parameters(),
        "dtype": str(adapter.dtype).removeprefix("torch."),
        "size_bytes": weights.stat().st_size,
        "metadata": adapter.metadata,
    }


def describe_base_model(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Summary of a plain transformers model folder (a base causal LM, not a generator)."""
    from ..hub import describe_checkpoint
    from ..modeling_utils import CheckpointError

    summary: dict[str, Any] = {
        "kind": "base model",
        "model_type": config.get("model_type"),
        "architectures": list(config.get("architectures") or []),
        "num_parameters": None,
        "dtypes": {},
        "size_bytes": None,
        "files": [],
    }
    try:
        weights = describe_checkpoint(folder)
    except CheckpointError:  # e.g. weights not in safetensors: described without the count
        return summary
    summary.update({k: weights[k] for k in ("num_parameters", "dtypes", "size_bytes", "files")})
    return summary


def describe(target: str, revision: str | None = None) -> dict[str, Any]:
    """Describe a generator or adapter folder, or a Hub repository holding one."""
    from ..errors import Ctx2ParamError
    from ..hub import describe_checkpoint
    from ..modeling_utils import is_plain_model_type
    from ..testing_utils import resolve_model_name

    path = Path(resolve_model_name(target))
    if path.exists() and not path.is_dir():
        raise Ctx2ParamError(f"{path} is a file; pass the folder that holds it.")
    folder = path if path.is_dir() else _fetch(target, revision)
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if isinstance(config, dict) and is_plain_model_type(config.get("model_type")):
            summary = describe_base_model(folder, config)
        else:
            summary = describe_checkpoint(folder)
    elif (folder / "ctx2param_adapter.json").is_file() or (folder / "adapter_config.json").is_file():
        summary = describe_adapter(folder)
    else:
        present = sorted(p.name for p in folder.iterdir())[:10]
        raise Ctx2ParamError(
            f"{target} holds neither a ctx2param generator (config.json) nor an adapter "
            f"(ctx2param_adapter.json or adapter_config.json); found {present}."
        )
    return {"source": str(target), **summary}


def _base_model_text(summary: dict[str, Any]) -> str:
    architectures = ", ".join(summary["architectures"]) or "unknown architecture"
    rows = [
        ("kind", "base model (a plain causal LM, not a ctx2param generator)"),
        ("model type", f"{summary['model_type']} ({architectures})"),
    ]
    if summary["num_parameters"] is not None:
        rows.append(("parameters", f"{summary['num_parameters']:,} ({', '.join(summary['dtypes'])})"))
        rows.append(("size", f"{summary['size_bytes'] / 1e6:.2f} MB in {len(summary['files'])} file(s)"))
    rows.append(("use", f"as the base of a generator: --base {summary['source']}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in rows)


def _text(summary: dict[str, Any]) -> str:
    if summary["kind"] == "base model":
        return _base_model_text(summary)
    base = summary["base_model"] or "(not recorded)"
    if summary.get("base_revision"):
        base += f" @ {summary['base_revision']}"
    size = f"{summary['size_bytes'] / 1e6:.2f} MB"
    if summary["kind"] == "generator":
        method = summary["method"]
        if not summary["registered"]:
            method += " (not registered in this installation: cannot be loaded)"
        rows = [
            ("kind", "ctx2param generator"),
            ("method", f"{method} [{summary['model_type']}]"),
            ("base model", base),
            (
                "target modules",
                f"{', '.join(summary['target_modules'])} ({summary['num_target_layers']} layers)",
            ),
            ("rank", str(summary["rank"])),
            ("parameters", f"{summary['num_parameters']:,} ({', '.join(summary['dtypes'])})"),
            ("size", f"{size} in {len(summary['files'])} file(s)"),
        ]
        if summary["base_weights_included"]:
            rows.append(("warning", "the weight files contain base-model tensors"))
    else:
        rows = [
            ("kind", f"adapter ({summary['format']} format)"),
            ("base model", base),
            ("modules", f"{summary['num_modules']} ({', '.join(summary['module_suffixes'])})"),
            ("rank", str(summary["rank"])),
            ("parameters", f"{summary['num_parameters']:,} ({summary['dtype']})"),
            ("size", size),
        ]
        if summary["batch_size"] is not None:
            rows.append(("batch size", str(summary["batch_size"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    summary = describe(args.target, args.revision)
    print(json.dumps(summary, indent=2, default=str) if args.json else _text(summary))
    return 0
