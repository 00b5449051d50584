"""PEFT is the oracle: the same LoRA gives the same logits through ``peft.PeftModel`` and ``apply_adapter``.

Both directions: adapters saved by ctx2param (``format="peft"``) load in PEFT, and LoRAs made and saved by
PEFT itself (plain and rsLoRA scaling, per-module ``rank_pattern`` / ``alpha_pattern``) load with
``ContextAdapter.from_pretrained``. fp32 logits must agree to 1e-5 (max abs difference).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from ctx2param import ContextAdapter, apply_adapter
from ctx2param.adapter import LoraFactors
from ctx2param.testing_utils import TARGET_MODULES, load_smollm2, tiny_model

peft = pytest.importorskip("peft")

ARCHS = ["llama", "qwen2", "gemma", "gpt2"]
ATOL = 1e-5


def ids_for(batch: int = 2, length: int = 9, seed: int = 0, vocab: int = 500) -> torch.Tensor:
    return torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def mixed_adapter(model: torch.nn.Module, targets, seed: int = 0) -> ContextAdapter:
    """Ranks 5, 1-2 and 3 and scales 1, 0.5 and 1.5 on different modules, so that the PEFT folder needs
    zero-padded ranks and folded scales."""
    a = ContextAdapter.random(model, rank=3, target_modules=targets, seed=seed, std=0.1, scale=1.5)
    b = ContextAdapter.random(model, rank=2, target_modules=targets, seed=seed + 1, std=0.1, scale=-0.5)
    total, small = a + b, (a + b).compress(2)
    mixed = {}
    for i, name in enumerate(a):
        if i % 3 == 0:
            mixed[name] = total[name]  # rank 5, scale 1 (the two scales were folded)
        elif i % 3 == 1:
            f = small[name]
            mixed[name] = LoraFactors(f.A[: 1 + i % 2], f.B[:, : 1 + i % 2], 0.5)
        else:
            mixed[name] = a[name]  # rank 3, scale 1.5
    return ContextAdapter(mixed)


# ------------------------------------------------------------------------------- ctx2param -> PEFT
@pytest.mark.parametrize("arch", ARCHS)
def test_saved_as_peft_gives_the_same_logits_in_peft(tmp_path, arch):
    model = tiny_model(arch)
    adapter = mixed_adapter(model, TARGET_MODULES[arch])
    assert len(set(adapter.ranks.values())) > 1 and len({f.scale for f in adapter.values()}) > 1
    ids = ids_for()
    base = logits(model, ids)
    with apply_adapter(model, adapter):
        ours = logits(model, ids)
    adapter.save_pretrained(tmp_path / "peft", format="peft")
    peft_model = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "peft")
    theirs = logits(peft_model, ids)
    assert (ours - base).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= ATOL
    with peft_model.disable_adapter():  # and PEFT's own base is ours
        assert torch.equal(logits(peft_model, ids), base)


# ------------------------------------------------------------------------------- PEFT -> ctx2param
def _peft_lora(arch: str, use_rslora: bool, patterns: bool):
    """A PEFT LoRA with random non-zero A and B; with ``patterns``, ranks and alphas differ per module."""
    targets = TARGET_MODULES[arch]
    kwargs = {}
    if patterns:
        if arch == "gpt2":
            kwargs = {"rank_pattern": {"c_fc": 2, "h.1.attn.c_attn": 6}, "alpha_pattern": {"c_proj": 3.0}}
        else:
            kwargs = {
                "rank_pattern": {"k_proj": 2, "layers.1.mlp.down_proj": 6},
                "alpha_pattern": {"v_proj": 3.0},
            }
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_rslora=use_rslora, init_lora_weights=False, **kwargs
    )
    model = peft.get_peft_model(tiny_model(arch), config)
    with (
        torch.no_grad()
    ):  # init_lora_weights=False already draws B ≠ 0; make it larger so the change is clear
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


@pytest.mark.parametrize("patterns", [False, True], ids=["uniform", "patterns"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_made_by_peft_gives_peft_logits(tmp_path, arch, use_rslora, patterns):
    peft_model = _peft_lora(arch, use_rslora, patterns)
    ids = ids_for()
    theirs = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()

    adapter = ContextAdapter.from_pretrained(tmp_path / "lora")
    peft_layers = {
        n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
    }
    assert set(adapter) == set(peft_layers)
    for name, layer in peft_layers.items():  # the same factors and PEFT's own scaling, module by module
        f = adapter[name]
        assert torch.equal(f.A, layer.lora_A["default"].weight) and torch.equal(
            f.B, layer.lora_B["default"].weight
        )
        assert f.B.abs().sum() > 0
        assert math.isclose(f.scale, layer.scaling["default"], rel_tol=1e-12)
    if patterns:
        assert len(set(adapter.ranks.values())) == 3
        config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
        assert config["rank_pattern"] and config["alpha_pattern"]

    model = tiny_model(arch)
    base = logits(model, ids)
    with apply_adapter(model, adapter):
        ours = logits(model, ids)
    assert (theirs - base).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= ATOL


def test_peft_lora_round_trips_through_our_peft_writer(tmp_path):
    """PEFT folder -> ContextAdapter -> our PEFT folder -> PEFT: still PEFT's logits."""
    peft_model = _peft_lora("llama", use_rslora=True, patterns=True)
    ids = ids_for()
    theirs = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "lora")
    ContextAdapter.from_pretrained(tmp_path / "lora").save_pretrained(tmp_path / "again", format="peft")
    again = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "again")
    assert (logits(again, ids) - theirs).abs().max() <= ATOL


# ------------------------------------------------------------------------------ the real SmolLM2-135M
@pytest.mark.slow
def test_smollm2_saved_as_peft_gives_the_same_logits_in_peft(tmp_path, smollm2):
    model, tokenizer = smollm2
    targets = TARGET_MODULES["llama"]
    adapter = ContextAdapter.random(model, rank=8, target_modules=targets, seed=0, std=0.02, scale=2.0)
    assert len(adapter) == 30 * 7
    assert adapter.shapes["model.layers.0.self_attn.k_proj"] == (192, 576)
    # One module with another rank and scale, so that padding and folding are exercised on the real model.
    factors = dict(adapter.items())
    name = "model.layers.29.mlp.down_proj"
    f = factors[name]
    factors[name] = LoraFactors(f.A[:3], f.B[:, :3], -0.75)
    adapter = ContextAdapter(factors, base_model=adapter.base_model)
    ids = tokenizer(
        "The capital of France is Paris, and the capital of Italy is", return_tensors="pt"
    ).input_ids
    base = logits(model, ids)
    with apply_adapter(model, adapter):
        ours = logits(model, ids)
    assert torch.equal(logits(model, ids), base)  # the shared session model is left as it was
    adapter.save_pretrained(tmp_path / "peft", format="peft")
    fresh, _ = load_smollm2(dtype=torch.float32)  # PEFT rewrites the modules of the model it wraps
    theirs = logits(peft.PeftModel.from_pretrained(fresh, tmp_path / "peft"), ids)
    assert (ours - base).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= ATOL
