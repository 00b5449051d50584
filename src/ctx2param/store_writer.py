"""Writing an :class:`~ctx2param.AdapterStore`: create it, add adapters shard by shard, merge the index.

The store's layout is described in :mod:`ctx2param.store`. Guarantees:

- **Atomic shards.** :class:`StoreWriter` buffers adapters and writes each shard to a temporary name
  (``shards/.<name>.tmp``), renames it into place, and only then writes the shard's index part
  (``parts/<name>.json``, also through a temporary file and a rename). A process killed at any moment leaves
  complete shards, complete parts, and debris that nothing names.
- **One writer run at a time.** :func:`writer_lock` holds ``DIR/.writer.lock`` (process id and host) for a
  run; a lock left by a dead process on this host is taken over, a live one is an error.
- **Consolidation.** :func:`consolidate_store` (one process, under the lock) merges the parts into
  ``index.json``, drops records whose shard is missing or truncated, and deletes the parts it merged, the
  shards no record uses and the writers' temporary files. Runs start with it (recovering what a killed run
  left) and end with it.
- **Several processes.** Each process of a run has its own :class:`StoreWriter` (``process_index`` in its
  shard names); parts are independent files, so processes never write the same file, and the merged store
  reads the same as one written by a single process (record order follows each record's ``order``).

Everything here uses safetensors and JSON; nothing is pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .adapter import ContextAdapter
from .errors import Ctx2ParamError
from .file_utils import sha256_file, write_text_atomically
from .store import (
    HEADER_NAME,
    INDEX_NAME,
    PART_SUFFIX,
    PARTS_DIR,
    SHARD_SUFFIX,
    SHARDS_DIR,
    STORE_FORMAT,
    STORE_SCHEMA_VERSION,
    StoreFileError,
    StoreMismatchError,
    read_header,
    read_view,
    tensor_digest,
)

LOCK_NAME = ".writer.lock"
DEFAULT_MAX_SHARD_BYTES = 256 * 2**20
INDEX_FORMAT = "ctx2param-adapter-store-index"

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "ConsolidationReport",
    "StoreLockedError",
    "StoreWriter",
    "check_header",
    "consolidate_store",
    "create_store",
    "writer_lock",
]


class StoreLockedError(Ctx2ParamError, OSError):
    """Another writer run holds the store's lock."""


# ------------------------------------------------------------------------------------------------ header
def _new_header(
    base_model: str | None,
    base_revision: str | None,
    modules: Mapping[str, Sequence[int]],
    generator: Mapping[str, Any] | None,
) -> dict[str, Any]:
    from . import __version__

    if not modules:
        raise ValueError("An adapter store needs at least one target module.")
    return {
        "format": STORE_FORMAT,
        "schema_version": STORE_SCHEMA_VERSION,
        "ctx2param_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": base_model,
        "base_revision": base_revision,
        "modules": {name: [int(d) for d in shape] for name, shape in modules.items()},
        "generator": dict(generator) if generator is not None else None,
    }


def check_header(
    directory: str | os.PathLike,
    header: Mapping[str, Any],
    base_model: str | None,
    base_revision: str | None,
    modules: Mapping[str, Sequence[int]],
    generator: Mapping[str, Any] | None = None,
) -> None:
    """Raise :class:`~ctx2param.store.StoreMismatchError` unless the store's ``header`` is for this base
    model, these modules (same names, shapes and order) and, when both name one, the same generator
    fingerprint."""
    for what, ours, theirs in (
        ("base model", header.get("base_model"), base_model),
        ("base model revision", header.get("base_revision"), base_revision),
    ):
        if ours and theirs and ours != theirs:
            raise StoreMismatchError(
                f"The adapter store {directory} holds adapters for {what} {ours!r}, not {theirs!r}. Write to "
                "another --out, or use the generator the store was made with."
            )
    wanted = {name: [int(d) for d in shape] for name, shape in modules.items()}
    if list(header["modules"].items()) != list(wanted.items()):
        missing = sorted(set(header["modules"]) - set(wanted))[:3]
        extra = sorted(set(wanted) - set(header["modules"]))[:3]
        raise StoreMismatchError(
            f"The adapter store {directory} holds adapters of {len(header['modules'])} target modules; these "
            f"have {len(wanted)} (only in the store {missing}, only in the new ones {extra}, or other shapes "
            "or order). Write to another --out."
        )
    ours_fp = (header.get("generator") or {}).get("fingerprint")
    theirs_fp = (generator or {}).get("fingerprint")
    if ours_fp and theirs_fp and ours_fp != theirs_fp:
        made_by = (header.get("generator") or {}).get("name")
        raise StoreMismatchError(
            f"The adapter store {directory} was made by the generator {made_by!r} (fingerprint "
            f"{ours_fp[:12]}); this generator ({(generator or {}).get('name')!r}, fingerprint "
            f"{theirs_fp[:12]}) has other weights or settings (or the same weights loaded in another dtype), "
            "so its adapters would not mix with the stored ones. Write to another --out, or use the store's "
            "generator."
        )


def create_store(
    directory: str | os.PathLike,
    *,
    base_model: str | None,
    base_revision: str | None,
    modules: Mapping[str, Sequence[int]],
    generator: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Make ``directory`` an adapter store (its header), or check the existing one fits; returns the header.

    The header is created atomically and only once even when several processes race (a hard link of a
    complete temporary file). A folder that exists, is not empty and is not a store is refused.

    Args:
        base_model, base_revision: the base model the adapters are for.
        modules: ``{target module name: (d_out, d_in)}`` in the adapters' module order.
        generator: what makes the adapters (``name``, ``method``, ``fingerprint``; JSON).

    Raises:
        StoreFileError: ``directory`` is a file, or a non-empty folder that is not a store.
        StoreMismatchError: the existing store is for another base model, other modules or another generator.
    """
    directory = Path(directory)
    path = directory / HEADER_NAME
    if directory.exists() and not directory.is_dir():
        raise StoreFileError(f"{directory} exists and is a file; an adapter store is a folder.")
    if directory.is_dir() and not path.exists() and any(p.name != LOCK_NAME for p in directory.iterdir()):
        raise StoreFileError(
            f"{directory} exists, is not empty and is not an adapter store; choose a new or empty folder."
        )
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        header = _new_header(base_model, base_revision, modules, generator)
        fd, tmp = tempfile.mkstemp(prefix=f".{HEADER_NAME}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(header, indent=2) + "\n")
            with contextlib.suppress(FileExistsError):  # another process created the header first
                os.link(tmp, path)  # atomic: the header appears complete, and only once
        finally:
            Path(tmp).unlink(missing_ok=True)
    header = read_header(directory)
    check_header(directory, header, base_model, base_revision, modules, generator)
    return header


# -------------------------------------------------------------------------------------------------- lock
def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def writer_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Hold ``directory/.writer.lock`` for the block (the folder must exist).

    A lock whose process is gone (same host, no such process id: e.g. a run that was killed) is taken over.

    Raises:
        StoreLockedError: a live process (or one on another host) holds the lock.
    """
    path = Path(directory) / LOCK_NAME
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text(encoding="utf-8"))
                stale = holder.get("host") == mine["host"] and not _process_alive(int(holder.get("pid")))
            except (OSError, ValueError, TypeError, AttributeError):  # unreadable: stale once it is old
                holder, stale = {}, _older_than(path, 10.0)
            if stale:
                path.unlink(missing_ok=True)
                continue
            raise StoreLockedError(
                f"Another writer (process {holder.get('pid')} on {holder.get('host')!r}) is adding to the "
                f"adapter store {directory}. Wait for it to finish; if no writer runs, delete {path}."
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(mine))
        break
    else:
        raise StoreLockedError(f"Could not take the lock {path}; another writer keeps taking it.")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return True


# ------------------------------------------------------------------------------------------------ writer
@dataclass
class _Pending:
    record_id: str
    content_sha256: str
    order: int | None
    metadata: dict[str, Any]
    factors: list[tuple[torch.Tensor, torch.Tensor, float]]  # per module: A [r, d_in], Bt [r, d_out], scale


def _compact(values: list[Any]) -> Any:
    """One value when all modules agree, else the list (keeps the index small in the common case)."""
    return values[0] if all(v == values[0] for v in values) else values


class StoreWriter:
    """Adds adapters to an existing store (see :func:`create_store`), one shard per ``max_shard_bytes``.

    Use as a context manager (the last shard is written on exit) or call :meth:`close`. Several processes
    may write to one store at once, each with its own ``process_index``; one run at a time (see
    :func:`writer_lock`), and :func:`consolidate_store` afterwards merges their index parts.

    Args:
        directory: the store folder.
        process_index: this process's rank, part of its shard names.
        max_shard_bytes: a shard is written once the buffered factors reach this size (and on close).

    Attributes:
        records_written, shards_written, bytes_written: what this writer has written so far.
        write_seconds: time spent building and writing shards and parts.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        process_index: int = 0,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> None:
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
        self.directory = Path(directory)
        view = read_view(self.directory)
        self._header = view.header
        self._modules = {n: (int(s[0]), int(s[1])) for n, s in view.header["modules"].items()}
        dtypes = {info.get("dtype") for info in view.shards.values()} - {None}
        self._dtype: str | None = dtypes.pop() if len(dtypes) == 1 else None
        self.process_index = int(process_index)
        self.max_shard_bytes = int(max_shard_bytes)
        self._token = f"{time.time_ns():016x}-{secrets.token_hex(3)}"
        self._buffer: list[_Pending] = []
        self._buffered_bytes = 0
        self._seen: set[str] = set()
        self.records_written = self.shards_written = self.bytes_written = 0
        self.write_seconds = 0.0

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(
        self, record_id: str, adapter: ContextAdapter, content_sha256: str, order: int | None = None
    ) -> None:
        """Queue one record's adapter (made from a text whose :func:`~ctx2param.store.content_hash` is
        ``content_sha256``); ``order`` places it among the records of this run (e.g. its corpus line).

        Raises:
            StoreMismatchError: the adapter is for another base model or other modules than the store's.
            ValueError: a batched adapter, a repeated id, a dtype other than the store's, or metadata that is
                not JSON.
        """
        started = time.perf_counter()
        if not isinstance(record_id, str) or not record_id:
            raise ValueError(f"Record ids are non-empty strings; got {record_id!r}.")
        if record_id in self._seen:
            raise ValueError(f"Record {record_id!r} was already added by this writer.")
        if not isinstance(adapter, ContextAdapter) or adapter.batch_size is not None:
            raise ValueError(
                f"Record {record_id!r}: expected one (unbatched) ContextAdapter, got {adapter!r}."
            )
        self._check_adapter(record_id, adapter)
        try:
            metadata = json.loads(json.dumps(adapter.metadata))
        except (TypeError, ValueError) as err:
            raise ValueError(f"Record {record_id!r}: the adapter's metadata is not JSON ({err}).") from err
        factors = []
        for name in self._modules:
            f = adapter[name]
            A = f.A.detach().to("cpu").contiguous()
            Bt = f.B.detach().to("cpu").mT.contiguous()
            factors.append((A, Bt, float(f.scale)))
            self._buffered_bytes += (A.numel() + Bt.numel()) * A.element_size()
        self._buffer.append(_Pending(record_id, content_sha256, order, metadata, factors))
        self._seen.add(record_id)
        self.write_seconds += time.perf_counter() - started
        if self._buffered_bytes >= self.max_shard_bytes:
            self.flush()

    def _check_adapter(self, record_id: str, adapter: ContextAdapter) -> None:
        header = self._header
        for what, ours, theirs in (
            ("base model", header.get("base_model"), adapter.base_model),
            ("revision", header.get("base_revision"), adapter.base_revision),
        ):
            if ours and theirs and ours != theirs:
                raise StoreMismatchError(
                    f"Record {record_id!r}: the adapter is for {what} {theirs!r}, the store "
                    f"{self.directory} for {ours!r}."
                )
        if set(adapter) != set(self._modules) or any(adapter[n].shape != s for n, s in self._modules.items()):
            raise StoreMismatchError(
                f"Record {record_id!r}: the adapter's modules or shapes differ from the store's "
                f"({len(adapter)} modules vs {len(self._modules)}); it was made for another base model."
            )
        dtype = str(adapter.dtype).removeprefix("torch.")
        if self._dtype is None:
            self._dtype = dtype
        elif dtype != self._dtype:
            raise ValueError(
                f"Record {record_id!r}: the adapter is {dtype}, the store's adapters are {self._dtype}; load "
                "the generator in the dtype the store was made with."
            )

    def flush(self) -> Path | None:
        """Write the buffered records as one shard and its index part; returns the shard's path (or None)."""
        if not self._buffer:
            return None
        started = time.perf_counter()
        records, self._buffer, self._buffered_bytes = self._buffer, [], 0
        stem = f"{self._token}-p{self.process_index:03d}-{self.shards_written:06d}"
        shard_name = stem + SHARD_SUFFIX
        tensors: dict[str, torch.Tensor] = {}
        offsets: list[list[int]] = [[] for _ in records]
        digests = [hashlib.sha256() for _ in records]
        for m, name in enumerate(self._modules):
            row = 0
            for k, record in enumerate(records):
                A, Bt, _ = record.factors[m]
                offsets[k].append(row)
                row += A.shape[0]
                tensor_digest(digests[k], A)
                tensor_digest(digests[k], Bt)
            tensors[f"{name}.A"] = torch.cat([r.factors[m][0] for r in records])
            tensors[f"{name}.Bt"] = torch.cat([r.factors[m][1] for r in records])
        shards_dir = self.directory / SHARDS_DIR
        shards_dir.mkdir(exist_ok=True)
        path = shards_dir / shard_name
        tmp = shards_dir / f".{shard_name}.tmp"
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt", "ctx2param": "adapter-store-shard"})
            size, digest = tmp.stat().st_size, sha256_file(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        entries = [
            {
                "id": r.record_id,
                "content_sha256": r.content_sha256,
                "shard": shard_name,
                "offset": _compact(offsets[k]),
                "rank": _compact([f[0].shape[0] for f in r.factors]),
                "scale": _compact([f[2] for f in r.factors]),
                "sha256": digests[k].hexdigest(),
                "order": r.order,
                "metadata": r.metadata,
            }
            for k, r in enumerate(records)
        ]
        part = {
            "format": INDEX_FORMAT,
            "schema_version": STORE_SCHEMA_VERSION,
            "shards": {
                shard_name: {"bytes": size, "sha256": digest, "dtype": self._dtype, "records": len(records)}
            },
            "records": entries,
        }
        parts_dir = self.directory / PARTS_DIR
        parts_dir.mkdir(exist_ok=True)
        write_text_atomically(parts_dir / (stem + PART_SUFFIX), json.dumps(part) + "\n")
        self.records_written += len(records)
        self.shards_written += 1
        self.bytes_written += size
        self.write_seconds += time.perf_counter() - started
        return path

    def close(self) -> None:
        """Write what is buffered."""
        self.flush()


# ----------------------------------------------------------------------------------------- consolidation
@dataclass
class ConsolidationReport:
    """What :func:`consolidate_store` did."""

    records: int
    merged_parts: int
    dropped_records: list[str] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)


def consolidate_store(directory: str | os.PathLike) -> ConsolidationReport:
    """Merge the index parts into ``index.json`` and clean up; run it from one process, under the lock.

    Records whose shard is missing or has another size than recorded are dropped (a later run makes them
    again); the merged parts, the shards no record uses and the temporary files of killed writers are
    deleted. ``index.json`` is replaced atomically before anything is deleted.
    """
    directory = Path(directory)
    view = read_view(directory)
    shards_dir, parts_dir = directory / SHARDS_DIR, directory / PARTS_DIR
    intact = {
        name
        for name, info in view.shards.items()
        if (shards_dir / name).is_file() and (shards_dir / name).stat().st_size == info.get("bytes")
    }
    records = {rid: e for rid, e in view.records.items() if e["shard"] in intact}
    dropped = [rid for rid in view.records if rid not in records]
    used = {e["shard"] for e in records.values()}
    if view.parts or dropped or not (directory / INDEX_NAME).is_file():  # else index.json is up to date
        index = {
            "format": INDEX_FORMAT,
            "schema_version": STORE_SCHEMA_VERSION,
            "shards": {name: view.shards[name] for name in sorted(used)},
            "records": list(records.values()),
        }
        write_text_atomically(directory / INDEX_NAME, json.dumps(index) + "\n")
    removed = []
    for part in view.parts:
        part.unlink(missing_ok=True)
        removed.append(f"{PARTS_DIR}/{part.name}")
    for folder, keep in ((shards_dir, used), (parts_dir, set())):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if (
                path.is_file()
                and path.name not in keep
                and (folder is shards_dir or path.name.startswith("."))
            ):
                path.unlink(missing_ok=True)
                removed.append(f"{folder.name}/{path.name}")
    for path in directory.iterdir():  # temporary files of interrupted header or index writes
        if path.is_file() and path.name.startswith(".") and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return ConsolidationReport(len(records), len(view.parts), dropped, removed)
