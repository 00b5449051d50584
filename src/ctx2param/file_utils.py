"""Atomic file and folder writes and checksums, shared by adapters, checkpoints, cards, data and reports.

A folder save (:func:`write_folder_atomically`) replaces the whole folder in one step, so a reader or a
crash sees the old version or the new one, never a mix; see its docstring for how, and
:func:`cleanup_interrupted_saves` for what a killed save leaves behind and how it is cleaned up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fnmatch
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

_TMP = ".tmp-"  # .NAME.tmp-<pid>-<random>: a save in progress (or killed)
_OLD = ".old-"  # .NAME.old-<pid>-<random>: the previous version during a non-atomic swap
#: Leftovers of saves whose process cannot be checked (other platforms) are removed after this long.
_UNCHECKABLE_AGE_S = 24 * 3600


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
    """Write safetensors, JSON and text files into ``directory`` as one version: after a crash or a
    ``kill -9`` at any point, ``directory`` holds either the complete previous save or the complete new one.

    How: the new version is written, in full, to a hidden sibling folder ``.NAME.tmp-<pid>-<random>``. When
    ``directory`` already exists, the entries of the previous version that this save neither writes nor
    drops (files the caller put there, such as a README or ``checkpoint-*`` folders) are hard-linked into
    the new folder (copied where links are not supported), so they survive without being copied. The two
    folders are then exchanged in one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux; ``renamex_np`` with
    ``RENAME_SWAP`` on macOS) and the previous version, now under the temporary name, is deleted.
    ``directory`` itself stays an ordinary folder that ``from_pretrained``, PEFT and Hub uploads read as
    before. Where no atomic exchange exists, the previous folder is first renamed to ``.NAME.old-<pid>-...``
    and the new one renamed into place; a crash between those two renames leaves no ``directory`` but the
    complete previous version under the ``.old`` name, which the next save (or
    :func:`cleanup_interrupted_saves`) renames back.

    Nothing stale survives: the previous version's files named in ``remove`` (exact names or ``fnmatch``
    patterns: the other format's files, old shards and their index) are not carried over, and everything
    this save writes replaces the old file of that name. Leftover ``.NAME.tmp-*`` / ``.NAME.old-*`` folders
    of saves that were killed (their process is gone) are deleted by the next save into ``directory``.
    Files are fsynced before the exchange, the parent folder after it. A process whose working folder is
    ``directory`` (or inside it) follows it to the new version; a reader that opened files of the previous
    version keeps reading those, whole.

    Args:
        directory: the folder to create or replace.
        tensors: ``{file name: {tensor name: tensor}}`` written as safetensors.
        jsons: ``{file name: object}`` written as indented JSON.
        texts: ``{file name: text}`` written as UTF-8.
        checksums_into: name of one of ``jsons`` that receives ``"sha256": {weight file: digest}``.
        remove: names or patterns of the previous version's files that must not survive this save.

    Returns:
        ``directory`` as given.

    Raises:
        NotADirectoryError: ``directory`` exists and is not a folder (nothing is written).
    """
    given = Path(directory)
    directory = _target(given)
    tensors, jsons, texts = dict(tensors or {}), dict(jsons or {}), dict(texts or {})
    if checksums_into is not None and checksums_into not in jsons:
        raise ValueError(f"checksums_into={checksums_into!r} is not one of the JSON files {sorted(jsons)}.")
    for name in [*tensors, *jsons, *texts]:
        if not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a plain file name; files go directly into the folder.")
    directory.parent.mkdir(parents=True, exist_ok=True)
    cleanup_interrupted_saves(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a folder.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}{_TMP}{os.getpid()}-", dir=directory.parent))
    try:
        digests = {}
        for name, content in tensors.items():
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in content.items()},
                str(tmp / name),
                metadata={"format": "pt"},
            )
            _fsync_file(tmp / name)
            digests[name] = sha256_file(tmp / name)
        for name, content in texts.items():
            _write_durably(tmp / name, content)
        for name, content in jsons.items():
            if name == checksums_into:
                content = {**content, "sha256": digests}
            _write_durably(tmp / name, json.dumps(content, indent=2) + "\n")
        if directory.is_dir():
            _carry_over(directory, tmp, written={*tensors, *jsons, *texts}, remove=remove)
        _fsync_dir(tmp)
        _swap_into_place(tmp, directory)
    finally:
        # on success: the previous version (exchanged into the temporary name); on failure: the partial new
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(directory.parent)
    return given


def _target(path: Path) -> Path:
    """The absolute folder a save replaces: a symlink is followed (the link keeps pointing at the folder)."""
    target = Path(os.path.abspath(path))
    return target.resolve() if target.is_symlink() else target


def _leftover_owner(name: str, folder: str) -> tuple[str, int | None] | None:
    """``("tmp" | "old", pid)`` when ``name`` is a leftover of a save into the folder named ``folder``
    (``pid`` is ``None`` for names of older ctx2param versions, which carried no pid), else ``None``."""
    for kind, mark in (("tmp", _TMP), ("old", _OLD)):
        prefix = f".{folder}{mark}"
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        match = re.fullmatch(r"(\d+)-[A-Za-z0-9_]+", rest)
        if match:
            return kind, int(match.group(1))
        if kind == "tmp" and re.fullmatch(r"[A-Za-z0-9_]{8}", rest):  # tempfile.mkdtemp's suffix alone
            return kind, None
    return None


def _process_alive(pid: int) -> bool | None:
    """Whether process ``pid`` runs on this machine (``None``: cannot tell on this platform)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def cleanup_interrupted_saves(directory: str | os.PathLike) -> list[str]:
    """Clean up after saves into ``directory`` that were killed; returns the names of what was removed.

    A killed :func:`write_folder_atomically` can leave, beside ``directory``, a ``.NAME.tmp-<pid>-...``
    folder (a new version half-written, or the previous version half-deleted) and, on platforms without an
    atomic folder exchange, a ``.NAME.old-<pid>-...`` folder holding the complete previous version. Those of
    processes that are gone are handled here: when ``directory`` is missing, the newest ``.old`` folder is
    renamed back to ``directory`` (the previous complete version returns); every other leftover is
    deleted. Leftovers of a save still running (its process is alive on this machine) are left alone;
    where the process cannot be checked (not POSIX), only leftovers older than a day are removed. The next
    save into ``directory`` calls this first. Note for shared network folders: a process id is only checked
    on this machine.
    """
    directory = _target(Path(directory))
    parent = directory.parent
    if not parent.is_dir():
        return []
    stale: list[tuple[str, Path]] = []
    for entry in parent.iterdir():
        owner = _leftover_owner(entry.name, directory.name)
        if owner is None:
            continue
        kind, pid = owner
        alive = _process_alive(pid) if pid is not None else False
        if alive is None:
            try:
                alive = time.time() - entry.stat().st_mtime < _UNCHECKABLE_AGE_S
            except OSError:
                continue
        if not alive:
            stale.append((kind, entry))
    removed = []
    if not os.path.lexists(directory):
        olds = sorted((e for kind, e in stale if kind == "old"), key=lambda e: e.stat().st_mtime)
        if olds:
            os.rename(olds[-1], directory)
            logger.warning("Restored %s from %s, left by an interrupted save.", directory, olds[-1].name)
            stale = [(kind, e) for kind, e in stale if e != olds[-1]]
    for _, entry in stale:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(previous: Path, new: Path, written: set[str], remove: Iterable[str]) -> None:
    """Hard-link (or copy) into ``new`` every entry of ``previous`` that is neither written anew nor to be
    dropped (``remove``: names or fnmatch patterns); folders are rebuilt with linked files inside."""
    patterns = tuple(remove)
    for entry in os.scandir(previous):
        name = entry.name
        if name in written or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            continue
        target = new / name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            shutil.copytree(entry.path, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, str(target))


@functools.lru_cache(maxsize=1)
def _exchange_function() -> Callable[[bytes, bytes], int] | None:
    """A C function that atomically exchanges two paths, or ``None`` where the platform has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        renameat2 = libc.renameat2
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        renameat2.restype = ctypes.c_int
        at_fdcwd, rename_exchange = -100, 2
        return lambda a, b: renameat2(at_fdcwd, a, at_fdcwd, b, rename_exchange)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        renamex_np = libc.renamex_np
        renamex_np.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        renamex_np.restype = ctypes.c_int
        rename_swap = 2
        return lambda a, b: renamex_np(a, b, rename_swap)
    return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names of two existing paths in one atomic step; False where the system cannot."""
    function = _exchange_function()
    if function is None:
        return False
    if function(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # not supported by this kernel or file system: the two-rename fallback
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _swap_into_place(new: Path, directory: Path) -> None:
    """Make ``new`` be ``directory``; afterwards ``new`` holds the previous version (or nothing)."""
    cwd = os.getcwd()
    inside = cwd == str(directory) or cwd.startswith(str(directory) + os.sep)
    if not os.path.lexists(directory):
        try:
            os.rename(new, directory)
            return
        except OSError as err:  # created meanwhile by someone else: exchange with it below
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if not _exchange(new, directory):
        old = directory.parent / f".{directory.name}{_OLD}{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(directory, old)  # a crash here leaves the complete old version in `old`
        os.rename(new, directory)
        os.rename(old, new)  # removed with `new` by the caller
    if inside:  # the process's working folder was the previous version: follow it to the new one
        relative = os.path.relpath(cwd, directory)
        target = directory / relative
        os.chdir(target if target.is_dir() else directory)
