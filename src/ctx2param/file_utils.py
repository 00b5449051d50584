"""Atomic file and folder writes and checksums, shared by adapters, checkpoints, cards, data and reports."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder, then a rename: a
    reader sees the old file or the new one, never half of one; the temporary file is removed on failure."""
    return _write_atomically(path, text)


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` as :func:`write_text_atomically` writes text (temporary file, rename)."""
    return _write_atomically(path, data)


def _write_atomically(path: str | os.PathLike, content: str | bytes) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if isinstance(content, bytes):
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_folder_atomically(
    directory: str | os.PathLike,
    tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    jsons: Mapping[str, Mapping[str, Any]] | None = None,
    texts: Mapping[str, str] | None = None,
    checksums_into: str | None = None,
    remove: tuple[str, ...] = (),
) -> Path:
    """Write safetensors, JSON and text files into ``directory`` so that no reader sees a half-written state.

    Everything is written to a temporary folder beside ``directory`` first. A new folder is then renamed
    into place in one step; into an existing folder the files are moved one by one with ``os.replace``
    (each atomic), weights first and JSON last, so a config never points at weights that are not there yet.

    Args:
        tensors: ``{file name: {tensor name: tensor}}`` written as safetensors.
        jsons: ``{file name: object}`` written as indented JSON.
        texts: ``{file name: text}`` written as UTF-8.
        checksums_into: name of one of ``jsons`` that receives ``"sha256": {weight file: digest}``.
        remove: files to delete from an existing ``directory`` once the new ones are in place (e.g. the files
            of another format that would otherwise be read instead of the new ones).
    """
    directory = Path(directory)
    tensors, jsons, texts = dict(tensors or {}), dict(jsons or {}), dict(texts or {})
    if checksums_into is not None and checksums_into not in jsons:
        raise ValueError(f"checksums_into={checksums_into!r} is not one of the JSON files {sorted(jsons)}.")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        digests = {}
        for name, content in tensors.items():
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in content.items()},
                str(tmp / name),
                metadata={"format": "pt"},
            )
            digests[name] = sha256_file(tmp / name)
        for name, content in texts.items():
            (tmp / name).write_text(content, encoding="utf-8")
        for name, content in jsons.items():
            if name == checksums_into:
                content = {**content, "sha256": digests}
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        if not directory.exists():
            os.replace(tmp, directory)
            return directory
        if not directory.is_dir():
            raise NotADirectoryError(f"{directory} exists and is not a folder.")
        for name in remove:  # first, so that no stale config points at the new weights meanwhile
            if name not in tensors and name not in jsons and name not in texts:
                (directory / name).unlink(missing_ok=True)
        for name in [*tensors, *texts, *jsons]:
            os.replace(tmp / name, directory / name)
        return directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
