"""The adapter store (``AdapterStore``, ``ctx2param.store_writer``) and ``ctx2param adapt --corpus``
(``ctx2param.corpus``): what is stored is what ``generate_adapter`` gives, ``sum`` is ``compose`` exactly and
reads only what it needs, corrupted shards are named, runs resume (also after SIGKILL) storing each record
once, and two processes under ``accelerate launch`` make the store that one process makes.

Tiny random models of two architectures (llama, gpt2) with the tests' MeanPool method and a tiny CompAs
(whose long texts are chunked, so records have different ranks); the real SmolLM2 once (marked slow)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

try:
    import _methods
except ModuleNotFoundError as _err:  # tests/ imported as a package
    if _err.name != "_methods":
        raise
    from tests import _methods

from ctx2param import (
    AdapterStore,
    CompAsConfig,
    CompAsModel,
    ContextAdapter,
    LoraFactors,
    apply_adapter,
    compose,
    testing_utils,
)
from ctx2param import store_writer as store_writer_module
from ctx2param.cli import main
from ctx2param.corpus import CorpusChangedError, CorpusError, adapt_corpus, corpus_records, read_corpus
from ctx2param.errors import AdapterMismatchError
from ctx2param.store import INDEX_NAME, StoreFileError, StoreMismatchError, UnknownRecordError, content_hash
from ctx2param.store_writer import LOCK_NAME, StoreLockedError, StoreWriter, writer_lock

pytestmark = pytest.mark.usefixtures("one_torch_thread")
_methods.register()

TEXTS = [
    "The secret password is Marigold.",
    "Paris is the capital of France; the meeting is on Thursday at ten in the morning.",
    "The quick brown fox jumps over the lazy dog.",
    "In 1905 the river flooded the old town; the bridge and the mill were rebuilt two years later.",
    "Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity.",
    "Choices: (A) red (B) green (C) blue (D) yellow. The answer is (C).",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024.",
]
CORPUS = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {arch: _methods.save_tiny_base(root / f"tiny-{arch}", arch) for arch in ("llama", "gpt2")}


@pytest.fixture(scope="module")
def generators(bases: dict[str, Path]) -> dict[str, Any]:
    """MeanPool on a llama and a gpt2 folder (their adapters name the base folder), and a tiny CompAs on
    gpt2 whose 16-token chunks give long texts a larger rank."""
    out = {arch: _methods.make_generator(str(path), arch) for arch, path in bases.items()}
    small = {"latent_dim": 32, "num_attention_heads": 2, "rank": 2, "decoder_hidden": 32, "chunk_tokens": 16}
    torch.manual_seed(0)
    out["compas"] = CompAsModel.from_base(
        testing_utils.tiny_model("gpt2"),
        CompAsConfig(target_modules=testing_utils.TARGET_MODULES["gpt2"], **small),
        tokenizer=testing_utils.tiny_tokenizer(),
    )
    return out


@pytest.fixture(scope="module")
def gen_dir(generators, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(generators["llama"].save_pretrained(tmp_path_factory.mktemp("gen") / "generator"))


def assert_same_adapter(got: ContextAdapter, want: ContextAdapter) -> None:
    """Bit-for-bit: modules in order, A, B, scale, base model, revision, metadata."""
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name].A, want[name].A), (
            name,
            (got[name].A - want[name].A).abs().max(),
            got.metadata,
        )
        assert torch.equal(got[name].B, want[name].B), name
        assert got[name].scale == want[name].scale, name
    assert (got.base_model, got.base_revision) == (want.base_model, want.base_revision)
    assert got.metadata == want.metadata


def assert_same_store(got: AdapterStore, want: AdapterStore) -> None:
    assert got.ids() == want.ids()
    for record_id in want.ids():
        assert got.content_hash(record_id) == want.content_hash(record_id)
        assert_same_adapter(got[record_id], want[record_id])


def one_adapter_bytes(generator: Any) -> int:
    return generator.generate_adapter(TEXTS[0]).num_parameters() * 4


# ------------------------------------------------------------------------------------------ reading back
@pytest.mark.parametrize("which", ["llama", "gpt2", "compas"])
def test_store_holds_what_generate_adapter_gives(generators, tmp_path: Path, which: str) -> None:
    generator = generators[which]
    result = adapt_corpus(
        generator, CORPUS, tmp_path / "store", batch_size=3, max_shard_bytes=1, progress=False
    )
    assert (result.records, result.made, result.skipped, result.store_records) == (7, 7, 0, 7)
    store = AdapterStore(tmp_path / "store")
    assert store.ids() == [r["id"] for r in CORPUS] and len(store) == 7 and list(store) == store.ids()
    assert "doc-3" in store and "doc-99" not in store and 3.5 not in store
    assert store.modules == {n: tuple(s) for n, s in generator.config.target_shapes.items()}
    ranks = set()
    for start in range(0, len(CORPUS), 3):  # the batches the corpus was made in
        block = CORPUS[start : start + 3]
        for record, want in zip(block, generator.generate_adapter([r["text"] for r in block]), strict=True):
            got = store[record["id"]]
            assert_same_adapter(got, want.detach())
            assert store.content_hash(record["id"]) == content_hash(record["text"])
            ranks.add(got.rank)
            alone = generator.generate_adapter(record["text"])  # batched or alone: the same up to rounding
            for name in alone:
                torch.testing.assert_close(
                    got.delta_weight(name), alone.delta_weight(name), atol=1e-6, rtol=1e-5
                )
    if which == "compas":
        assert len(ranks) > 1 and store["doc-3"].metadata["chunking"]["num_chunks"] > 1
    files = {p.suffix for p in (tmp_path / "store").rglob("*") if p.is_file()}
    assert files == {".json", ".safetensors"}  # nothing to unpickle


def test_sum_is_compose_exactly_and_reads_only_its_records(generators, tmp_path: Path, monkeypatch) -> None:
    generator = generators["compas"]
    adapt_corpus(generator, CORPUS, tmp_path / "s", batch_size=2, max_shard_bytes=1, progress=False)
    store = AdapterStore(tmp_path / "s")
    ids = ["doc-4", "doc-1", "doc-4", "doc-6"]  # a repeat counts twice, as in compose
    total = store.sum(ids)
    expected = compose([store[i] for i in ids])
    assert_same_adapter(total, expected)
    weighted = store.sum(ids, weights=[1.0, -0.5, 2.0, 0.25])
    assert_same_adapter(weighted, compose([store[i] for i in ids], [1.0, -0.5, 2.0, 0.25]))
    made = generator.generate_adapter([TEXTS[4], TEXTS[1], TEXTS[6]])
    for name in total:  # and it is the sum of the generated updates
        want = 2 * made[0].delta_weight(name) + made[1].delta_weight(name) + made[2].delta_weight(name)
        torch.testing.assert_close(total.delta_weight(name), want, atol=1e-6, rtol=1e-5)
    # only the shards of the asked-for records are opened, each once; the others may even be broken
    import ctx2param.store as store_module

    shard_of = {i: store.record_info(i)["shard"] for i in store.ids()}
    assert len(set(shard_of.values())) == 7  # max_shard_bytes=1: one shard per record
    (tmp_path / "s" / "shards" / shard_of["doc-0"]).write_bytes(b"broken")
    expected = compose(store.load(["doc-4", "doc-5", "doc-4"]))
    opened: list[str] = []
    real_open = store_module.safe_open

    def spy(path: str, **kwargs: Any) -> Any:
        opened.append(Path(path).name)
        return real_open(path, **kwargs)

    monkeypatch.setattr(store_module, "safe_open", spy)
    assert_same_adapter(store.sum(["doc-4", "doc-5", "doc-4"]), expected)
    assert sorted(opened) == sorted([shard_of["doc-4"], shard_of["doc-5"]])
    with pytest.raises(StoreFileError, match=shard_of["doc-0"]):
        store.sum(["doc-4", "doc-0"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_is_compose_exactly_for_any_scales_and_ranks(
    tmp_path: Path, dtype: torch.dtype, monkeypatch
) -> None:
    """Adapters written with the Python API: ranks differ by module and record, and scales by record (then
    compose folds them into B, and sum() does what compose does)."""
    from ctx2param.store_writer import consolidate_store, create_store

    shapes = {"layers.0.q_proj": (6, 4), "layers.0.mlp.down_proj": (4, 10), "layers.1.q_proj": (6, 4)}
    create_store(tmp_path, base_model="tiny/base", base_revision="r1", modules=shapes)
    adapters = {}
    with StoreWriter(tmp_path, max_shard_bytes=400) as writer:
        for i in range(6):
            a = ContextAdapter.random(
                shapes, rank=1 + i % 3, seed=i, std=1.0, base_model="tiny/base", dtype=dtype
            )
            r = 4 - i % 2  # this module's rank differs from the others'
            other = LoraFactors(torch.randn(r, 4).to(dtype), torch.randn(6, r).to(dtype))
            a = ContextAdapter({**dict(a.items()), "layers.1.q_proj": other}, "tiny/base")
            if i == 4:
                a = 0.5 * a  # another scale
            adapters[f"r{i}"] = ContextAdapter(dict(a.items()), "tiny/base", "r1", {"i": i})
            writer.add(f"r{i}", adapters[f"r{i}"], content_hash(str(i)))
    consolidate_store(tmp_path)
    store = AdapterStore(tmp_path)
    assert len({store.record_info(i)["shard"] for i in store.ids()}) > 1
    for record_id, adapter in adapters.items():
        assert_same_adapter(store[record_id], adapter)
    direct: list[bool] = []
    real_direct = AdapterStore._sum_direct

    def spy(self: AdapterStore, keys: list[str]) -> Any:
        result = real_direct(self, keys)
        direct.append(result is not None)
        return result

    monkeypatch.setattr(AdapterStore, "_sum_direct", spy)
    for ids in (["r0", "r1", "r2", "r0"], ["r3", "r5"], ["r1", "r4", "r2"], ["r4"]):
        total = store.sum(ids)
        assert_same_adapter(total, compose([adapters[i] for i in ids]))
        assert total.dtype == dtype
    assert direct == [True, True, False, True]  # built in place unless compose folds differing scales


# ---------------------------------------------------------------------------------------------- errors
def test_clear_errors_for_folders_ids_and_files(generators, tmp_path: Path) -> None:
    with pytest.raises(StoreFileError, match="does not exist"):
        AdapterStore(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreFileError, match="is a file"):
        AdapterStore(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreFileError, match="not an adapter store.*ctx2param adapt --corpus"):
        AdapterStore(tmp_path / "empty")
    generators["llama"].generate_adapter(TEXTS[0]).detach().save_pretrained(tmp_path / "single")
    with pytest.raises(StoreFileError, match=r"single adapter: load it with ContextAdapter\.from_pretrained"):
        AdapterStore(tmp_path / "single")

    out = tmp_path / "store"
    adapt_corpus(generators["llama"], CORPUS[:3], out, progress=False)
    store = AdapterStore(out)
    with pytest.raises(KeyError) as info:
        store["doc-99"]
    assert isinstance(info.value, UnknownRecordError)
    assert str(info.value).startswith("1 id(s) not in the adapter store") and "'doc-99'" in str(info.value)
    assert "e.g. 'doc-0', 'doc-1', 'doc-2'" in str(info.value)
    assert store.get("doc-99") is None
    with pytest.raises(UnknownRecordError, match=r"2 id\(s\) not in .*'nope', '3.5'"):
        store.sum(["doc-0", "nope", 3.5])
    with pytest.raises(ValueError, match="at least one record id"):
        store.sum([])
    with pytest.raises(TypeError, match="list of record ids"):
        store.sum("doc-0")
    with pytest.raises(ValueError, match="2 ids but 1 weights"):
        store.sum(["doc-0", "doc-1"], weights=[1.0])

    header = json.loads((out / "ctx2param_store.json").read_text())
    (out / "ctx2param_store.json").write_text(json.dumps({**header, "schema_version": 99}))
    with pytest.raises(StoreFileError, match="schema version 99.*Upgrade ctx2param"):
        AdapterStore(out)
    (out / "ctx2param_store.json").write_text(json.dumps(header))
    (out / INDEX_NAME).write_text('{"records": [')
    with pytest.raises(StoreFileError, match=f"{INDEX_NAME}.*corrupted or truncated"):
        AdapterStore(out)


def test_a_corrupted_truncated_or_missing_shard_is_named(generators, tmp_path: Path) -> None:
    generator = generators["gpt2"]
    out = tmp_path / "store"
    adapt_corpus(
        generator, CORPUS, out, batch_size=2, max_shard_bytes=2 * one_adapter_bytes(generator), progress=False
    )
    reference = {i: AdapterStore(out)[i] for i in AdapterStore(out).ids()}
    store = AdapterStore(out)
    assert store.verify() == 4  # 7 records, two per shard
    shard = store.record_info("doc-3")["shard"]
    path = out / "shards" / shard
    assert store.record_info("doc-2")["shard"] == shard
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte: a row of doc-3, the shard's last record, in the last module
    path.write_bytes(bytes(data))
    with pytest.raises(
        StoreFileError, match=rf"Shard .*{shard}.*SHA-256.*corrupted \(reading record 'doc-3'\)"
    ):
        store["doc-3"]
    assert_same_adapter(store["doc-2"], reference["doc-2"])  # its own rows are intact and checked
    with pytest.raises(StoreFileError, match=f"{shard}.*corrupted; it holds 2 record"):
        store.verify()
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(StoreFileError, match=f"{shard}.*(corrupted or truncated|truncated)"):
        store["doc-2"]
    with pytest.raises(StoreFileError, match=f"{shard}.*truncated"):
        store.verify()
    path.unlink()
    with pytest.raises(StoreFileError, match=f"{shard} .*is missing.*Delete the shard and run the same"):
        store.sum(["doc-0", "doc-2"])
    # as the message says: run the same adapt again, and the shard's records are made again
    result = adapt_corpus(generator, CORPUS, out, batch_size=2, progress=False)
    assert (result.made, result.skipped) == (2, 5)
    store = AdapterStore(out)
    assert store.verify() == 4
    for record_id, adapter in reference.items():
        assert_same_adapter(store[record_id], adapter)


def test_a_store_made_for_another_base_or_generator(generators, bases, tmp_path: Path) -> None:
    llama, gpt2 = generators["llama"], generators["gpt2"]
    out = tmp_path / "store"
    adapt_corpus(llama, CORPUS[:2], out, progress=False)
    store = AdapterStore(out)
    assert store.base_model == str(bases["llama"]) == store["doc-0"].base_model
    assert store.generator["method"] == "test_meanpool" and len(store.generator["fingerprint"]) == 64
    store.check_model(llama)
    store.check_model(llama.base_lm)
    with pytest.raises(StoreMismatchError, match=f"made for base model '{bases['llama']}'.*{bases['gpt2']}"):
        store.check_model(gpt2)
    with pytest.raises(StoreMismatchError, match="does not have: missing"):
        store.check_model(gpt2.base_lm)
    with (
        pytest.raises(AdapterMismatchError, match="another base model"),
        apply_adapter(gpt2.base_lm, store["doc-0"]),
    ):
        pass  # applying one to the wrong model says so too
    with pytest.raises(StoreMismatchError, match="base model"):
        adapt_corpus(gpt2, CORPUS, out, progress=False)
    other = _methods.make_generator(str(bases["llama"]), init_std=0.1)  # same base, other weights
    with pytest.raises(StoreMismatchError, match="fingerprint.*other weights or settings"):
        adapt_corpus(other, CORPUS, out, progress=False)
    assert AdapterStore(out).ids() == ["doc-0", "doc-1"]  # nothing was added by the refused runs
    writer = StoreWriter(out)
    with pytest.raises(StoreMismatchError, match="the adapter is for base model .*tiny-gpt2.*tiny-llama"):
        writer.add(
            "x", ContextAdapter.random(gpt2.base_lm, rank=2, target_modules=["c_attn"]), content_hash("x")
        )
    with pytest.raises(StoreMismatchError, match="modules or shapes differ"):
        writer.add("x", ContextAdapter.random({"h.0.c_attn": (192, 64)}, rank=2), content_hash("x"))
    with pytest.raises(ValueError, match="already added"):
        writer.add("y", llama.generate_adapter("y text").detach(), content_hash("y text"))
        writer.add("y", llama.generate_adapter("y text").detach(), content_hash("y text"))
    writer.close()


# ------------------------------------------------------------------------------------------------ resume
def test_resume_skips_stored_records_and_changed_texts_are_refused_or_remade(
    generators, tmp_path: Path
) -> None:
    generator = generators["llama"]
    records = corpus_records(CORPUS)
    scattered = adapt_corpus(generator, [records[5], records[2]], tmp_path / "scattered", progress=False)
    assert scattered.made == 2 and AdapterStore(tmp_path / "scattered").ids() == ["doc-2", "doc-5"]  # by line
    adapt_corpus(generator, records, tmp_path / "scattered", progress=False)
    assert AdapterStore(tmp_path / "scattered").ids() == [r["id"] for r in CORPUS]
    out = tmp_path / "store"
    first = adapt_corpus(generator, CORPUS[:4], out, batch_size=3, progress=False)
    assert (first.made, first.skipped) == (4, 0)
    before = AdapterStore(out)
    kept = {i: before.record_info(i) for i in before.ids()}
    second = adapt_corpus(generator, CORPUS, out, batch_size=3, progress=False)
    assert (second.made, second.skipped, second.store_records) == (3, 4, 7)
    store = AdapterStore(out)
    assert store.ids() == [r["id"] for r in CORPUS]
    assert all(store.record_info(i) == info for i, info in kept.items())  # untouched, not made again

    changed = [dict(r) for r in CORPUS]
    changed[5]["text"] = "The answer is (B), not (C)."
    index_before = (out / INDEX_NAME).read_text()
    with pytest.raises(
        CorpusChangedError, match=r"1 record\(s\) .*another text: 'doc-5' \(line 6\).*--update"
    ):
        adapt_corpus(generator, changed, out, batch_size=3, progress=False)
    assert (out / INDEX_NAME).read_text() == index_before
    third = adapt_corpus(generator, changed, out, batch_size=3, update=True, progress=False)
    assert (third.made, third.remade, third.skipped, third.store_records) == (1, 1, 6, 7)
    store = AdapterStore(out)
    assert store.ids() == [r["id"] for r in CORPUS]  # the remade record keeps its place
    assert store.content_hash("doc-5") == content_hash(changed[5]["text"])
    assert_same_adapter(store["doc-5"], generator.generate_adapter([changed[5]["text"]])[0].detach())
    assert store.record_info("doc-3")["shard"] == kept["doc-3"]["shard"]
    assert not list((out / "parts").iterdir())


def test_corpus_lines_are_checked_with_their_line_numbers(tmp_path: Path) -> None:
    def corpus(*lines: str) -> Path:
        path = tmp_path / "corpus.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    ok = json.dumps({"id": "a", "text": "alpha"})
    cases = {
        "missing 'id'": [ok, json.dumps({"text": "no id"})],
        "missing 'text'": [ok, "", json.dumps({"id": "b"})],
        "line 3: the id 'a' is already used on line 1": [ok, "", json.dumps({"id": "a", "text": "again"})],
        "the text of 'b' is empty": [ok, json.dumps({"id": "b", "text": "  \n "})],
        "line 2: not valid JSON": [ok, '{"id": "b", "text": '],
        "expected an object": [ok, "[1, 2]"],
        "the id must be a string or an integer": [ok, json.dumps({"id": True, "text": "x"})],
        "the id is empty": [json.dumps({"id": " ", "text": "x"})],
    }
    for message, lines in cases.items():
        with pytest.raises(CorpusError, match=message.replace("(", r"\(")):
            read_corpus(corpus(*lines))
    path = corpus(ok, "", json.dumps({"id": 7, "text": "seven", "title": "ignored"}))
    records = read_corpus(path)
    assert [(r.id, r.line, r.text) for r in records] == [("a", 1, "alpha"), ("7", 3, "seven")]
    (tmp_path / "latin1.jsonl").write_bytes(ok.encode() + b'\n{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match="line 2: not UTF-8"):
        read_corpus(tmp_path / "latin1.jsonl")
    with pytest.raises(CorpusError, match="holds no records"):
        read_corpus(corpus("", "  "))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_corpus(tmp_path / "missing.jsonl")
    with pytest.raises(CorpusError, match="corpus record 2: missing 'text'"):
        corpus_records([{"id": "a", "text": "x"}, {"id": "b"}])


# ------------------------------------------------------------------------------------- killed and locked
def _stop(ready: Any) -> None:
    ready.set()
    time.sleep(600)  # the parent kills this process here


def _run_until_killed(generator: Any, out: Path, kill_point: str, shard_bytes: int, ready: Any) -> None:
    """In a forked child: adapt the corpus, stopping at the third batch at ``kill_point``."""
    calls = [0]

    def third_call() -> bool:
        calls[0] += 1
        return calls[0] == 3

    if kill_point == "generating":
        real_generate = generator.generate_adapter

        def generate(texts: Any) -> Any:
            if third_call():
                _stop(ready)
            return real_generate(texts)

        generator.generate_adapter = generate
    elif kill_point == "shard_half_written":
        real_save = store_writer_module.save_file

        def save(tensors: Any, path: str, metadata: Any = None) -> None:
            real_save(tensors, path, metadata=metadata)
            if third_call():
                _stop(ready)  # the temporary shard is written, not yet renamed

        store_writer_module.save_file = save
    else:
        real_write = store_writer_module.write_text_atomically

        def write(path: Any, text: str) -> Any:
            if Path(path).parent.name == "parts" and third_call():
                _stop(ready)  # the shard is in place, its index part not yet written
            return real_write(path, text)

        store_writer_module.write_text_atomically = write
    adapt_corpus(generator, CORPUS, out, batch_size=2, max_shard_bytes=shard_bytes, progress=False)


@pytest.mark.parametrize("kill_point", ["generating", "shard_half_written", "shard_without_index"])
def test_a_killed_run_restarts_and_stores_each_record_once(
    generators, tmp_path: Path, kill_point: str
) -> None:
    generator = generators["llama"]
    shard_bytes = 2 * one_adapter_bytes(generator)  # one shard per batch of two
    adapt_corpus(
        generator, CORPUS, tmp_path / "reference", batch_size=2, max_shard_bytes=shard_bytes, progress=False
    )
    out = tmp_path / "store"
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=_run_until_killed, args=(generator, out, kill_point, shard_bytes, ready))
    child.start()
    try:
        assert ready.wait(60), "the child never reached the kill point"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.join(30)
    assert child.exitcode == -signal.SIGKILL
    shards = [p.name for p in (out / "shards").iterdir()]
    complete, temporary = {"generating": (2, 0), "shard_half_written": (2, 1), "shard_without_index": (3, 0)}[
        kill_point
    ]
    assert (
        len([s for s in shards if not s.startswith(".")]),
        len([s for s in shards if s.startswith(".")]),
    ) == (
        complete,
        temporary,
    )
    assert (out / LOCK_NAME).is_file()  # left by the killed run
    killed = AdapterStore(out)  # what was finished reads already
    assert killed.ids() == ["doc-0", "doc-1", "doc-2", "doc-3"]
    finished = {i: killed.record_info(i)["shard"] for i in killed.ids()}

    result = adapt_corpus(generator, CORPUS, out, batch_size=2, max_shard_bytes=shard_bytes, progress=False)
    assert (result.made, result.skipped, result.store_records) == (3, 4, 7)
    store = AdapterStore(out)
    assert_same_store(store, AdapterStore(tmp_path / "reference"))
    index = json.loads((out / INDEX_NAME).read_text())
    assert [e["id"] for e in index["records"]] == [r["id"] for r in CORPUS]  # each record exactly once
    assert all(store.record_info(i)["shard"] == shard for i, shard in finished.items())  # not made again
    assert {p.name for p in (out / "shards").iterdir()} == set(
        index["shards"]
    )  # no orphan, no temporary file
    assert not list((out / "parts").iterdir()) and not (out / LOCK_NAME).exists()
    assert store.verify() == 4


def test_one_writer_run_at_a_time(generators, tmp_path: Path) -> None:
    out = tmp_path / "store"
    adapt_corpus(generators["llama"], CORPUS[:2], out, progress=False)
    with writer_lock(out), pytest.raises(StoreLockedError, match=rf"process {os.getpid()} .*Wait for it"):
        adapt_corpus(generators["llama"], CORPUS, out, progress=False)
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "another-machine"}))
    with pytest.raises(StoreLockedError, match=f"another-machine.*if no writer runs, delete .*{LOCK_NAME}"):
        adapt_corpus(generators["llama"], CORPUS, out, progress=False)
    (out / LOCK_NAME).unlink()
    assert adapt_corpus(generators["llama"], CORPUS, out, progress=False).made == 5


# -------------------------------------------------------------------------------------- the command line
def run_cli(capsys, *argv: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_corpus(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_adapt_corpus_command(capsys, generators, gen_dir: Path, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl", CORPUS)
    out = tmp_path / "store"
    code, stdout, err = run_cli(
        capsys, "adapt", "-m", gen_dir, "--corpus", corpus, "-o", out, "--batch-size", 3
    )
    assert code == 0, err
    assert "stored 7 new adapter(s)" in stdout and "the store holds 7 record(s)" in stdout
    assert "adapters: 100%" in err  # the progress bar
    adapt_corpus(generators["llama"], CORPUS, tmp_path / "in-process", batch_size=3, progress=False)
    assert_same_store(AdapterStore(out), AdapterStore(tmp_path / "in-process"))  # the loaded generator's
    assert AdapterStore(out).generator["name"] == str(gen_dir)
    code, stdout, _ = run_cli(capsys, "adapt", "-m", gen_dir, "--corpus", corpus, "-o", out, "--no-progress")
    assert code == 0 and "stored 0 new adapter(s)" in stdout and "7 record(s) were already there" in stdout

    def assert_error(*argv: Any, fragments: tuple[str, ...]) -> None:
        code, _, err = run_cli(capsys, "adapt", "-m", gen_dir, *argv)
        assert code == 1 and err.startswith("error: ") and "Traceback" not in err, err
        for fragment in fragments:
            assert fragment in err, err

    changed = write_corpus(tmp_path / "changed.jsonl", [*CORPUS[:6], {"id": "doc-6", "text": "New numbers."}])
    assert_error("--corpus", changed, "-o", out, fragments=("'doc-6' (line 7)", "--update"))
    code, stdout, err = run_cli(capsys, "adapt", "-m", gen_dir, "--corpus", changed, "-o", out, "--update")
    assert code == 0 and "stored 1 new adapter(s) (1 of them for changed texts)" in stdout, err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "text": "x"}) + "\n" + json.dumps({"id": "b"}) + "\n")
    assert_error("--corpus", bad, "-o", tmp_path / "new", fragments=("bad.jsonl, line 2: missing 'text'",))
    assert not (tmp_path / "new").exists()  # refused before anything was made
    assert_error("--corpus", corpus, "-o", out, "-w", "1", fragments=("--weights applies to --context",))
    assert_error(
        "--corpus", corpus, "-o", out, "--format", "peft", fragments=("--format applies to --context",)
    )
    assert_error("-c", corpus, "-o", tmp_path / "a", "--update", fragments=("--update applies to --corpus",))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert_error(
        "--corpus", corpus, "-o", tmp_path / "foreign", fragments=("not empty and is not an adapter store",)
    )
    with pytest.raises(SystemExit) as exit_info:  # --context and --corpus exclude each other
        main(["adapt", "-m", str(gen_dir), "-c", str(corpus), "--corpus", str(corpus), "-o", str(out)])
    assert exit_info.value.code == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_under_accelerate_launch_make_the_store_of_one(
    generators, gen_dir: Path, tmp_path: Path
) -> None:
    corpus = write_corpus(
        tmp_path / "corpus.jsonl", [{"id": i, "text": f"{t} ({i})"} for i, t in enumerate(TEXTS * 3)]
    )
    (tmp_path / "register_meanpool.py").write_text("import _methods\n\n_methods.register()\n")
    tests_dir = Path(__file__).resolve().parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tests_dir.parent / "src"), str(tests_dir), str(tmp_path)]),
        "OMP_NUM_THREADS": "1",
    }
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "ctx2param", "--import", "register_meanpool", "adapt", "--model", str(gen_dir),
        "--corpus", str(corpus), "--out", str(tmp_path / "two"), "--batch-size", "2", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stored 21 new adapter(s) in" in proc.stdout and "in 2 processes" in proc.stdout, proc.stdout
    two = AdapterStore(tmp_path / "two")
    assert {two.record_info(i)["shard"].split("-p")[1][:3] for i in two.ids()} == {"000", "001"}
    adapt_corpus(generators["llama"], read_corpus(corpus), tmp_path / "one", batch_size=2, progress=False)
    assert_same_store(two, AdapterStore(tmp_path / "one"))
    assert not list((tmp_path / "two" / "parts").iterdir())  # merged into one index


def test_processes_plan_from_the_same_store_before_any_writes(
    gen_dir: Path, generators, tmp_path: Path, monkeypatch
) -> None:
    """Two writers as threads with a shared barrier (what ``PartialState.wait_for_everyone`` is): even when
    the main one is slow to read the store, no record is skipped or made twice."""
    import threading

    import ctx2param.corpus as corpus_module
    from ctx2param import AutoModelForContextAdaptation

    barrier = threading.Barrier(2, timeout=60)

    class ThreadState:
        num_processes = 2

        def __init__(self, index: int) -> None:
            self.process_index, self.is_main_process = index, index == 0

        def wait_for_everyone(self) -> None:
            barrier.wait()

    real_read_view = corpus_module.read_view

    def read_view(out: Any) -> Any:
        if threading.current_thread().name == "process-0":
            time.sleep(0.3)  # the main process is descheduled just before it reads the store
        return real_read_view(out)

    monkeypatch.setattr(corpus_module, "read_view", read_view)
    results: dict[int, Any] = {}
    # one generator per thread (tokenizers), loaded here, one after the other: transformers' from_pretrained
    # swaps PreTrainedModel.tie_weights out and back (no_tie_weights), so two concurrent loads can leave it
    # swapped out for good, and every model loaded later in the session untied (its lm_head on meta)
    loaded = [AutoModelForContextAdaptation.from_pretrained(gen_dir) for _ in range(2)]

    def run(index: int) -> None:
        generator = loaded[index]
        try:
            results[index] = adapt_corpus(
                generator, CORPUS, tmp_path / "two", batch_size=2, progress=False, state=ThreadState(index)
            )
        except BaseException as err:  # noqa: BLE001 - reported below
            results[index] = err
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,), name=f"process-{i}") for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(not isinstance(r, BaseException) for r in results.values()), results
    assert [results[i].made for i in range(2)] == [7, 7] and sum(results[i].made_here for i in range(2)) == 7
    adapt_corpus(generators["llama"], CORPUS, tmp_path / "one", batch_size=2, progress=False)
    assert_same_store(AdapterStore(tmp_path / "two"), AdapterStore(tmp_path / "one"))


# ------------------------------------------------------------------------------------------------ SmolLM2
@pytest.mark.slow
def test_smollm2_store_with_a_compas_generator_of_the_production_shape(smollm2, tmp_path: Path) -> None:
    base, tokenizer = smollm2
    torch.manual_seed(0)
    model = CompAsModel.from_base(base, CompAsConfig(), tokenizer=tokenizer)  # untrained: shapes only
    with torch.no_grad():  # off zero, as after training (a fresh generator's ΔW is zero for every passage)
        model.generator.output_scale.normal_(0.0, 0.05)
    passages = [
        "Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity.",
        "Paris is the capital and largest city of France.",
        "The Amazon rainforest covers much of the Amazon basin of South America.",
    ]
    result = adapt_corpus(model, [{"id": f"p{i}", "text": t} for i, t in enumerate(passages)], tmp_path / "s",
                          batch_size=2, progress=False)  # fmt: skip
    assert result.made == 3
    store = AdapterStore(tmp_path / "s")
    store.check_model(model)
    store.check_model(base)
    assert len(store.modules) == 30 and store["p0"].rank == 8  # rank 8 on down_proj of the 30 layers
    for start in (0, 2):
        made = model.generate_adapter(passages[start : start + 2])
        for offset, want in enumerate(made):
            assert_same_adapter(store[f"p{start + offset}"], want)
    total = store.sum(["p0", "p2"])
    assert_same_adapter(total, compose([store["p0"], store["p2"]]))
    prompt = torch.tensor([model.prompt_ids("Who was Marie Curie?")])
    with torch.no_grad():
        plain = model.base_lm(prompt).logits
        with model.adapted(total):
            adapted = model.base_lm(prompt).logits
    assert not torch.equal(plain, adapted) and torch.isfinite(adapted).all()
