"""Loading refuses what it must: shard indexes that point outside the folder, adapters with NaN / Inf factors
(at construction, save and load, naming the module; one host sync per adapter, none for factors inside an
autograd graph), header fields of the wrong type (always ``AdapterFileError``), ``stack()`` of adapters for
different bases, and ``apply_adapter`` / ``attach_adapter`` of an adapter made for another base (ids compared
normalised: a folder and its absolute path are one base)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import _methods
from ctx2param import AutoModelForContextAdaptation, ContextAdapter, apply_adapter, compose, stack
from ctx2param.adapter import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    LoraFactors,
)
from ctx2param.errors import AdapterFileError, AdapterMismatchError
from ctx2param.hub import describe_checkpoint
from ctx2param.injection import attach_adapter
from ctx2param.modeling_utils import CheckpointError
from ctx2param.testing_utils import TARGET_MODULES, tiny_model

SHAPES = {
    "model.layers.0.self_attn.q_proj": (8, 6),
    "model.layers.0.self_attn.k_proj": (4, 6),
    "model.layers.1.mlp.down_proj": (6, 10),
}


# ------------------------------------------------------------------------------------- shard index paths
@pytest.fixture
def sharded_generator(tmp_path):
    base = tiny_model("llama")
    generator = _methods.make_generator(base)
    folder = generator.save_pretrained(tmp_path / "gen", max_shard_size=30_000)
    return base, generator, folder


@pytest.mark.parametrize("where", ["../outside.safetensors", "ABSOLUTE", "sub/x.safetensors", 7, ""])
def test_a_shard_index_cannot_name_files_outside_the_folder(sharded_generator, where):
    base, generator, folder = sharded_generator
    # a file outside the folder that would load: all the generator's tensors, other values
    outside = folder.parent / "outside.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in generator.method_state_dict().items()}, str(outside))
    target = str(outside) if where == "ABSOLUTE" else where
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"] = {k: target for k in index["weight_map"]}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"maps {first!r} to .*not a file name in the folder"):
        AutoModelForContextAdaptation.from_pretrained(folder, base_model=base)
    with pytest.raises(CheckpointError, match="not a file name in the folder"):
        describe_checkpoint(folder)  # what `ctx2param info` and `push` read


@pytest.mark.parametrize("text", ["[1, 2]", '{"weight_map": []}', '{"weight_map": {}}', "{", "[" * 100_000])
def test_a_broken_shard_index_is_a_checkpoint_error(sharded_generator, text):
    base, _, folder = sharded_generator
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match="shard index"):
        AutoModelForContextAdaptation.from_pretrained(folder, base_model=base)


# ---------------------------------------------------------------------------------------- non-finite
def factors(seed: int = 0, requires_grad: bool = False) -> dict[str, LoraFactors]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (d_out, d_in) in SHAPES.items():
        A, B = torch.randn(2, d_in, generator=gen), torch.randn(d_out, 2, generator=gen)
        out[name] = LoraFactors(A.requires_grad_(requires_grad), B.requires_grad_(requires_grad), 1.0)
    return out


def poisoned(value: float, which: str = "B", requires_grad: bool = False) -> dict[str, LoraFactors]:
    out = factors(requires_grad=requires_grad)
    name = "model.layers.0.self_attn.k_proj"
    f = out[name]
    with torch.no_grad():
        (f.A if which == "A" else f.B).view(-1)[3] = value
    return out


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["A", "B"])
def test_non_finite_factors_are_refused_at_construction(value, which):
    with pytest.raises(ValueError, match=rf"'model.layers.0.self_attn.k_proj': factor {which} holds 1 NaN"):
        ContextAdapter(poisoned(value, which))


def test_the_check_is_one_host_sync_and_skipped_inside_autograd(monkeypatch, tmp_path):
    reads = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(t.shape) or real_bool(t))
    ContextAdapter(factors())
    assert len(reads) == 1  # six factors, one read from the device
    reads.clear()
    adapter = ContextAdapter(poisoned(float("nan"), requires_grad=True))  # training: no sync, no check
    assert reads == []
    mixed = factors()  # one trainable factor is enough to be inside training
    name = next(iter(mixed))
    mixed[name] = LoraFactors(mixed[name].A.requires_grad_(), mixed[name].B, 1.0)
    ContextAdapter(mixed)
    assert reads == []
    reads.clear()
    a, b = ContextAdapter(factors(0)), ContextAdapter(factors(1))
    reads.clear()
    for derived in (lambda: a + b, lambda: 2 * a, lambda: compose([a, b]), lambda: stack([a, b]).unbind()):
        derived()
    assert reads == []  # the algebra of checked adapters checks nothing again
    monkeypatch.undo()
    with pytest.raises(ValueError, match="Not saving the adapter.*k_proj.*factor B holds 1 NaN"):
        adapter.save_pretrained(tmp_path / "never-written")  # saving checks every factor
    assert list(tmp_path.iterdir()) == []


def test_a_narrowing_dtype_conversion_that_overflows_is_refused():
    big = {name: LoraFactors(f.A * 1e6, f.B, f.scale) for name, f in factors().items()}
    adapter = ContextAdapter(big)
    with pytest.raises(ValueError, match="NaN or infinite"):
        adapter.to(dtype=torch.float16)


@pytest.mark.parametrize("fmt", ["ctx2param", "peft"])
def test_non_finite_factors_in_a_file_are_refused_at_load(tmp_path, fmt):
    folder = ContextAdapter(factors()).save_pretrained(tmp_path / "a", format=fmt)
    weights = folder / (ADAPTER_WEIGHTS_NAME if fmt == "ctx2param" else PEFT_WEIGHTS_NAME)
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    key = next(k for k in tensors if "down_proj" in k and "lora_A" in k)
    tensors[key].view(-1)[0] = float("inf")
    save_file(tensors, str(weights))
    if fmt == "ctx2param":  # keep the checksum right, so that only the values are wrong
        header = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
        header.pop("sha256")
        (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(header))
    with pytest.raises(
        AdapterFileError, match=r"adapter.*safetensors: Module 'model.layers.1.mlp.down_proj'"
    ):
        ContextAdapter.from_pretrained(folder)


# ------------------------------------------------------------------------------------- header field types
def own_header_cases():
    deep = {"nested": None}
    for _ in range(3000):
        deep = {"nested": deep}
    cases = [
        ("schema_version", True),
        ("schema_version", "1"),
        ("schema_version", 0),
        ("sha256", ["x"]),
        ("sha256", {ADAPTER_WEIGHTS_NAME: 5}),
        ("modules", ["model.layers.0.self_attn.q_proj"]),
        ("modules", {"model.layers.0.self_attn.q_proj": 5}),
        ("modules", {}),
        ("scale", "2"),
        ("scale", [1.0]),
        ("scale", True),
        ("scale", 10**400),
        ("shape", "8x6"),
        ("shape", [8]),
        ("shape", [True, 6]),
        ("shape", None),
        ("base_model", 5),
        ("base_revision", ["v1"]),
        ("metadata", [1, 2]),
        ("metadata", "text"),
    ]
    return [pytest.param(field, value, id=f"{field}-{i}") for i, (field, value) in enumerate(cases)]


@pytest.mark.parametrize("field, value", own_header_cases())
def test_own_header_fields_of_the_wrong_type(tmp_path, field, value):
    folder = ContextAdapter(factors()).save_pretrained(tmp_path / "a")
    header = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    if field in ("scale", "shape"):
        header["modules"]["model.layers.0.self_attn.q_proj"][field] = value
    else:
        header[field] = value
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(header))
    with pytest.raises(AdapterFileError):
        ContextAdapter.from_pretrained(folder)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a": ' * 100_000, "1" * 5000, "{\udc80}"])
def test_json_that_python_cannot_parse_is_an_adapter_file_error(tmp_path, text):
    folder = ContextAdapter(factors()).save_pretrained(tmp_path / "a")
    (folder / ADAPTER_CONFIG_NAME).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(AdapterFileError, match="not valid JSON|must hold a JSON object"):
        ContextAdapter.from_pretrained(folder)


@pytest.mark.parametrize(
    "field, value",
    [
        ("r", "2"),
        ("r", True),
        ("r", 0),
        ("lora_alpha", "x"),
        ("lora_alpha", [2]),
        ("use_rslora", "yes"),
        ("rank_pattern", ["q_proj"]),
        ("rank_pattern", {"(": 2}),
        ("rank_pattern", {"q_proj": "2"}),
        ("alpha_pattern", {"q_proj": None}),
        ("alpha_pattern", {"[": 1.0}),
        ("base_model_name_or_path", 5),
        ("revision", 1.5),
        ("peft_type", 3),
    ],
)
def test_peft_config_fields_of_the_wrong_type(tmp_path, field, value):
    folder = ContextAdapter(factors()).save_pretrained(tmp_path / "p", format="peft")
    config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    config[field] = value
    (folder / PEFT_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterFileError):
        ContextAdapter.from_pretrained(folder)


def test_factor_tensors_of_the_wrong_kind_are_an_adapter_file_error(tmp_path):
    folder = ContextAdapter(factors()).save_pretrained(tmp_path / "a")
    header = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    header.pop("sha256")
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(header))
    tensors = {f"{n}.lora_A": torch.ones(2, d_in, dtype=torch.int64) for n, (_, d_in) in SHAPES.items()}
    tensors |= {f"{n}.lora_B": torch.ones(d_out, 2, dtype=torch.int64) for n, (d_out, _) in SHAPES.items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS_NAME))
    with pytest.raises(AdapterFileError, match="floating point"):
        ContextAdapter.from_pretrained(folder)
    save_file({k: torch.ones(3) for k in tensors}, str(folder / ADAPTER_WEIGHTS_NAME))
    with pytest.raises(AdapterFileError, match="not matrices"):
        ContextAdapter.from_pretrained(folder)


# ---------------------------------------------------------------------------------------- base ids
def test_stack_refuses_adapters_for_different_bases_as_compose_does():
    bare = ContextAdapter(factors(0))
    one = ContextAdapter(factors(1), base_model="org/one")
    two = ContextAdapter(factors(2), base_model="org/two")
    for combine in (stack, compose):
        with pytest.raises(AdapterMismatchError, match="different base models.*org/one.*org/two"):
            combine([bare, one, two])
    assert stack([bare, one]).base_model == "org/one"


def test_base_ids_are_compared_normalised(tmp_path, monkeypatch):
    from ctx2param.adapter import bases_differ, normalize_base_id

    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "models" / "base")
    for same in ("models/base", "./models/base", "models/base/", absolute, str(tmp_path / "link")):
        assert normalize_base_id(same) == ("path", os.path.normcase(os.path.realpath(absolute))), same
        assert not bases_differ(same, absolute)
    assert bases_differ("models/base", "other") and bases_differ(absolute, str(tmp_path / "other"))
    assert not bases_differ(
        "HuggingFaceTB/SmolLM2-135M", "huggingfacetb/smollm2-135m"
    )  # the Hub ignores case
    assert bases_differ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct")
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert normalize_base_id(str(snapshot)) == ("hub", "huggingfacetb/smollm2-135m")
    assert bases_differ(str(snapshot), "HuggingFaceTB/SmolLM2-360M")
    # a Hub id and an unrelated folder (maybe a copy of it) cannot be told apart; no id is always accepted
    assert not bases_differ("HuggingFaceTB/SmolLM2-135M", absolute)
    assert not bases_differ(None, absolute) and not bases_differ("", "org/x")
    a = ContextAdapter(factors(0), base_model="models/base")
    b = ContextAdapter(factors(1), base_model=absolute)
    assert (a + b).base_model == "models/base"
    with pytest.raises(AdapterMismatchError, match="different base models"):
        a + ContextAdapter(factors(1), base_model="other")


@pytest.fixture
def two_bases(tmp_path):
    """Two tiny llama folders with the same shapes and other weights, and the model loaded from the first."""
    first = _methods.save_tiny_base(tmp_path / "first", seed=0)
    second = _methods.save_tiny_base(tmp_path / "second", seed=1)
    from transformers import AutoModelForCausalLM

    return first, second, AutoModelForCausalLM.from_pretrained(first)


def test_apply_adapter_refuses_an_adapter_made_for_another_base(two_bases, monkeypatch):
    first, second, model = two_bases
    targets = TARGET_MODULES["llama"]
    foreign = ContextAdapter.random(model, target_modules=targets, base_model=str(second))
    for use in (lambda: apply_adapter(model, foreign).__enter__(), lambda: attach_adapter(model, foreign)):
        with pytest.raises(AdapterMismatchError, match=r"made for another base model, .*second.*: this"):
            use()
    with pytest.raises(AdapterMismatchError, match="second"):
        apply_adapter(model, foreign, merge=True).__enter__()
    assert all(not m._forward_hooks for m in model.modules())
    # its own base, by a relative path or the absolute one, or no base at all, is accepted
    monkeypatch.chdir(first.parent)
    for base in ("first", "./first/", str(first), None):
        adapter = ContextAdapter.random(model, target_modules=targets, base_model=base)
        with apply_adapter(model, adapter):
            pass
    # a re-tagged adapter, as the message says
    retagged = ContextAdapter(dict(foreign), base_model=str(first))
    with apply_adapter(model, retagged):
        pass


def test_a_generator_loaded_with_another_base_folder_applies_its_own_adapters(two_bases, tmp_path):
    first, second, _ = two_bases
    generator = _methods.make_generator(str(first))
    folder = generator.save_pretrained(tmp_path / "gen")
    copy_of_first = _methods.save_tiny_base(tmp_path / "copy", seed=0)  # the same base in another folder
    loaded = AutoModelForContextAdaptation.from_pretrained(folder, base_model=str(copy_of_first))
    adapter = loaded.generate_adapter("The secret password is Marigold.")
    assert adapter.base_model == str(first)  # as the config names it
    with loaded.adapted(adapter):  # the base model answers to the config's id too
        pass
