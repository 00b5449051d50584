"""``AdapterStore``: a folder of generated adapters, one per record of a corpus, read without unpickling.

A store is what ``ctx2param adapt --corpus FILE.jsonl --model M --out DIR`` makes (a parametric memory of a
document collection): ``store[id]`` is the :class:`~ctx2param.ContextAdapter` that
``model.generate_adapter(text)`` gave for the record, and ``store.sum(ids)`` the exact sum of a retrieved set,
``compose([store[i] for i in ids])``, in one call that reads only those records.

Layout of ``DIR``::

    ctx2param_store.json       header: format, schema version, base model id and revision, target modules
                               with their ΔW shapes (in adapter order), the generator that made the adapters
    index.json                 records: id, SHA-256 of the record's text, shard, row offset and rank, scale,
                               SHA-256 of the record's tensors, metadata; and each shard's size and SHA-256
    shards/<name>.safetensors  many adapters each: per target module ``<module>.A`` ``[ΣR, d_in]`` and
                               ``<module>.Bt`` ``[ΣR, d_out]`` (B transposed), the records' factors stacked
                               along the rank; a record owns rows ``offset : offset + rank``
    parts/<name>.json          the index entries of one shard not merged into ``index.json`` yet

Writers (:mod:`ctx2param.store_writer`) write a shard to a temporary name and rename it, then write its part
the same way, so a shard is complete or absent and only parts name shards; a reader merges ``index.json``
with the parts, so a store that a killed run left behind reads correctly too. Each record's tensors carry a
SHA-256 checked on every read: a corrupted, truncated or missing shard raises :class:`StoreFileError` naming
the shard and the record.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .adapter import ADAPTER_CONFIG_NAME, ContextAdapter, LoraFactors, compose
from .errors import AdapterFileError, AdapterMismatchError, Ctx2ParamError
from .file_utils import sha256_file
from .modules import module_shape

STORE_SCHEMA_VERSION = 1
STORE_FORMAT = "ctx2param-adapter-store"
HEADER_NAME = "ctx2param_store.json"
INDEX_NAME = "index.json"
SHARDS_DIR = "shards"
PARTS_DIR = "parts"
SHARD_SUFFIX = ".safetensors"
PART_SUFFIX = ".json"
_ENTRY_KEYS = ("id", "content_sha256", "shard", "offset", "rank", "scale", "sha256")

__all__ = [
    "AdapterStore",
    "StoreFileError",
    "StoreMismatchError",
    "UnknownRecordError",
    "content_hash",
    "read_header",
    "read_view",
]


class StoreFileError(AdapterFileError):
    """A folder is not an adapter store, or a store's header, index or shard is missing or corrupted."""


class StoreMismatchError(AdapterMismatchError):
    """A store and a model or generator do not fit (another base model, other modules, another generator)."""


class UnknownRecordError(Ctx2ParamError, KeyError):
    """A record id that the store does not hold."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class _PartVanished(Exception):
    """An index part was merged and deleted by a writer while it was being read."""


def content_hash(text: str) -> str:
    """Hex SHA-256 of ``text`` in UTF-8: how a store tells whether a record's text changed."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tensor_digest(digest: Any, tensor: torch.Tensor) -> None:
    """Feed the bytes of a contiguous CPU ``tensor`` (any dtype, bf16 included) into a ``hashlib`` digest."""
    digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def per_module(value: Any, count: int, what: str) -> list[Any]:
    """An entry's ``offset`` / ``rank`` / ``scale``: one value for every module, or a list of ``count``."""
    if isinstance(value, list):
        if len(value) != count:
            raise ValueError(f"{what} lists {len(value)} values for {count} modules")
        return value
    return [value] * count


# ------------------------------------------------------------------------------------------------ reading
def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if what == "index part":
            raise _PartVanished(path) from None
        raise StoreFileError(f"The store's {what} {path} is missing.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreFileError(
            f"The store's {what} {path} cannot be read ({err}); it is corrupted or truncated."
        ) from err
    if not isinstance(data, dict):
        raise StoreFileError(
            f"The store's {what} {path} must hold a JSON object, found {type(data).__name__}."
        )
    return data


def read_header(directory: str | os.PathLike) -> dict[str, Any]:
    """The header of the store in ``directory`` (``ctx2param_store.json``), checked.

    Raises:
        StoreFileError: ``directory`` is missing, not a folder, not a store (with a hint when it holds a
            single adapter), or its header is corrupted or of a newer schema than this ctx2param reads.
    """
    directory = Path(directory)
    if not directory.exists():
        raise StoreFileError(
            f"There is no adapter store at {directory}: the folder does not exist. Make one with "
            f"`ctx2param adapt --corpus FILE.jsonl --model M --out {directory}`."
        )
    if not directory.is_dir():
        raise StoreFileError(f"{directory} is a file, not an adapter store (a folder).")
    path = directory / HEADER_NAME
    if not path.is_file():
        hint = (
            f" It holds a single adapter: load it with ContextAdapter.from_pretrained({str(directory)!r})."
            if (directory / ADAPTER_CONFIG_NAME).is_file()
            else f" Make one with `ctx2param adapt --corpus FILE.jsonl --model M --out {directory}`."
        )
        raise StoreFileError(f"{directory} is not an adapter store: it has no {HEADER_NAME}.{hint}")
    header = _read_json(path, "header")
    if header.get("format") != STORE_FORMAT:
        raise StoreFileError(f"{path} is not an adapter store header (format {header.get('format')!r}).")
    version = header.get("schema_version")
    if not isinstance(version, int) or version > STORE_SCHEMA_VERSION:
        raise StoreFileError(
            f"{directory} uses adapter store schema version {version!r}; this ctx2param reads up to "
            f"{STORE_SCHEMA_VERSION}. Upgrade ctx2param (pip install -U ctx2param)."
        )
    modules = header.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise StoreFileError(f"{path} lists no target modules; the header is corrupted.")
    return header


def _check_index(data: dict[str, Any], path: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    records, shards = data.get("records"), data.get("shards")
    if not isinstance(records, list) or not isinstance(shards, dict):
        raise StoreFileError(f"{path} lacks its 'records' list or 'shards' table; the file is corrupted.")
    for i, entry in enumerate(records):
        missing = [k for k in _ENTRY_KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise StoreFileError(f"{path}: record {i} lacks {missing}; the file is corrupted.")
        if entry["shard"] not in shards:
            raise StoreFileError(
                f"{path}: record {entry['id']!r} is in shard {entry['shard']!r}, which the file's shard "
                "table does not list; the file is corrupted."
            )
    return records, shards


@dataclass
class StoreView:
    """The records of a store as its readers see them: ``index.json`` merged with the unmerged parts.

    Attributes:
        header: the store's header.
        records: ``{id: entry}`` in store order: by each record's ``order`` (the corpus line it was made
            from; ties and records without one keep their index order), so that a store made in one run, in
            several processes or over interrupted runs lists its records alike; a part's entry replaces an
            older one of the same id.
        shards: ``{shard file name: {"bytes", "sha256", "dtype", "records"}}``.
        parts: the part files merged into this view (oldest first).
    """

    header: dict[str, Any]
    records: dict[str, dict[str, Any]]
    shards: dict[str, dict[str, Any]]
    parts: list[Path]


def read_view(directory: str | os.PathLike) -> StoreView:
    """Read the header, ``index.json`` and every complete part of the store in ``directory``.

    Parts are applied oldest first (their names start with a time stamp), so a record made again (its text
    changed) reads as the newest one. Temporary files of writers (names starting with ``.``) are ignored. A
    part that disappears while it is read (a writer merged it into ``index.json`` meanwhile) starts the read
    again.
    """
    for _ in range(5):
        try:
            return _read_view(Path(directory))
        except _PartVanished:
            continue
    return _read_view(Path(directory))


def _read_view(directory: Path) -> StoreView:
    header = read_header(directory)
    records: dict[str, dict[str, Any]] = {}
    shards: dict[str, dict[str, Any]] = {}
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        entries, table = _check_index(_read_json(index_path, "index"), index_path)
        records.update((e["id"], e) for e in entries)
        shards.update(table)
    parts_dir = directory / PARTS_DIR
    parts = (
        sorted(p for p in parts_dir.iterdir() if p.suffix == PART_SUFFIX and not p.name.startswith("."))
        if parts_dir.is_dir()
        else []
    )
    new: dict[str, dict[str, Any]] = {}
    for part in parts:
        entries, table = _check_index(_read_json(part, "index part"), part)
        shards.update(table)
        new.update((e["id"], e) for e in entries)
    if new:  # merged records are kept sorted by their order (corpus line); index.json is written sorted
        records.update(new)
        records = dict(sorted(records.items(), key=lambda item: _order_key(item[1])))
    return StoreView(header, records, shards, parts)


def _order_key(entry: Mapping[str, Any]) -> tuple[bool, int]:
    """Store order: by ``order`` (the record's corpus line); records without one last, in index order."""
    order = entry.get("order")
    return (not isinstance(order, int), order if isinstance(order, int) else 0)


def _shard_error(shard: Path, record_id: str, problem: str) -> StoreFileError:
    return StoreFileError(
        f"Shard {shard} of the adapter store {shard.parent.parent} {problem} (reading record {record_id!r}). "
        f"Delete the shard and run the same `ctx2param adapt --corpus ... --out {shard.parent.parent}` "
        "again: the records it held are made again."
    )


def entry_layout(entry: Mapping[str, Any], count: int) -> tuple[list[int], list[int], list[float]]:
    """``(offsets, ranks, scales)`` of an index entry, one per module (of ``count``)."""
    try:
        return (
            [int(v) for v in per_module(entry["offset"], count, "offset")],
            [int(v) for v in per_module(entry["rank"], count, "rank")],
            [float(v) for v in per_module(entry["scale"], count, "scale")],
        )
    except (TypeError, ValueError) as err:
        raise StoreFileError(f"The index entry of record {entry['id']!r} is corrupted: {err}.") from err


def _read_record(
    handle: Any,
    shard: Path,
    entry: dict[str, Any],
    modules: Mapping[str, Sequence[int]],
    into: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One record's factors ``[(A [r, d_in], Bt [r, d_out])]`` per module from an open shard, with its
    SHA-256 checked; copied into ``into`` (contiguous CPU tensors of those shapes and the shard's dtype) when
    given, else into new tensors."""
    record_id = entry["id"]
    offsets, ranks, _ = entry_layout(entry, len(modules))
    digest = hashlib.sha256()
    out = []
    for m, ((name, (d_out, d_in)), offset, rank) in enumerate(
        zip(modules.items(), offsets, ranks, strict=True)
    ):
        try:
            # the slices may share memory with the mapped file (which a writer could replace): copy them
            A_src = handle.get_slice(f"{name}.A")[offset : offset + rank]
            Bt_src = handle.get_slice(f"{name}.Bt")[offset : offset + rank]
        except (SafetensorError, OSError, ValueError) as err:
            raise _shard_error(
                shard, record_id, f"cannot be read ({err}): it is corrupted or truncated"
            ) from err
        if tuple(A_src.shape) != (rank, d_in) or tuple(Bt_src.shape) != (rank, d_out):
            raise _shard_error(shard, record_id, f"holds factors of the wrong shape for {name!r}")
        if into is None:
            A, Bt = A_src.clone(), Bt_src.clone()
        else:
            A, Bt = into[m]
            if A.dtype != A_src.dtype or Bt.dtype != Bt_src.dtype:
                raise _shard_error(
                    shard, record_id, f"holds {A_src.dtype} factors, not its indexed {A.dtype}"
                )
            A.copy_(A_src)
            Bt.copy_(Bt_src)
        tensor_digest(digest, A)
        tensor_digest(digest, Bt)
        out.append((A, Bt))
    if digest.hexdigest() != entry["sha256"]:
        raise _shard_error(
            shard, record_id, "does not match the SHA-256 recorded for the record: it is corrupted"
        )
    return out


# ------------------------------------------------------------------------------------------------- store
class AdapterStore(Mapping[str, ContextAdapter]):
    """A read-only mapping from record id to the :class:`~ctx2param.ContextAdapter` generated for it.

    Args:
        directory: a store folder (``ctx2param adapt --corpus FILE.jsonl --model M --out DIR`` makes one).
        device: where the adapters' factors are put (read on the CPU, checked, then moved).

    Record ids are strings (integer ids of a corpus are stored as their decimal text, and integer keys are
    looked up the same way). The index is read once, when the store is opened; :meth:`refresh` reads it
    again (e.g. while a writer is adding records).

    Example:
        >>> store = AdapterStore("memory/")
        >>> adapter = store.sum(["doc-17", "doc-4"])      # == compose([store["doc-17"], store["doc-4"]])
        >>> with model.adapted(adapter): ...

    Raises:
        StoreFileError: ``directory`` is not a store, or its header or index is corrupted.
    """

    def __init__(self, directory: str | os.PathLike, device: torch.device | str = "cpu") -> None:
        self.directory = Path(directory)
        self.device = torch.device(device)
        self.refresh()

    def refresh(self) -> None:
        """Read the header and the index (with unmerged parts) again."""
        view = read_view(self.directory)
        self._header = view.header
        self._records = view.records
        self._shards = view.shards
        self._modules = {name: tuple(int(d) for d in shape) for name, shape in view.header["modules"].items()}

    # ------------------------------------------------------------------------------------------ facts
    @property
    def base_model(self) -> str | None:
        """Id or path of the base model the adapters were made for."""
        return self._header.get("base_model")

    @property
    def base_revision(self) -> str | None:
        return self._header.get("base_revision")

    @property
    def modules(self) -> dict[str, tuple[int, int]]:
        """``{target module name: (d_out, d_in)}``, in the adapters' module order."""
        return dict(self._modules)

    @property
    def generator(self) -> dict[str, Any] | None:
        """What made the adapters (``name``, ``method``, ``fingerprint``), when the writer said."""
        generator = self._header.get("generator")
        return copy.deepcopy(generator) if generator is not None else None

    def ids(self) -> list[str]:
        """The record ids, in store order (the order of the corpus they were made from)."""
        return list(self._records)

    def content_hash(self, record_id: str | int) -> str:
        """SHA-256 of the text the record's adapter was made from (:func:`content_hash`)."""
        return self._entry(record_id)["content_sha256"]

    def record_info(self, record_id: str | int) -> dict[str, Any]:
        """A copy of the record's index entry (shard, offset, rank, scale, hashes, metadata)."""
        return copy.deepcopy(self._entry(record_id))

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._records))

    def __contains__(self, record_id: object) -> bool:
        key = _key(record_id)
        return key is not None and key in self._records

    def __repr__(self) -> str:
        return (
            f"AdapterStore({str(self.directory)!r}, records={len(self)}, modules={len(self._modules)}, "
            f"base_model={self.base_model!r})"
        )

    # -------------------------------------------------------------------------------------- reading
    def __getitem__(self, record_id: str | int) -> ContextAdapter:
        key = self._known([record_id])[0]
        return self._load([key])[key]

    def load(self, ids: Iterable[str | int]) -> list[ContextAdapter]:
        """``[store[i] for i in ids]``, reading each shard once."""
        keys = self._known(ids)
        loaded = self._load(list(dict.fromkeys(keys)))
        return [loaded[k] for k in keys]

    def sum(self, ids: Iterable[str | int], weights: Sequence[float] | None = None) -> ContextAdapter:
        """``compose([store[i] for i in ids], weights)``: the exact (weighted) sum of the records' ΔW.

        Reads only the listed records (each shard opened once, only their rows); an id listed twice counts
        twice, as in ``compose``.

        Raises:
            ValueError: ``ids`` is empty, or ``weights`` does not have one weight per id.
            UnknownRecordError: an id is not in the store (all unknown ids are named).
        """
        keys = self._known(ids)
        if not keys:
            raise ValueError("AdapterStore.sum() needs at least one record id.")
        if weights is not None and len(weights) != len(keys):
            raise ValueError(f"AdapterStore.sum() got {len(keys)} ids but {len(weights)} weights.")
        if weights is None:
            direct = self._sum_direct(keys)
            if direct is not None:
                return direct
        loaded = self._load(list(dict.fromkeys(keys)))
        return compose([loaded[k] for k in keys], weights)

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise :class:`StoreMismatchError` unless the store's adapters fit ``model``.

        ``model`` is a generator (a :class:`~ctx2param.ContextAdaptationModel`: its base model id, revision
        and target shapes are compared) or a causal LM (every target module must exist with the store's
        shapes).
        """
        config = getattr(model, "config", None)
        shapes = getattr(config, "target_shapes", None)
        if isinstance(shapes, dict) and hasattr(model, "get_adapter_root"):
            base = getattr(config, "base_model_name_or_path", None)
            revision = getattr(config, "base_model_revision", None)
            for what, ours, theirs in (
                ("base model", self.base_model, base),
                ("revision", self.base_revision, revision),
            ):
                if ours and theirs and ours != theirs:
                    raise StoreMismatchError(
                        f"The adapter store {self.directory} was made for {what} {ours!r}; the model is for "
                        f"{theirs!r}. Use a store made with this model's generator."
                    )
            found = {name: tuple(shape) for name, shape in shapes.items()}
        else:
            root = model.get_adapter_root() if hasattr(model, "get_adapter_root") else model
            named = dict(root.named_modules())
            found = {name: module_shape(named[name]) for name in self._modules if name in named}
        if found != self._modules:
            missing = sorted(set(self._modules) - set(found))[:3]
            differing = [
                (n, self._modules[n], found[n])
                for n in self._modules
                if n in found and found[n] != self._modules[n]
            ]
            raise StoreMismatchError(
                f"The adapter store {self.directory} was made for base model {self.base_model!r}, whose "
                f"target layers the model does not have: missing {missing}, differing (name, store (d_out, "
                f"d_in), model) {differing[:3]}; {len(self._modules)} modules in the store, {len(found)} "
                "matching names in the model."
            )

    def verify(self) -> int:
        """Check every shard in use against its recorded size and SHA-256 (reads the whole store).

        Returns:
            The number of shards checked.

        Raises:
            StoreFileError: naming the first missing, truncated or corrupted shard and its number of records.
        """
        used: dict[str, list[str]] = {}
        for record_id, entry in self._records.items():
            used.setdefault(entry["shard"], []).append(record_id)
        for name, record_ids in used.items():
            info, path = self._shards[name], self._shard_path(name)
            if not path.is_file():
                problem = "is missing"
            elif path.stat().st_size != info.get("bytes"):
                problem = f"has {path.stat().st_size} bytes instead of {info.get('bytes')}: it is truncated"
            elif sha256_file(path) != info.get("sha256"):
                problem = "does not match its recorded SHA-256: it is corrupted"
            else:
                continue
            raise _shard_error(path, record_ids[0], f"{problem}; it holds {len(record_ids)} record(s)")
        return len(used)

    # ----------------------------------------------------------------------------------------- helpers
    def _entry(self, record_id: str | int) -> dict[str, Any]:
        return self._records[self._known([record_id])[0]]

    def _known(self, ids: Iterable[str | int]) -> list[str]:
        if isinstance(ids, (str, bytes)):
            raise TypeError("Pass a list of record ids (a single string is not a list of ids).")
        ids = list(ids)
        keys = [_key(i) for i in ids]
        unknown = [i for i, k in zip(ids, keys, strict=True) if k is None or k not in self._records]
        if unknown:
            shown = ", ".join(repr(u) for u in list(dict.fromkeys(map(str, unknown)))[:5])
            examples = ", ".join(repr(i) for i in list(self._records)[:3])
            raise UnknownRecordError(
                f"{len(unknown)} id(s) not in the adapter store {self.directory}: {shown}. It holds "
                f"{len(self)} record(s)" + (f", e.g. {examples}." if examples else ".")
            )
        return keys  # type: ignore[return-value]

    def _shard_path(self, name: str) -> Path:
        return self.directory / SHARDS_DIR / name

    def _open_shards(self, keys: Sequence[str], read: Any) -> None:
        """Call ``read(handle, path, index)`` for every position of ``keys``, opening each shard once."""
        by_shard: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            by_shard.setdefault(self._records[key]["shard"], []).append(i)
        for name, positions in by_shard.items():
            path = self._shard_path(name)
            first = keys[positions[0]]
            if not path.is_file():
                raise _shard_error(path, first, "is missing")
            try:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    for i in positions:
                        read(handle, path, i)
            except (SafetensorError, OSError) as err:
                raise _shard_error(
                    path, first, f"cannot be read ({err}): it is corrupted or truncated"
                ) from err

    def _load(self, keys: list[str]) -> dict[str, ContextAdapter]:
        """``{id: adapter}`` for known, distinct ``keys``."""
        out: dict[str, ContextAdapter] = {}

        def read(handle: Any, path: Path, i: int) -> None:
            entry = self._records[keys[i]]
            pairs = _read_record(handle, path, entry, self._modules)
            _, _, scales = entry_layout(entry, len(self._modules))
            factors = {
                name: LoraFactors(A, Bt.mT.contiguous(), scale)
                for name, (A, Bt), scale in zip(self._modules, pairs, scales, strict=True)
            }
            out[keys[i]] = self._adapter(factors, entry.get("metadata"))

        self._open_shards(keys, read)
        return {key: out[key] for key in keys}

    def _sum_direct(self, keys: list[str]) -> ContextAdapter | None:
        """``compose([self[k] for k in keys])`` built in place: each record's rows are copied from its shard
        straight into the concatenated factors (no per-record adapters, no second concatenation). Only when
        ``compose`` would concatenate without folding scales (every module's scale the same in all records)
        and all records share one dtype; else ``None``."""
        count = len(self._modules)
        layouts = [entry_layout(self._records[k], count) for k in keys]
        dtypes = {self._shards[self._records[k]["shard"]].get("dtype") for k in keys}
        if len(dtypes) != 1 or not isinstance(dtype_name := dtypes.pop(), str):
            return None
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype) or any(
            len({layout[2][m] for layout in layouts}) > 1 for m in range(count)
        ):
            return None
        totals = [sum(layout[1][m] for layout in layouts) for m in range(count)]
        shapes = list(self._modules.values())
        A_out = [torch.empty(totals[m], d_in, dtype=dtype) for m, (_, d_in) in enumerate(shapes)]
        Bt_out = [torch.empty(totals[m], d_out, dtype=dtype) for m, (d_out, _) in enumerate(shapes)]
        into: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        cursor = [0] * count
        for _, ranks, _ in layouts:  # the rows of each occurrence, in the order of keys
            into.append(
                [
                    (A_out[m][cursor[m] : cursor[m] + r], Bt_out[m][cursor[m] : cursor[m] + r])
                    for m, r in enumerate(ranks)
                ]
            )
            cursor = [c + r for c, r in zip(cursor, ranks, strict=True)]
        self._open_shards(
            keys, lambda h, path, i: _read_record(h, path, self._records[keys[i]], self._modules, into[i])
        )
        factors = {
            name: LoraFactors(A_out[m], Bt_out[m].mT.contiguous(), layouts[0][2][m])
            for m, name in enumerate(self._modules)
        }
        return self._adapter(factors, None)

    def _adapter(self, factors: dict[str, LoraFactors], metadata: Mapping[str, Any] | None) -> ContextAdapter:
        if self.device.type != "cpu":
            factors = {
                n: LoraFactors(f.A.to(self.device), f.B.to(self.device), f.scale) for n, f in factors.items()
            }
        return ContextAdapter(
            factors, self.base_model, self.base_revision, copy.deepcopy(dict(metadata or {}))
        )


def _key(record_id: object) -> str | None:
    """The store key of an id: strings as they are, integers as decimal text; anything else is no id."""
    if isinstance(record_id, str):
        return record_id
    if isinstance(record_id, int) and not isinstance(record_id, bool):
        return str(record_id)
    return None
