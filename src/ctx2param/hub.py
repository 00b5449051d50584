"""Publishing generators on the Hugging Face Hub: card data on the model, rendered cards, uploads.

A published generator repository holds only the method's files: ``config.json``, the safetensors weights
(and their index when sharded), ``README.md`` (the card rendered from ``model_cards/``) and
``card_data.json`` (the :class:`~ctx2param.cards.CardData` the card was rendered from). The base model is
never uploaded; ``from_pretrained`` loads it from where the config (or the caller) says.

- :func:`get_card_data` gives the :class:`~ctx2param.cards.CardData` kept on a model (``model.card_data``)
  that training and evaluation fill.
- :func:`push_to_hub` saves a loaded generator to a temporary folder with its card and uploads it.
- :func:`push_folder_to_hub` publishes a trained folder (what ``hub_scripts/publish.py`` and
  ``ctx2param push`` do) without loading the base model.
- :func:`describe_checkpoint` summarises a generator folder from its config and safetensors headers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .cards import CardData, is_hub_model_id, render_generator_card
from .errors import PublishError
from .modeling_utils import (
    CONFIG_NAME,
    WEIGHTS_INDEX_NAME,
    CheckpointError,
    ContextAdaptationModel,
    register_publisher,
    registered_methods,
    weight_file_names,
)

__all__ = [
    "CARD_DATA_NAME",
    "PublishError",
    "describe_checkpoint",
    "generator_card",
    "get_card_data",
    "push_folder_to_hub",
    "push_to_hub",
    "set_card_data",
]

logger = logging.getLogger(__name__)

CARD_DATA_NAME = "card_data.json"
README_NAME = "README.md"
BASE_PREFIX = "base_lm."
_WEIGHT_PATTERNS = ["*.safetensors", WEIGHTS_INDEX_NAME]


# ------------------------------------------------------------------------------------------- card data
def get_card_data(model: ContextAdaptationModel) -> CardData:
    """The :class:`CardData` kept on ``model`` as ``model.card_data`` (created empty on first use).

    Training records datasets, settings and losses in it, evaluation records results; :func:`push_to_hub`
    renders the card from it.
    """
    data = model.__dict__.get("card_data")
    if not isinstance(data, CardData):
        data = CardData()
        set_card_data(model, data)
    return data


def set_card_data(model: ContextAdaptationModel, card_data: CardData) -> None:
    """Attach ``card_data`` to ``model`` (replacing what was there)."""
    if not isinstance(card_data, CardData):
        raise TypeError(f"card_data must be a ctx2param.cards.CardData, got {type(card_data).__name__}.")
    object.__setattr__(model, "card_data", card_data)


def generator_card(
    model: ContextAdaptationModel, repo_id: str | None = None, card_data: CardData | None = None
) -> str:
    """The model card (README.md text) of a loaded generator."""
    state = model.method_state_dict()
    return render_generator_card(
        model.config,
        card_data if card_data is not None else get_card_data(model),
        repo_id=repo_id,
        num_parameters=sum(t.numel() for t in state.values()),
        size_bytes=sum(t.numel() * t.element_size() for t in state.values()),
    )


# ------------------------------------------------------------------------------------- folder contents
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} is missing.") from err
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Cannot read {path}: {err}.") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object.")
    return data


def weight_files(folder: str | os.PathLike) -> list[str]:
    """Names of the generator's weight files in ``folder`` (from the shard index, else ``model.safetensors``);
    raises :class:`CheckpointError` when one is missing."""
    folder = Path(folder)
    files = weight_file_names(folder)  # shard names are checked to stay inside the folder
    for name in files:
        if not (folder / name).is_file():
            raise CheckpointError(
                f"Missing weight file {folder / name}; the checkpoint folder is incomplete."
            )
    return files


def _safetensors_summary(path: Path) -> tuple[int, dict[str, int], list[str]]:
    """(number of parameters, {dtype: count}, tensor names) from a safetensors header only."""
    from safetensors import SafetensorError, safe_open

    total, dtypes, names = 0, {}, []
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                piece = handle.get_slice(key)
                count = 1
                for dim in piece.get_shape():
                    count *= int(dim)
                dtype = str(piece.get_dtype())
                dtypes[dtype] = dtypes.get(dtype, 0) + count
                total += count
                names.append(key)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"Cannot read {path}: {err}. The file is corrupted or truncated.") from err
    return total, dtypes, names


def describe_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """A summary of a generator folder, read from ``config.json`` and the safetensors headers only.

    Returns:
        ``{"kind": "generator", "method", "model_type", "registered", "base_model", "base_revision",
        "target_modules", "num_target_layers", "rank", "scale", "chunk_tokens", "num_parameters",
        "dtypes", "size_bytes", "files", "base_weights_included"}``.
    """
    folder = Path(folder)
    config = _read_json(folder / CONFIG_NAME)
    files = weight_files(folder)
    total, dtypes, names = 0, {}, []
    size = 0
    for name in files:
        count, kinds, keys = _safetensors_summary(folder / name)
        total += count
        names += keys
        for dtype, n in kinds.items():
            dtypes[dtype] = dtypes.get(dtype, 0) + n
        size += (folder / name).stat().st_size
    model_type = config.get("model_type")
    return {
        "kind": "generator",
        "method": config.get("method") or str(model_type or "").removeprefix("ctx2param_"),
        "model_type": model_type,
        "registered": model_type in registered_methods(),
        "base_model": config.get("base_model_name_or_path"),
        "base_revision": config.get("base_model_revision"),
        "target_modules": list(config.get("target_modules") or []),
        "num_target_layers": len(config.get("target_shapes") or {}),
        "rank": config.get("rank"),
        "scale": config.get("scale"),
        "chunk_tokens": config.get("chunk_tokens"),
        "num_parameters": total,
        "dtypes": dtypes,
        "size_bytes": size,
        "files": files,
        "base_weights_included": any(k.startswith(BASE_PREFIX) for k in names),
    }


# ------------------------------------------------------------------------------------------- uploading
def _check_online() -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise PublishError(
            "Cannot publish while HF_HUB_OFFLINE=1 (the Hub client is in offline mode). Unset it to upload."
        )


def _set_base_in_config(folder: Path, base_model_id: str, base_revision: str | None) -> None:
    if not is_hub_model_id(base_model_id):
        raise ValueError(f"base_model_id={base_model_id!r} is not a Hub model id (like 'org/name').")
    config = _read_json(folder / CONFIG_NAME)
    config["base_model_name_or_path"] = base_model_id
    if base_revision is not None:
        config["base_model_revision"] = base_revision
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _upload(
    folder: Path,
    repo_id: str,
    *,
    private: bool | None,
    token: str | bool | None,
    commit_message: str,
    revision: str | None,
    create_pr: bool,
) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .compat import hub_unreachable_message, network_errors

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
            # a re-push that changes sharding must not leave stale shards behind
            delete_patterns=_WEIGHT_PATTERNS,
        )
    except HfHubHTTPError as err:
        raise PublishError(f"The Hub refused to publish {repo_id!r}: {err}") from err
    except network_errors() as err:  # no network, refused, timed out: one line, not the client's traceback
        message = hub_unreachable_message(err, f"publish {repo_id!r}", offline_hint=False)
        raise PublishError(message) from err
    return str(getattr(info, "commit_url", info))


def push_to_hub(
    model: ContextAdaptationModel,
    repo_id: str,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload ctx2param generator",
    *,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "2GB",
    card_data: CardData | None = None,
    base_model_id: str | None = None,
    base_revision: str | None = None,
) -> str:
    """Publish a generator: its config, its own weights, ``card_data.json`` and a rendered model card.

    The files are written by ``model.save_pretrained`` into a temporary folder, which is uploaded with
    ``create_repo`` + ``upload_folder``. The base model's weights are never uploaded.

    Args:
        model: the generator.
        repo_id: ``"org/name"``.
        private: create the repository private (``None``: the Hub's default; an existing repo is unchanged).
        token: Hub token (default: the logged-in one).
        commit_message: message of the upload commit.
        revision: branch to push to.
        create_pr: open a pull request instead of pushing to the branch.
        max_shard_size: shard the weights above this size.
        card_data: overrides ``get_card_data(model)`` for this card.
        base_model_id, base_revision: Hub id (and revision) of the base model to write into the uploaded
            config, when the model was built from a local folder (the local ``model.config`` is not changed).

    Returns:
        The URL of the commit.
    """
    _check_online()
    if not isinstance(model, ContextAdaptationModel):
        raise TypeError(f"push_to_hub needs a ContextAdaptationModel, got {type(model).__name__}.")
    data = card_data if card_data is not None else get_card_data(model)
    card_config = model.config.to_dict()
    if base_model_id is not None:
        card_config["base_model_name_or_path"] = base_model_id
        if base_revision is not None:
            card_config["base_model_revision"] = base_revision
    elif not is_hub_model_id(model.config.base_model_name_or_path):
        logger.warning(
            "The generator's config names its base by a local path (%r); users of %s must pass base_model=. "
            "Pass base_model_id='org/name' to publish with a Hub id.",
            model.config.base_model_name_or_path,
            repo_id,
        )
    state = model.method_state_dict()
    card = render_generator_card(
        card_config,
        data,
        repo_id=repo_id,
        num_parameters=sum(t.numel() for t in state.values()),
        size_bytes=sum(t.numel() * t.element_size() for t in state.values()),
    )
    with tempfile.TemporaryDirectory(prefix="ctx2param-push-") as tmp:
        folder = Path(
            model.save_pretrained(Path(tmp) / "generator", max_shard_size=max_shard_size, model_card=card)
        )
        data.save(folder / CARD_DATA_NAME)
        if base_model_id is not None:
            _set_base_in_config(folder, base_model_id, base_revision)
        return _upload(
            folder,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def folder_card(
    folder: str | os.PathLike, repo_id: str | None = None, card_data: CardData | None = None
) -> str:
    """The model card of a generator folder (``card_data`` defaults to the folder's ``card_data.json``)."""
    folder = Path(folder)
    summary = describe_checkpoint(folder)
    if card_data is None:
        card_data = CardData.load(folder / CARD_DATA_NAME) if (folder / CARD_DATA_NAME).is_file() else None
    return render_generator_card(
        _read_json(folder / CONFIG_NAME),
        card_data,
        repo_id=repo_id,
        num_parameters=summary["num_parameters"],
        size_bytes=summary["size_bytes"],
    )


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload ctx2param generator",
    *,
    revision: str | None = None,
    create_pr: bool = False,
    card_data: CardData | None = None,
    base_model_id: str | None = None,
    base_revision: str | None = None,
) -> str:
    """Publish a saved generator folder without loading it (nor its base).

    Checks the folder first: a ctx2param config, every weight file present and readable, and no base-model
    weights among them. Only the method's files are uploaded (``config.json``, the weights and their index,
    ``card_data.json``) with a freshly rendered ``README.md``; anything else in the folder (checkpoints,
    optimizer states, logs) stays local.

    Args:
        folder: the folder ``save_pretrained`` (or the trainer) wrote.
        repo_id, private, token, commit_message, revision, create_pr: as in :func:`push_to_hub`.
        card_data: card data (default: the folder's ``card_data.json`` when present).
        base_model_id, base_revision: Hub id (and revision) of the base to write into the uploaded config.

    Returns:
        The URL of the commit.
    """
    _check_online()
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; pass the folder that holds {CONFIG_NAME}.")
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}; it is not a ctx2param generator folder.")
    config = _read_json(folder / CONFIG_NAME)
    model_type = str(config.get("model_type") or "")
    if not model_type.startswith("ctx2param") and model_type not in registered_methods():
        raise CheckpointError(
            f"{folder / CONFIG_NAME} has model_type {model_type!r}: not a ctx2param generator."
        )
    summary = describe_checkpoint(folder)
    if summary["base_weights_included"]:
        raise PublishError(
            f"{folder}'s weights include base-model tensors ({BASE_PREFIX}...); refusing to upload."
        )
    if card_data is None and (folder / CARD_DATA_NAME).is_file():
        card_data = CardData.load(folder / CARD_DATA_NAME)
    card_config = dict(config)
    if base_model_id is not None:
        card_config["base_model_name_or_path"] = base_model_id
        if base_revision is not None:
            card_config["base_model_revision"] = base_revision
    card = render_generator_card(
        card_config,
        card_data,
        repo_id=repo_id,
        num_parameters=summary["num_parameters"],
        size_bytes=summary["size_bytes"],
    )
    names: Iterable[str] = [CONFIG_NAME, *summary["files"]]
    if (folder / WEIGHTS_INDEX_NAME).is_file():
        names = [*names, WEIGHTS_INDEX_NAME]
    with tempfile.TemporaryDirectory(prefix="ctx2param-push-") as tmp:
        staged = Path(tmp) / "generator"
        staged.mkdir()
        for name in names:
            _link_or_copy(folder / name, staged / name)
        if base_model_id is not None:
            (staged / CONFIG_NAME).unlink()
            shutil.copy2(folder / CONFIG_NAME, staged / CONFIG_NAME)
            _set_base_in_config(staged, base_model_id, base_revision)
        (staged / README_NAME).write_text(card, encoding="utf-8")
        (card_data or CardData()).save(staged / CARD_DATA_NAME)
        return _upload(
            staged,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )


# ``model.push_to_hub(repo_id, ...)`` runs push_to_hub above (the model base cannot import this module).
register_publisher(push_to_hub)
