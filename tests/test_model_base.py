"""The shared model base (ContextAdaptationConfig / ContextAdaptationModel / AutoModelForContextAdaptation)
exercised through the tests' own small method (tests/_methods.py): configs, saving and loading, base-model
loading and every bad-input error. Tiny random models only; Hub ids go to the local Hub server."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

try:
    import _methods
except ModuleNotFoundError as _err:  # tests/ imported as a package
    if _err.name != "_methods":
        raise
    from tests import _methods

from ctx2param import AutoModelForContextAdaptation, ContextAdaptationModel, apply_adapter, testing_utils
from ctx2param import modeling_utils as mu
from ctx2param.configuration_utils import CONFIG_SCHEMA_VERSION, UnknownConfigVersionError
from ctx2param.errors import AdapterMismatchError
from ctx2param.modeling_utils import CheckpointError, UnknownMethodError

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
TEXTS = ["The secret password is Marigold.", "Paris is the capital of France; the meeting is on Thursday."]
PROMPT = torch.tensor([[1, 40, 41, 42, 43, 44]])
_COUNTER = itertools.count()

_methods.register()


def _repo(name: str) -> str:
    return f"org/{name}-{next(_COUNTER)}"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _methods.save_tiny_base(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="module")
def generator(base_dir: Path) -> _methods.MeanPoolModel:
    return _methods.make_generator(str(base_dir))


@pytest.fixture(scope="module")
def saved_dir(generator: _methods.MeanPoolModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(generator.save_pretrained(tmp_path_factory.mktemp("gen") / "generator"))


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def _adapted_logits(model: ContextAdaptationModel, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    adapter = model.generate_adapter(text)
    with torch.no_grad():
        plain = model(input_ids=PROMPT).logits
        adapted = model(input_ids=PROMPT, adapter=adapter).logits
    return plain, adapted


def _delta_weights(adapter) -> dict[str, torch.Tensor]:
    return {name: adapter.delta_weight(name).detach() for name in adapter}


# ------------------------------------------------------------------------------------------------ configs
def test_config_round_trip(tmp_path: Path) -> None:
    config = _methods.MeanPoolConfig(
        bottleneck=5,
        init_std=0.1,
        base_model_name_or_path="org/some-base",
        base_model_revision="0123abc",
        target_modules=["q_proj", "v_proj"],
        target_shapes={"model.layers.0.self_attn.q_proj": [64, 64]},
        rank=3,
        scale=0.5,
        chunk_tokens=128,
    )
    config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["model_type"] == "ctx2param_test_meanpool"
    assert on_disk["method"] == "test_meanpool"
    assert on_disk["schema_version"] == CONFIG_SCHEMA_VERSION
    fields = [
        "bottleneck",
        "init_std",
        "base_model_name_or_path",
        "base_model_revision",
        "target_modules",
        "target_shapes",
        "rank",
        "scale",
        "chunk_tokens",
        "schema_version",
    ]
    for loaded in (
        _methods.MeanPoolConfig.from_pretrained(tmp_path),
        AutoConfig.from_pretrained(tmp_path),
        _methods.MeanPoolConfig.from_dict(config.to_dict()),
    ):
        assert type(loaded) is _methods.MeanPoolConfig
        assert {f: getattr(loaded, f) for f in fields} == {f: getattr(config, f) for f in fields}


def test_import_registers_model_types_with_auto_config() -> None:
    """In a fresh interpreter: `import ctx2param` alone makes AutoConfig know every method package's type;
    the test method becomes known exactly when it is registered."""
    code = textwrap.dedent(
        f"""
        import json, pkgutil, sys
        from pathlib import Path
        import ctx2param
        from transformers import AutoConfig
        from ctx2param.modeling_utils import registered_methods
        models_dir = Path(ctx2param.__file__).parent / "models"  # listed, not imported
        packages = [m.name for m in pkgutil.iter_modules([str(models_dir)]) if m.ispkg]
        types = sorted(registered_methods())
        known = [t for t in types if AutoConfig.for_model(t).model_type == t]
        try:
            AutoConfig.for_model("ctx2param_test_meanpool")
            before = True
        except ValueError:
            before = False
        sys.path.insert(0, {str(TESTS_DIR)!r})
        import _methods
        _methods.register()
        after = type(AutoConfig.for_model("ctx2param_test_meanpool")).__name__
        print(json.dumps(dict(packages=packages, types=types, known=known, before=before, after=after)))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["known"] == result["types"]
    assert all(t.startswith("ctx2param_") for t in result["types"])
    # every method package under ctx2param.models registers (at least) one model type on `import ctx2param`
    assert len(result["types"]) >= len(result["packages"]) >= 1, (
        f"`import ctx2param` registered {result['types']} but ctx2param.models has the method packages "
        f"{result['packages']}: ctx2param/__init__.py must import ctx2param.models."
    )
    assert result["before"] is False
    assert result["after"] == "MeanPoolConfig"


# ------------------------------------------------------------------------------------------ save and load
@pytest.mark.parametrize("max_shard_size", ["2GB", "40KB"])
def test_save_and_load_give_identical_adapters_and_outputs(
    generator: _methods.MeanPoolModel, tmp_path: Path, max_shard_size: str
) -> None:
    folder = Path(generator.save_pretrained(tmp_path / "gen", max_shard_size=max_shard_size))
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if max_shard_size == "40KB":
        assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    else:
        assert shards == ["model.safetensors"] and not (folder / "model.safetensors.index.json").exists()
    loaded = AutoModelForContextAdaptation.from_pretrained(folder)
    assert type(loaded) is _methods.MeanPoolModel
    own, back = generator.method_state_dict(), loaded.method_state_dict()
    assert own.keys() == back.keys()
    assert all(torch.equal(own[k], back[k]) for k in own)
    a, b = generator.generate_adapter(TEXTS), loaded.generate_adapter(TEXTS)
    for x, y in zip(a, b, strict=True):
        dx, dy = _delta_weights(x), _delta_weights(y)
        assert all(torch.equal(dx[n], dy[n]) for n in dx)
    plain, adapted = _adapted_logits(generator, TEXTS[0])
    plain2, adapted2 = _adapted_logits(loaded, TEXTS[0])
    assert torch.equal(plain, plain2) and torch.equal(adapted, adapted2)
    assert (adapted - plain).abs().max() > 1e-3  # the adapter does change the output


def test_save_writes_no_base_weights(
    generator: _methods.MeanPoolModel, saved_dir: Path, base_dir: Path
) -> None:
    names = sorted(p.name for p in saved_dir.iterdir())
    assert names == ["config.json", "model.safetensors"]
    with safe_open(str(saved_dir / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        saved = {k: fh.get_tensor(k) for k in keys}
    own = generator.method_state_dict()
    assert keys == set(own) and not any(k.startswith("base_lm.") for k in keys)
    assert all(torch.equal(saved[k], own[k]) for k in keys)
    own_bytes = sum(t.numel() * t.element_size() for t in own.values())
    base_bytes = sum(p.numel() * p.element_size() for p in generator.base_lm.parameters())
    file_bytes = (saved_dir / "model.safetensors").stat().st_size
    assert own_bytes <= file_bytes < own_bytes + 16_384  # the weights plus a small JSON header
    assert file_bytes < base_bytes  # the base (bigger than the method here) is not in there
    assert (base_dir / "model.safetensors").stat().st_size > file_bytes


def test_base_model_as_hub_id_folder_or_loaded_model(saved_dir: Path, base_dir: Path, local_hub) -> None:
    repo = _repo("tiny-base")
    local_hub.add_files(repo, {p.name: p for p in base_dir.iterdir()})
    loaded_base = LlamaForCausalLM.from_pretrained(base_dir)
    outputs = []
    for base in (repo, str(base_dir), loaded_base, None):  # None: the folder the config names
        model = AutoModelForContextAdaptation.from_pretrained(saved_dir, base_model=base)
        assert (model.base_lm is loaded_base) == (base is loaded_base)
        assert model.tokenizer is not None
        outputs.append(_adapted_logits(model, TEXTS[1])[1])
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])
    # a fresh generator from a Hub id records the id as its base
    fresh = _methods.make_generator(repo)
    assert fresh.config.base_model_name_or_path == repo


def test_kwargs_are_forwarded_to_the_base(saved_dir: Path, base_dir: Path, monkeypatch) -> None:
    calls = []
    original = mu.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(mu.AutoModelForCausalLM, "from_pretrained", spy)
    model = AutoModelForContextAdaptation.from_pretrained(
        saved_dir,
        dtype=torch.bfloat16,
        base_revision="main",
        local_files_only=True,
        attn_implementation="eager",
        device_map={"": "cpu"},
    )
    ((args, kwargs),) = calls
    assert args == (str(base_dir),)
    assert kwargs["dtype"] is torch.bfloat16 and kwargs["revision"] == "main"
    assert kwargs["device_map"] == {"": "cpu"}
    assert model.base_device == torch.device("cpu")
    assert kwargs["local_files_only"] is True and kwargs["attn_implementation"] == "eager"
    assert "trust_remote_code" not in kwargs
    assert {p.dtype for p in model.base_lm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.method_parameters()} == {torch.bfloat16}  # follows the base's float dtype
    assert model.base_lm.config._attn_implementation == "eager"
    adapter = model.generate_adapter(TEXTS[0])
    assert adapter.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------- adapted inference
def test_forward_and_generate_with_adapter_match_the_context_manager(generator) -> None:
    adapter = 20.0 * generator.generate_adapter(TEXTS[0])  # strong enough to change greedy tokens
    greedy = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        bare = generator.generate(PROMPT, **greedy)
        with_kwarg = generator.generate(PROMPT, adapter=adapter, **greedy)
        with generator.adapted(adapter):
            in_block = generator.generate(PROMPT, **greedy)
        with generator.adapted(adapter, merge=True):  # ΔW in the weights for the block
            merged = generator.generate(PROMPT, **greedy)
        again = generator.generate(PROMPT, **greedy)  # the base is restored after all three
        logits = generator(PROMPT, adapter=adapter).logits
        with apply_adapter(generator.base_lm, adapter):
            expected = generator.base_lm(PROMPT).logits
    assert with_kwarg.shape == (1, PROMPT.shape[1] + 8)
    assert torch.equal(with_kwarg, in_block) and torch.equal(merged, in_block)
    assert not torch.equal(with_kwarg, bare)
    assert torch.equal(again, bare)
    assert torch.equal(logits, expected)


def test_config_works_without_the_pretrainedconfig_spelling_of_transformers_5() -> None:
    """transformers 4.x has only ``PretrainedConfig``; hide ``PreTrainedConfig`` (lazy module included) so
    that configuration_utils takes its fallback import."""
    script = textwrap.dedent(
        """
        import transformers

        class Hidden(type(transformers)):
            def __getattribute__(self, name):
                if name == "PreTrainedConfig":
                    raise AttributeError(name)
                return super().__getattribute__(name)

            def __getattr__(self, name):
                if name == "PreTrainedConfig":
                    raise AttributeError(name)
                return super().__getattr__(name)

        transformers.__class__ = Hidden
        try:
            from transformers import PreTrainedConfig  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("PreTrainedConfig is still importable: the fallback would not run")

        import ctx2param
        from ctx2param.configuration_utils import PreTrainedConfig as Used

        assert Used is transformers.PretrainedConfig
        assert issubclass(ctx2param.ContextAdaptationConfig, transformers.PretrainedConfig)
        config = ctx2param.ContextAdaptationConfig(base_model_name_or_path="org/base", rank=3)
        again = ctx2param.ContextAdaptationConfig.from_dict(config.to_dict())
        assert again.to_dict() == config.to_dict() and again.rank == 3
        compas = ctx2param.CompAsConfig(rank=5)
        assert ctx2param.CompAsConfig.from_dict(compas.to_dict()).to_dict() == compas.to_dict()
        print("fallback ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fallback ok" in result.stdout


def test_generator_revision_and_local_files_only(
    generator, saved_dir: Path, tmp_path: Path, local_hub
) -> None:
    repo = _repo("revisions")
    first = local_hub.add_files(repo, {p.name: p for p in saved_dir.iterdir()}, message="v1")
    changed = _methods.make_generator(str(generator.config.base_model_name_or_path))
    with torch.no_grad():
        for p in changed.method_parameters():
            p.add_(1.0)
    second_dir = Path(changed.save_pretrained(tmp_path / "v2"))
    local_hub.add_files(repo, {p.name: p for p in second_dir.iterdir()}, message="v2")
    with pytest.raises(CheckpointError, match="not in the local cache"):
        AutoModelForContextAdaptation.from_pretrained(repo, local_files_only=True)
    old = AutoModelForContextAdaptation.from_pretrained(repo, revision=first)
    new = AutoModelForContextAdaptation.from_pretrained(repo)
    assert torch.equal(old.down.weight, generator.down.weight)
    assert torch.equal(new.down.weight, changed.down.weight)
    again = AutoModelForContextAdaptation.from_pretrained(repo, local_files_only=True)  # now cached
    assert torch.equal(again.down.weight, changed.down.weight)
    with pytest.raises(CheckpointError, match="no revision"):
        AutoModelForContextAdaptation.from_pretrained(repo, revision="no-such-branch")


# ------------------------------------------------------------------------------------------- bad input
def test_unknown_method_is_refused(saved_dir: Path, tmp_path: Path) -> None:
    folder = _copy_checkpoint(saved_dir, tmp_path / "unknown")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "ctx2param_no_such_method"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownMethodError, match="ctx2param_no_such_method") as info:
        AutoModelForContextAdaptation.from_pretrained(folder)
    assert "never runs code" in str(info.value) and "ctx2param_test_meanpool" in str(info.value)


def test_newer_schema_version_is_refused(saved_dir: Path, tmp_path: Path) -> None:
    folder = _copy_checkpoint(saved_dir, tmp_path / "newer")
    config = json.loads((folder / "config.json").read_text())
    config["schema_version"] = CONFIG_SCHEMA_VERSION + 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownConfigVersionError, match="newer") as info:
        AutoModelForContextAdaptation.from_pretrained(folder)
    assert "pip install -U" in str(info.value)


@pytest.mark.parametrize("sharded", [False, True])
def test_missing_weight_file(generator, tmp_path: Path, sharded: bool) -> None:
    folder = Path(generator.save_pretrained(tmp_path / "gen", max_shard_size="40KB" if sharded else "2GB"))
    victim = sorted(folder.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match="Missing weight file") as info:
        AutoModelForContextAdaptation.from_pretrained(folder)
    assert victim.name in str(info.value)


def test_truncated_weight_file(saved_dir: Path, tmp_path: Path) -> None:
    folder = _copy_checkpoint(saved_dir, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        AutoModelForContextAdaptation.from_pretrained(folder)


def test_config_without_base_or_folder_without_config(saved_dir: Path, tmp_path: Path) -> None:
    folder = _copy_checkpoint(saved_dir, tmp_path / "nobase")
    config = json.loads((folder / "config.json").read_text())
    config["base_model_name_or_path"] = None
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="names no base model"):
        AutoModelForContextAdaptation.from_pretrained(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        AutoModelForContextAdaptation.from_pretrained(tmp_path / "empty")


def test_base_that_cannot_be_loaded_is_named(saved_dir: Path, tmp_path: Path) -> None:
    """A base that is neither a model folder nor reachable: the error names it and says what to do."""
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    for base, hint in ((empty, "does not hold a loadable causal LM"), (tmp_path / "absent", "base_model=")):
        with pytest.raises(mu.BaseModelError, match="Cannot load the base model") as info:
            AutoModelForContextAdaptation.from_pretrained(saved_dir, base_model=str(base))
        assert str(base) in str(info.value) and hint in str(info.value)
        assert isinstance(info.value, OSError)  # callers catching OSError keep working


def test_base_that_does_not_match(saved_dir: Path) -> None:
    narrow = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=512,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(AdapterMismatchError, match="does not match") as info:
        AutoModelForContextAdaptation.from_pretrained(saved_dir, base_model=narrow)
    assert "(64, 64)" in str(info.value) and "(32, 32)" in str(info.value)
    # another architecture: none of the target layers exists (the error names them)
    with pytest.raises(ValueError, match="q_proj"):
        AutoModelForContextAdaptation.from_pretrained(saved_dir, base_model=testing_utils.tiny_model("gpt2"))


def test_quantization_without_bitsandbytes(saved_dir: Path, base_dir: Path) -> None:
    quant = BitsAndBytesConfig(load_in_4bit=True)
    # the message names the missing package and how to install it (ctx2param's check or transformers')
    with _methods.bitsandbytes_missing():
        with pytest.raises(ImportError, match=r"(?s)bitsandbytes.*pip install"):
            AutoModelForContextAdaptation.from_pretrained(saved_dir, quantization_config=quant)
        with pytest.raises(ImportError, match=r"(?s)bitsandbytes.*pip install"):
            _methods.MeanPoolModel.from_base(
                str(base_dir), _methods.MeanPoolConfig(target_modules=["q_proj"]), quantization_config=quant
            )


def _remote_code_checkpoint(folder: Path, model_type: str, marker: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = (
        json.loads(folder.joinpath("config.json").read_text()) if (folder / "config.json").exists() else {}
    )
    config.update(
        model_type=model_type,
        auto_map={
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModel": "modeling_evil.EvilModel",
            "AutoModelForCausalLM": "modeling_evil.EvilModel",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    payload = f"open({str(marker)!r}, 'w').write('remote code ran')\n"
    (folder / "configuration_evil.py").write_text(payload)
    (folder / "modeling_evil.py").write_text(payload)
    return folder


def test_remote_code_is_never_executed(saved_dir: Path, tmp_path: Path, local_hub, monkeypatch) -> None:
    marker = tmp_path / "ran.txt"
    unknown = _remote_code_checkpoint(tmp_path / "unknown", "evil_remote", marker)
    with pytest.raises(UnknownMethodError, match="evil_remote"):
        AutoModelForContextAdaptation.from_pretrained(unknown)
    # the same through the Hub: the .py files are not even downloaded
    repo = _repo("evil")
    local_hub.add_files(repo, {p.name: p for p in unknown.iterdir()})
    local_hub.clear_request_log()
    with pytest.raises(UnknownMethodError):
        AutoModelForContextAdaptation.from_pretrained(repo)
    assert not [path for _, path, _ in local_hub.request_log if path.endswith(".py")]
    # a known method type with an auto_map: ctx2param's registered class is used, the code is ignored
    known = _remote_code_checkpoint(
        _copy_checkpoint(saved_dir, tmp_path / "known"), "ctx2param_test_meanpool", marker
    )
    seen = []
    original = mu.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        mu.AutoModelForCausalLM,
        "from_pretrained",
        lambda *a, **k: seen.append(k) or original(*a, **k),
    )
    model = AutoModelForContextAdaptation.from_pretrained(known)
    assert type(model) is _methods.MeanPoolModel
    assert seen and all(not k.get("trust_remote_code") for k in seen)
    assert not marker.exists()
