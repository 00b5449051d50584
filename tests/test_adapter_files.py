"""Saving and loading adapters: the own format (bit-identical), PEFT folders (identical ΔW), atomic writes,
and every way a folder can be broken (each must raise :class:`AdapterFileError` with a clear message).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ctx2param.file_utils
from ctx2param import ContextAdapter, stack
from ctx2param.adapter import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_SCHEMA_VERSION,
    ADAPTER_WEIGHTS_NAME,
    PEFT_CONFIG_NAME,
    PEFT_PICKLE_NAME,
    PEFT_WEIGHTS_NAME,
    LoraFactors,
)
from ctx2param.errors import AdapterFileError

SHAPES = {
    "model.layers.0.self_attn.q_proj": (8, 6),
    "model.layers.0.self_attn.k_proj": (4, 6),
    "model.layers.1.mlp.down_proj": (6, 10),
}


def mixed_adapter(dtype: torch.dtype = torch.float32) -> ContextAdapter:
    """Per-module ranks (1, 3, 2) and scales (0.5, -2, 1.25), with base model, revision and metadata."""
    gen = torch.Generator().manual_seed(0)
    ranks, scales = (1, 3, 2), (0.5, -2.0, 1.25)
    factors = {
        name: LoraFactors(
            torch.randn(r, d_in, generator=gen).to(dtype), torch.randn(d_out, r, generator=gen).to(dtype), s
        )
        for (name, (d_out, d_in)), r, s in zip(SHAPES.items(), ranks, scales, strict=True)
    }
    metadata = {"chunks": ["first", "second"], "k": 2, "nested": {"seed": 0, "ok": True}}
    return ContextAdapter(factors, base_model="org/base-model", base_revision="0123abcd", metadata=metadata)


def assert_bit_identical(got: ContextAdapter, want: ContextAdapter) -> None:
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name].A, want[name].A) and got[name].A.dtype == want[name].A.dtype
        assert torch.equal(got[name].B, want[name].B) and got[name].B.dtype == want[name].B.dtype
        assert got[name].scale == want[name].scale
    assert got.base_model == want.base_model
    assert got.base_revision == want.base_revision
    assert got.metadata == want.metadata
    assert got.batch_size == want.batch_size


def assert_same_delta(got: ContextAdapter, want: ContextAdapter, **tol) -> None:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got.delta_weight(name), want.delta_weight(name), **tol)


def leftovers(parent: Path, keep: str) -> list[str]:
    """Entries of ``parent`` other than ``keep`` (temporary folders a save forgot)."""
    return sorted(p.name for p in parent.iterdir() if p.name != keep)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_own_format_round_trip_is_bit_identical(tmp_path, dtype):
    adapter = mixed_adapter(dtype)
    out = adapter.save_pretrained(tmp_path / "adapter")
    assert out == tmp_path / "adapter"
    assert sorted(os.listdir(out)) == sorted([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME])
    header = json.loads((out / ADAPTER_CONFIG_NAME).read_text())
    assert header["schema_version"] == ADAPTER_SCHEMA_VERSION
    assert header["base_model"] == "org/base-model" and header["base_revision"] == "0123abcd"
    assert header["modules"]["model.layers.0.self_attn.k_proj"] == {"shape": [4, 6], "rank": 3, "scale": -2.0}
    assert len(header["sha256"][ADAPTER_WEIGHTS_NAME]) == 64
    loaded = ContextAdapter.from_pretrained(out)
    assert_bit_identical(loaded, adapter)
    assert loaded.dtype == dtype


def test_own_format_round_trip_of_a_batched_adapter(tmp_path):
    singles = [
        ContextAdapter.random(SHAPES, rank=r, scale=s, seed=r) for r, s in ((1, 0.5), (3, 2.0), (2, 1.0))
    ]
    batched = stack(singles)
    batched.save_pretrained(tmp_path / "b")
    loaded = ContextAdapter.from_pretrained(tmp_path / "b")
    assert loaded.batch_size == 3
    assert_bit_identical(loaded, batched)
    for got, want in zip(loaded.unbind(), singles, strict=True):
        assert_same_delta(got, want, rtol=1e-6, atol=1e-6)


def test_own_format_scales_that_are_not_short_decimals_survive_json(tmp_path):
    a = ContextAdapter.random(SHAPES, seed=0, scale=1 / 3) * (2**0.5)
    a.save_pretrained(tmp_path / "a")
    loaded = ContextAdapter.from_pretrained(tmp_path / "a")
    assert all(loaded[n].scale == a[n].scale for n in a)


def test_from_pretrained_converts_dtype(tmp_path):
    adapter = mixed_adapter()
    adapter.save_pretrained(tmp_path / "a")
    loaded = ContextAdapter.from_pretrained(tmp_path / "a", dtype=torch.float64)
    assert loaded.dtype == torch.float64
    assert_same_delta(loaded, adapter.to(dtype=torch.float64), rtol=0, atol=0)


def test_peft_round_trip_gives_the_same_delta(tmp_path):
    adapter = mixed_adapter()
    out = adapter.save_pretrained(tmp_path / "peft", format="peft")
    assert sorted(os.listdir(out)) == sorted([PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME])
    config = json.loads((out / PEFT_CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "org/base-model"
    assert config["revision"] == "0123abcd"
    assert sorted(config["target_modules"]) == sorted(SHAPES)
    # PEFT wants one rank per folder: smaller ranks are zero-padded, scales folded into B.
    tensors = load_file(str(out / PEFT_WEIGHTS_NAME))
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (3, 6)
    loaded = ContextAdapter.from_pretrained(out)
    assert loaded.base_model == "org/base-model" and loaded.base_revision == "0123abcd"
    assert_same_delta(loaded, adapter, rtol=1e-6, atol=1e-6)


def test_peft_save_of_a_batched_adapter_is_refused(tmp_path):
    batched = stack([ContextAdapter.random(SHAPES, seed=0), ContextAdapter.random(SHAPES, seed=1)])
    with pytest.raises(ValueError, match="batched adapter cannot be saved as one PEFT LoRA"):
        batched.save_pretrained(tmp_path / "x", format="peft")
    assert not (tmp_path / "x").exists()
    assert leftovers(tmp_path, "none") == []


def test_unknown_save_format(tmp_path):
    with pytest.raises(ValueError, match="Unknown adapter format 'gguf'"):
        mixed_adapter().save_pretrained(tmp_path / "x", format="gguf")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("fmt", ["ctx2param", "peft"])
def test_saving_into_an_existing_folder_replaces_the_files(tmp_path, fmt):
    first = ContextAdapter.random(SHAPES, rank=2, seed=0)
    second = ContextAdapter.random(SHAPES, rank=3, seed=1, scale=0.5)
    first.save_pretrained(tmp_path / "a", format=fmt)
    (tmp_path / "a" / "README.md").write_text("kept\n")  # files the save does not write stay
    second.save_pretrained(tmp_path / "a", format=fmt)
    loaded = ContextAdapter.from_pretrained(tmp_path / "a")
    assert loaded.rank == 3
    assert_same_delta(loaded, second, rtol=1e-6, atol=1e-7)
    assert (tmp_path / "a" / "README.md").read_text() == "kept\n"
    assert leftovers(tmp_path, "a") == []  # no temporary folders left behind


@pytest.mark.parametrize("first, second", [("ctx2param", "peft"), ("peft", "ctx2param")])
def test_saving_one_format_over_the_other_loads_the_new_adapter(tmp_path, first, second):
    """The other format's files go, so the folder never serves the older adapter."""
    old = ContextAdapter.random(SHAPES, rank=2, seed=0)
    new = ContextAdapter.random(SHAPES, rank=3, seed=1)
    old.save_pretrained(tmp_path / "a", format=first)
    new.save_pretrained(tmp_path / "a", format=second)
    own, peft = {ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME}, {PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME}
    assert set(os.listdir(tmp_path / "a")) == (peft if second == "peft" else own)
    assert_same_delta(ContextAdapter.from_pretrained(tmp_path / "a"), new, rtol=1e-6, atol=1e-7)
    assert leftovers(tmp_path, "a") == []


@pytest.mark.parametrize(
    "first, second",
    [("ctx2param", "ctx2param"), ("peft", "peft"), ("ctx2param", "peft"), ("peft", "ctx2param")],
)
def test_a_failure_during_save_leaves_the_previous_contents_intact(tmp_path, monkeypatch, first, second):
    ContextAdapter.random(SHAPES, seed=0).save_pretrained(tmp_path / "a", format=first)
    before = snapshot(tmp_path / "a")

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ctx2param.file_utils, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        ContextAdapter.random(SHAPES, rank=4, seed=1).save_pretrained(tmp_path / "a", format=second)
    assert snapshot(tmp_path / "a") == before  # nothing replaced, nothing of the other format removed
    assert leftovers(tmp_path, "a") == []
    with pytest.raises(OSError, match="disk full"):  # a new folder is not created half-way either
        ContextAdapter.random(SHAPES, seed=1).save_pretrained(tmp_path / "new", format=second)
    assert not (tmp_path / "new").exists()
    assert leftovers(tmp_path, "a") == []
    monkeypatch.undo()
    assert_same_delta(
        ContextAdapter.from_pretrained(tmp_path / "a"),
        ContextAdapter.random(SHAPES, seed=0),
        rtol=0,
        atol=1e-7,
    )


def test_metadata_that_is_not_json_fails_before_touching_the_folder(tmp_path):
    good = ContextAdapter.random(SHAPES, seed=0)
    good.save_pretrained(tmp_path / "a")
    before = snapshot(tmp_path / "a")
    bad = ContextAdapter(dict(good.items()), metadata={"tensor": torch.ones(2)})
    with pytest.raises(TypeError, match="not JSON serializable"):
        bad.save_pretrained(tmp_path / "a")
    assert snapshot(tmp_path / "a") == before
    assert leftovers(tmp_path, "a") == []


def test_saving_onto_a_file_is_refused(tmp_path):
    (tmp_path / "a").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        ContextAdapter.random(SHAPES, seed=0).save_pretrained(tmp_path / "a")
    assert (tmp_path / "a").read_text() == "not a folder"
    assert leftovers(tmp_path, "a") == []


# -------------------------------------------------------------------------------------------- bad files
@pytest.fixture
def own_folder(tmp_path) -> Path:
    return mixed_adapter().save_pretrained(tmp_path / "own")


@pytest.fixture
def peft_folder(tmp_path) -> Path:
    return mixed_adapter().save_pretrained(tmp_path / "peft", format="peft")


def _load_error(folder: Path, match: str) -> None:
    with pytest.raises(AdapterFileError, match=match):
        ContextAdapter.from_pretrained(folder)


@pytest.mark.parametrize("fmt", ["own", "peft"])
def test_missing_weight_file(own_folder, peft_folder, fmt):
    folder, name = (own_folder, ADAPTER_WEIGHTS_NAME) if fmt == "own" else (peft_folder, PEFT_WEIGHTS_NAME)
    (folder / name).unlink()
    _load_error(folder, "Missing weight file .*incomplete")


@pytest.mark.parametrize("cut", [0.5, -4, 5, 0], ids=["half", "last-bytes", "five-bytes", "empty"])
def test_truncated_safetensors(own_folder, peft_folder, cut):
    for folder, name in ((own_folder, ADAPTER_WEIGHTS_NAME), (peft_folder, PEFT_WEIGHTS_NAME)):
        path = folder / name
        data = path.read_bytes()
        keep = int(len(data) * cut) if isinstance(cut, float) else cut
        path.write_bytes(data[:keep])
    # The own format notices through its checksum, PEFT through the safetensors reader.
    _load_error(own_folder, "does not match the SHA-256")
    _load_error(peft_folder, "corrupted or truncated")


def test_truncated_safetensors_without_a_checksum(own_folder):
    header = json.loads((own_folder / ADAPTER_CONFIG_NAME).read_text())
    del header["sha256"]
    (own_folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(header))
    path = own_folder / ADAPTER_WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-7])
    _load_error(own_folder, "Cannot read .*corrupted or truncated")


def test_corrupted_bytes_fail_the_checksum(own_folder):
    path = own_folder / ADAPTER_WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a tensor byte: the file still parses, but is not what was saved
    path.write_bytes(bytes(data))
    load_file(str(path))  # readable...
    _load_error(own_folder, "does not match the SHA-256 .*corrupted")  # ...but refused


def test_replaced_weights_fail_the_checksum(own_folder):
    other = ContextAdapter.random(SHAPES, seed=5)
    other.save_pretrained(own_folder.parent / "other")
    (own_folder / ADAPTER_WEIGHTS_NAME).write_bytes(
        (own_folder.parent / "other" / ADAPTER_WEIGHTS_NAME).read_bytes()
    )
    _load_error(own_folder, "SHA-256")


@pytest.mark.parametrize("fmt", ["own", "peft"])
@pytest.mark.parametrize("text", ['{"format": "ctx2param-adapter", ', "", "\xff\xfe not utf8", "[1, 2]"])
def test_invalid_json(own_folder, peft_folder, fmt, text):
    folder, name = (own_folder, ADAPTER_CONFIG_NAME) if fmt == "own" else (peft_folder, PEFT_CONFIG_NAME)
    (folder / name).write_bytes(text.encode("latin-1"))
    _load_error(folder, "not valid JSON|must hold a JSON object")


@pytest.mark.parametrize("version", [ADAPTER_SCHEMA_VERSION + 1, 99, "1", None])
def test_unknown_or_newer_schema_version(own_folder, version):
    header = json.loads((own_folder / ADAPTER_CONFIG_NAME).read_text())
    header["schema_version"] = version
    (own_folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(header))
    _load_error(own_folder, "schema version .*Upgrade ctx2param")


def test_header_of_another_format(own_folder):
    header = json.loads((own_folder / ADAPTER_CONFIG_NAME).read_text())
    header["format"] = "something-else"
    (own_folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(header))
    _load_error(own_folder, "not a ctx2param adapter header")


def test_header_and_weights_disagree(own_folder):
    path = own_folder / ADAPTER_CONFIG_NAME
    header = json.loads(path.read_text())
    header["modules"]["model.layers.0.self_attn.q_proj"]["shape"] = [8, 7]
    path.write_text(json.dumps(header))
    _load_error(own_folder, r"q_proj.*ΔW shape \(8, 6\) but the header says \[8, 7\]")
    header["modules"]["model.layers.0.self_attn.q_proj"]["shape"] = [8, 6]
    header["modules"]["model.layers.9.mlp.up_proj"] = {"shape": [2, 2], "rank": 1, "scale": 1.0}
    path.write_text(json.dumps(header))
    _load_error(own_folder, "lacks the factors of module 'model.layers.9.mlp.up_proj'")
    header["modules"] = {}
    path.write_text(json.dumps(header))
    _load_error(own_folder, "lists no modules")


def test_folder_with_no_adapter(tmp_path):
    (tmp_path / "empty").mkdir()
    _load_error(
        tmp_path / "empty", "holds no adapter: expected ctx2param_adapter.json .* or adapter_config.json"
    )
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    _load_error(tmp_path / "model", r"found \['config.json', 'model.safetensors'\]")


def test_path_that_is_neither_a_folder_nor_a_repo_id(tmp_path):
    _load_error(
        tmp_path / "does" / "not" / "exist", "neither an existing folder nor a valid Hub repository id"
    )


def test_peft_pickle_only_is_refused_without_unpickling(tmp_path, peft_folder):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling this would create the marker file

    (peft_folder / PEFT_WEIGHTS_NAME).unlink()
    (peft_folder / PEFT_PICKLE_NAME).write_bytes(pickle.dumps(Payload()))
    _load_error(peft_folder, "adapter_model.bin .*a pickle.*never loads")
    assert not marker.exists()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"use_dora": True}, "use_dora=True is not supported"),
        ({"lora_bias": True}, "lora_bias=True is not supported"),
        ({"peft_type": "IA3"}, "PEFT IA3 adapter; only LoRA"),
        ({"r": 5}, "rank 3 but the config says r=5"),
    ],
)
def test_unsupported_peft_configs_are_refused(peft_folder, change, match):
    path = peft_folder / PEFT_CONFIG_NAME
    config = json.loads(path.read_text())
    config.update(change)
    path.write_text(json.dumps(config))
    _load_error(peft_folder, match)


def _rewrite_peft_tensors(folder: Path, edit) -> None:
    path = folder / PEFT_WEIGHTS_NAME
    tensors = load_file(str(path))
    save_file(edit(dict(tensors)), str(path))


def test_peft_tensors_that_are_not_linear_lora_factors(peft_folder):
    def add_dora(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.weight"] = torch.ones(8)
        return t

    _rewrite_peft_tensors(peft_folder, add_dora)
    _load_error(peft_folder, "lora_magnitude_vector.*not a linear LoRA factor")


def test_peft_module_missing_one_factor(peft_folder):
    def drop_b(t):
        del t["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
        return t

    _rewrite_peft_tensors(peft_folder, drop_b)
    _load_error(peft_folder, "k_proj' lacks lora_A or lora_B")


def test_peft_weights_without_lora_keys(peft_folder):
    _rewrite_peft_tensors(peft_folder, lambda t: {"something.weight": torch.ones(2, 2)})
    _load_error(peft_folder, "holds no LoRA factors")


def test_peft_conv_lora_is_refused(peft_folder):
    def to_conv(t):
        return {k: v[..., None, None] for k, v in t.items()}

    _rewrite_peft_tensors(peft_folder, to_conv)
    _load_error(peft_folder, "non-matrix factors")


# --------------------------------------------------------------------------------- Hub ids (local server)
@pytest.mark.hub
@pytest.mark.parametrize("fmt", ["ctx2param", "peft"])
def test_from_pretrained_with_a_hub_repository_id(tmp_path, local_hub, fmt):
    adapter = mixed_adapter()
    folder = adapter.save_pretrained(tmp_path / "a", format=fmt)
    repo_id = f"ctx2param-tests/adapter-{fmt}"
    local_hub.add_files(repo_id, {p.name: p for p in folder.iterdir()})
    loaded = ContextAdapter.from_pretrained(repo_id)
    if fmt == "ctx2param":
        assert_bit_identical(loaded, adapter)
    else:
        assert_same_delta(loaded, adapter, rtol=1e-6, atol=1e-6)


@pytest.mark.hub
def test_from_pretrained_with_a_missing_hub_repository(local_hub):
    with pytest.raises(AdapterFileError, match="No adapter repository 'ctx2param-tests/no-such-adapter'"):
        ContextAdapter.from_pretrained("ctx2param-tests/no-such-adapter")


@pytest.mark.hub
def test_a_hub_adapter_that_is_not_cached_while_local_files_only(local_hub):
    """``local_files_only=True`` (what HF_HUB_OFFLINE=1 implies) and nothing cached: the error names the
    repository and why it cannot be fetched."""
    with pytest.raises(AdapterFileError, match="'ctx2param-tests/never-cached' is not in the local cache"):
        ContextAdapter.from_pretrained("ctx2param-tests/never-cached", local_files_only=True)


def test_write_text_atomically_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    """The one single-file writer (card data, JSONL, eval reports): a failed write leaves the previous file
    whole and no temporary file behind."""
    from ctx2param.file_utils import write_text_atomically

    target = tmp_path / "results.json"
    write_text_atomically(target, "old\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ctx2param.file_utils.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomically(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
