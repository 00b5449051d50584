"""A corpus turned into an :class:`~ctx2param.AdapterStore`: one adapter per record, batched and resumable.

The corpus is JSON Lines, one record per line: ``{"id": "doc-1", "text": "..."}`` (UTF-8; blank lines are
skipped; other keys are ignored). Ids are non-empty strings or integers (stored as their decimal text) and
unique; texts are non-empty. :func:`read_corpus` names the line of any problem.

:func:`adapt_corpus` (what ``ctx2param adapt --corpus FILE.jsonl --model M --out DIR`` runs):

- **Batched.** The corpus is cut into consecutive batches of ``batch_size`` records (file order); each batch
  is one ``model.generate_adapter(list_of_texts)`` call. The batches depend only on the corpus and the batch
  size, never on the number of processes or on what an earlier run stored, so a store made in one run, in
  several processes or over interrupted runs holds the same tensors record for record.
- **Resumable.** A record already in the store with the same id and the same text (SHA-256) is skipped. A
  record whose text changed is an error naming it, unless ``update=True`` (``--update``): then it is made
  again and replaces the old adapter. Records of the store that the corpus does not name are kept. A run that
  was killed leaves only complete shards; the next run recovers (merges what was finished, deletes the rest)
  and makes each missing record exactly once.
- **Several processes.** Under ``accelerate launch`` pass ``state=accelerate.PartialState()``: the batches
  still to make are dealt round-robin to the processes, each writes its own shards, and the main process
  merges the index at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .errors import ContextError
from .store import content_hash, read_view, tensor_digest
from .store_writer import (
    DEFAULT_MAX_SHARD_BYTES,
    StoreWriter,
    check_header,
    consolidate_store,
    create_store,
    writer_lock,
)

__all__ = [
    "CorpusChangedError",
    "CorpusError",
    "CorpusRecord",
    "CorpusRunResult",
    "adapt_corpus",
    "changed_records",
    "check_store_folder",
    "corpus_records",
    "generator_info",
    "read_corpus",
]


class CorpusError(ContextError):
    """A corpus file or record is malformed (bad JSON, missing id or text, duplicate id, empty text)."""


class CorpusChangedError(ContextError):
    """Records of the corpus are in the store with another text, and ``update`` was not asked for."""


@dataclass(frozen=True)
class CorpusRecord:
    """One record: its ``id``, ``text``, 1-based ``line`` in the corpus file (position in a list) and the
    SHA-256 of its text (:func:`~ctx2param.store.content_hash`)."""

    id: str
    text: str
    line: int
    content_sha256: str


def _record(obj: Any, where: str, line: int) -> CorpusRecord:
    if not isinstance(obj, Mapping):
        raise CorpusError(
            f'{where}: expected an object like {{"id": ..., "text": ...}}, got {type(obj).__name__}.'
        )
    missing = [key for key in ("id", "text") if key not in obj]
    if missing:
        raise CorpusError(
            f"{where}: missing {' and '.join(repr(k) for k in missing)}; each record is "
            '{"id": ..., "text": ...}.'
        )
    record_id, text = obj["id"], obj["text"]
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        raise CorpusError(f"{where}: the id must be a string or an integer, got {type(record_id).__name__}.")
    record_id = str(record_id)
    if not record_id.strip():
        raise CorpusError(f"{where}: the id is empty.")
    if not isinstance(text, str):
        raise CorpusError(f"{where}: the text of {record_id!r} must be a string, got {type(text).__name__}.")
    if not text.strip():
        raise CorpusError(f"{where}: the text of {record_id!r} is empty; there is nothing to adapt to.")
    return CorpusRecord(record_id, text, line, content_hash(text))


def _unique(records: list[CorpusRecord], where: str, unit: str) -> list[CorpusRecord]:
    if not records:
        raise CorpusError(f'{where} holds no records; expected one {{"id": ..., "text": ...}} per {unit}.')
    seen: dict[str, int] = {}
    for record in records:
        if record.id in seen:
            raise CorpusError(
                f"{where}, {unit} {record.line}: the id {record.id!r} is already used on {unit} "
                f"{seen[record.id]}; ids must be unique."
            )
        seen[record.id] = record.line
    return records


def read_corpus(path: str | os.PathLike) -> list[CorpusRecord]:
    """The records of a JSON Lines corpus file, checked (see the module's docstring for the format).

    Raises:
        FileNotFoundError / IsADirectoryError: ``path`` is missing or a folder.
        CorpusError: a line is not JSON, lacks ``id`` or ``text``, repeats an id or has an empty text, or the
            file is not UTF-8 or holds no records; the message names the line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Corpus file {path} does not exist.")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; --corpus takes a JSON Lines file.")
    records = []
    with open(path, "rb") as fh:  # decoded line by line, so that a bad byte is reported on its own line
        for line, data in enumerate(fh, start=1):
            try:
                raw = data.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise CorpusError(f"{path}, line {line}: not UTF-8 text ({err.reason}).") from None
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as err:
                raise CorpusError(
                    f"{path}, line {line}: not valid JSON ({err.msg}, column {err.colno}); each line is "
                    'one object like {"id": ..., "text": ...}.'
                ) from None
            records.append(_record(obj, f"{path}, line {line}", line))
    return _unique(records, str(path), "line")


def corpus_records(
    corpus: str | os.PathLike | Iterable[Mapping[str, Any] | CorpusRecord],
) -> list[CorpusRecord]:
    """:class:`CorpusRecord` objects from a corpus file, or from ``{"id", "text"}`` mappings (checked like
    the lines of a file; ``line`` is the 1-based position)."""
    if isinstance(corpus, (str, os.PathLike)):
        return read_corpus(corpus)
    records = [
        item if isinstance(item, CorpusRecord) else _record(item, f"corpus record {i}", i)
        for i, item in enumerate(corpus, start=1)
    ]
    return _unique(records, "the corpus", "record")


def generator_info(model: Any, name: str | None = None) -> dict[str, Any]:
    """``{"name", "method", "fingerprint"}`` of a generator: the fingerprint is a SHA-256 of its own weights
    (as float32) and of the settings that shape its adapters (method, rank, scale, chunk size, targets)."""
    config = model.config
    settings = {
        k: getattr(config, k, None) for k in ("method", "rank", "scale", "chunk_tokens", "target_modules")
    }
    settings["target_shapes"] = {
        n: list(s) for n, s in (getattr(config, "target_shapes", None) or {}).items()
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8"))
    for key, tensor in sorted(model.method_state_dict().items()):
        digest.update(key.encode("utf-8"))
        tensor_digest(digest, tensor.detach().to("cpu", torch.float32).contiguous())
    return {
        "name": name or getattr(config, "_name_or_path", None) or type(model).__name__,
        "method": getattr(config, "method", None),
        "fingerprint": digest.hexdigest(),
    }


class ProcessState(Protocol):
    """What :func:`adapt_corpus` needs of ``accelerate.PartialState``."""

    process_index: int
    num_processes: int
    is_main_process: bool

    def wait_for_everyone(self) -> None: ...


@dataclass
class _OneProcess:
    process_index: int = 0
    num_processes: int = 1
    is_main_process: bool = True

    def wait_for_everyone(self) -> None:
        pass


@dataclass
class CorpusRunResult:
    """What one :func:`adapt_corpus` run did (counts over all processes unless they say ``here``).

    Attributes:
        records: records in the corpus. skipped: already stored with the same text. made: adapters made
        (``remade`` of them replace a changed text's). made_here: by this process. store_records: records in
        the store after the run (as this process saw it; the main process sees the merged store).
        generation_s / write_s: this process's time in ``generate_adapter`` / writing shards. wall_s: the
        whole call.
    """

    records: int
    skipped: int
    made: int
    remade: int
    made_here: int
    store_records: int
    generation_s: float
    write_s: float
    wall_s: float


def changed_records(
    records: Sequence[CorpusRecord], stored: Mapping[str, str], out: str | os.PathLike, update: bool
) -> list[CorpusRecord]:
    """The records whose id is stored (``stored``: ``{id: content hash}``) with another text.

    Raises:
        CorpusChangedError: there are such records and ``update`` is false (the first five are named).
    """
    changed = [r for r in records if r.id in stored and stored[r.id] != r.content_sha256]
    if changed and not update:
        shown = ", ".join(f"{r.id!r} (line {r.line})" for r in changed[:5])
        raise CorpusChangedError(
            f"{len(changed)} record(s) of the corpus are in the adapter store {out} with another text: "
            f"{shown}{', ...' if len(changed) > 5 else ''}. The store keeps the adapters of the old texts; "
            "pass --update (update=True) to make them again from the new texts, or write to another --out."
        )
    return changed


def _generate(model: Any, block: Sequence[CorpusRecord]) -> list[Any]:
    """The adapters of one batch; a context error names the record (the batch is retried one by one)."""
    try:
        adapters = model.generate_adapter([r.text for r in block])
    except ContextError:
        for record in block:
            try:
                model.generate_adapter([record.text])
            except ContextError as err:
                raise CorpusError(f"record {record.id!r} (line {record.line}): {err}") from err
        raise
    if len(adapters) != len(block):
        raise RuntimeError(f"generate_adapter returned {len(adapters)} adapters for {len(block)} texts.")
    return [a.detach() for a in adapters]


def adapt_corpus(
    model: Any,
    corpus: str | os.PathLike | Iterable[Mapping[str, Any] | CorpusRecord],
    out: str | os.PathLike,
    *,
    batch_size: int = 8,
    update: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    state: ProcessState | None = None,
    generator_name: str | None = None,
) -> CorpusRunResult:
    """Make one adapter per corpus record with ``model.generate_adapter`` and store them in ``out``.

    Args:
        model: a generator (:class:`~ctx2param.ContextAdaptationModel`).
        corpus: a JSON Lines file, or ``{"id": ..., "text": ...}`` mappings.
        out: the store folder (created; an existing store is added to).
        batch_size: records per ``generate_adapter`` call.
        update: make records whose text changed again (default: that is an error).
        max_shard_bytes: size of the factors per shard file.
        progress: show a tqdm progress bar (main process).
        state: ``accelerate.PartialState()`` when started by ``accelerate launch``; ``None``: one process.
        generator_name: recorded in the store's header (default: the generator's path or class).

    Raises:
        CorpusError: a malformed corpus, or a record the generator refuses (named).
        CorpusChangedError: records stored with another text, without ``update``.
        StoreMismatchError: ``out`` is a store of another base model or generator.
    """
    started = time.perf_counter()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    records = corpus_records(corpus)
    state = state if state is not None else _OneProcess()
    out = Path(out)
    config = model.config
    base, revision = config.base_model_name_or_path, config.base_model_revision
    modules = dict(config.target_shapes)
    if not modules:
        raise ValueError(
            f"The generator's config lists no target shapes; make it with {type(model).__name__}.from_base."
        )
    generator = generator_info(model, generator_name)
    main = state.is_main_process
    if main:
        check_store_folder(out)
        out.mkdir(parents=True, exist_ok=True)  # the lock lives in it
    with writer_lock(out) if main else nullcontext():
        if main:
            create_store(out, base_model=base, base_revision=revision, modules=modules, generator=generator)
            consolidate_store(out)  # recover what a killed run left
        state.wait_for_everyone()
        view = read_view(out)
        if not main:
            check_header(out, view.header, base, revision, modules, generator)
        stored = {rid: e["content_sha256"] for rid, e in view.records.items()}
        changed = changed_records(records, stored, out, update)
        todo = {r.id for r in records if stored.get(r.id) != r.content_sha256}
        blocks = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
        pending = [b for b in ([r for r in block if r.id in todo] for block in blocks) if b]
        mine = pending[state.process_index :: state.num_processes]
        state.wait_for_everyone()  # every process has planned from the same store before any writes to it
        generation_s = 0.0
        from tqdm.auto import tqdm

        bar = tqdm(
            total=sum(len(b) for b in mine),
            desc="adapters" if state.num_processes == 1 else f"adapters (process 0 of {state.num_processes})",
            unit="rec",
            disable=not (progress and main),
        )
        with (
            StoreWriter(out, process_index=state.process_index, max_shard_bytes=max_shard_bytes) as writer,
            bar,
        ):
            for block in mine:
                tick = time.perf_counter()
                adapters = _generate(model, block)
                generation_s += time.perf_counter() - tick
                for record, adapter in zip(block, adapters, strict=True):
                    writer.add(record.id, adapter, record.content_sha256, order=record.line)
                bar.update(len(block))
        state.wait_for_everyone()
        if main:
            consolidate_store(out)
        state.wait_for_everyone()  # the others read the store only once it is merged
        store_records = len(read_view(out).records)
    return CorpusRunResult(
        records=len(records),
        skipped=len(records) - len(todo),
        made=len(todo),
        remade=len(changed),
        made_here=writer.records_written,
        store_records=store_records,
        generation_s=generation_s,
        write_s=writer.write_seconds,
        wall_s=time.perf_counter() - started,
    )


def check_store_folder(out: str | os.PathLike) -> None:
    """Refuse an ``out`` that is a file, or a non-empty folder that is not an adapter store."""
    from .store import HEADER_NAME, StoreFileError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StoreFileError(f"--out {out} exists and is a file; an adapter store is a folder.")
    if out.is_dir() and not (out / HEADER_NAME).exists() and any(out.iterdir()):
        raise StoreFileError(
            f"--out {out} exists, is not empty and is not an adapter store; choose a new or empty folder."
        )
