"""Adapters on real bitsandbytes layers on CPU: 4-bit (nf4, fp4) and 8-bit bases loaded by transformers.

The float reference is the same tiny model with every quantized weight replaced by its dequantized value
(``bitsandbytes.functional.dequantize_4bit`` / ``int8_vectorwise_dequant``), so any difference between the two
is the quantized kernel's own arithmetic, never the adapter's.

The AVX512-BF16 trap (see ENVIRONMENT.md): on such CPUs bitsandbytes repacks a ``Linear4bit`` weight the first
time the layer runs in eval mode on an input that does not require grad (a ``torch.no_grad()`` forward, or
the first layer of a frozen model), and from then on it computes in a bfloat16 kernel (errors ~1e-2) and
passes no gradient to its input: gradients of adapter factors of earlier layers become silently wrong. Setting
``layer.support_avx512bf16_for_cpu = False`` before the first forward (:func:`keep_4bit_exact`) avoids it
(training mode does too). ``attach_adapter`` and ctx2param's base loader apply that guard themselves
(``ctx2param.injection.keep_4bit_exact``): the ``..._without_a_manual_guard`` tests check it on a model that
the test did not guard.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from ctx2param import ContextAdapter, apply_adapter, merge_adapter, stack, unmerge_adapter
from ctx2param.adapter import LoraFactors
from ctx2param.errors import QuantizedMergeError
from ctx2param.injection import keep_4bit_exact as keep_4bit_exact_library
from ctx2param.modules import is_quantized_module
from ctx2param.testing_utils import TARGET_MODULES, tiny_model

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import dequantize_4bit, int8_vectorwise_dequant  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

KINDS = ["nf4", "fp4", "int8"]
TARGETS = TARGET_MODULES["llama"]
# Logits tolerance against the float reference: 4-bit layers dequantize and multiply in the compute dtype
# (exact against the reference); 8-bit layers also quantize their input rows to int8 (about 1% per layer).
LOGIT_ATOL = {"nf4": 1e-5, "fp4": 1e-5, "int8": 2e-2}
GRAD_RTOL = {"nf4": 1e-4, "fp4": 1e-4, "int8": 5e-2}


def has_avx512_bf16() -> bool:
    try:
        from bitsandbytes.nn.modules import has_avx512bf16

        return bool(has_avx512bf16())
    except ImportError:  # older bitsandbytes: no repacking at all
        return False


@pytest.fixture(autouse=True)
def _quiet_int8_warning():
    """``MatMul8bitLt`` logs a cast warning on every call; keep the test log readable."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random llama saved once, loaded quantized by each test."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    return path


def quant_config(kind: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=compute_dtype
    )


def keep_4bit_exact(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes repacking 4-bit weights for its AVX512-BF16 kernel (the trap in the docstring)."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def load_quantized(path, kind: str, dtype: torch.dtype = torch.float32, guard: bool = True) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quant_config(kind, dtype), device_map="cpu", dtype=dtype
    ).eval()
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit)
    return keep_4bit_exact(model) if guard else model


def dequantized(module: nn.Module) -> torch.Tensor:
    """The float weight ``[d_out, d_in]`` that a bitsandbytes layer stands for."""
    if isinstance(module, bnb.nn.Linear4bit):
        assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False), "weight was repacked"
        return dequantize_4bit(module.weight.data, module.weight.quant_state)
    return int8_vectorwise_dequant(module.weight.data, module.weight.SCB)


def float_reference(path, quantized: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The same model in float, each quantized weight replaced by its dequantized value."""
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    count = 0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if is_quantized_module(module):
                ref.get_submodule(name).weight.copy_(dequantized(module).to(dtype))
                count += 1
    assert count == 2 * len(TARGETS)
    return ref


def ids_for(batch: int = 3, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def random_adapter(model: nn.Module, seed: int = 1, rank: int = 4, scale: float = 1.0) -> ContextAdapter:
    return ContextAdapter.random(model, rank=rank, target_modules=TARGETS, seed=seed, std=0.1, scale=scale)


def trainable(adapter: ContextAdapter) -> ContextAdapter:
    return ContextAdapter(
        {
            n: LoraFactors(
                f.A.detach().clone().requires_grad_(), f.B.detach().clone().requires_grad_(), f.scale
            )
            for n, f in adapter.items()
        }
    )


def factor_grads(model: nn.Module, adapter: ContextAdapter, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of a language-model loss with respect to every A and B, through ``model`` (frozen, eval)."""
    adapter = trainable(adapter)
    model.requires_grad_(False)
    with apply_adapter(model, adapter):
        model(ids, labels=ids).loss.backward()
    grads = {}
    for name, f in adapter.items():
        grads[f"{name}.A"], grads[f"{name}.B"] = f.A.grad, f.B.grad
    return grads


# ------------------------------------------------------------------------------------ forward pass
@pytest.mark.parametrize("kind", KINDS)
def test_each_layer_moves_by_exactly_the_adapter(tiny_dir, kind):
    """On every quantized target (repacked or not), output with adapter − output without = x (scale·BA)ᵀ."""
    model = load_quantized(tiny_dir, kind, guard=False)
    adapter = random_adapter(model, scale=0.7)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, factors in adapter.items():
            layer = model.get_submodule(name)
            x = torch.randn(2, 5, factors.shape[1], generator=gen)
            base = layer(x)
            with apply_adapter(model, adapter):
                moved = layer(x)
            want = (x.double() @ adapter.delta_weight(name).double().T).float()
            torch.testing.assert_close(moved - base, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(layer(x), base)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_the_float_model_with_the_dequantized_weights(tiny_dir, kind):
    model = load_quantized(tiny_dir, kind)
    ref = float_reference(tiny_dir, model)
    adapter = random_adapter(model)
    ids = ids_for()
    q_base, r_base = logits(model, ids), logits(ref, ids)
    with apply_adapter(model, adapter):
        q_adapted = logits(model, ids)
    with apply_adapter(ref, adapter):
        r_adapted = logits(ref, ids)
    atol = LOGIT_ATOL[kind]
    assert (r_adapted - r_base).abs().max() > 0.5  # a clear move, far above the tolerance
    torch.testing.assert_close(q_base, r_base, rtol=0, atol=atol)
    torch.testing.assert_close(q_adapted, r_adapted, rtol=0, atol=atol)
    torch.testing.assert_close(q_adapted - q_base, r_adapted - r_base, rtol=0, atol=atol)


def test_4bit_with_bfloat16_compute(tiny_dir):
    model = load_quantized(tiny_dir, "nf4", dtype=torch.bfloat16)
    ref = float_reference(tiny_dir, model, dtype=torch.bfloat16)
    adapter = random_adapter(model)  # float32 factors: the update is computed in the activations' dtype
    ids = ids_for()
    with apply_adapter(model, adapter):
        q_adapted = model(ids).logits
    with apply_adapter(ref, adapter):
        r_adapted = ref(ids).logits
    assert q_adapted.dtype == torch.bfloat16
    torch.testing.assert_close(q_adapted, r_adapted, rtol=0, atol=2e-2)  # bfloat16 keeps 8 bits


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("guard", [True, False], ids=["exact-4bit", "as-loaded"])
def test_per_example_batch_equals_one_at_a_time(tiny_dir, kind, guard):
    model = load_quantized(tiny_dir, kind, guard=guard)
    singles = [random_adapter(model, seed=s, rank=r) for s, r in ((1, 2), (2, 4), (3, 1))]
    ids = ids_for(batch=3)
    with apply_adapter(model, stack(singles)):
        batched = logits(model, ids)
    for i, single in enumerate(singles):
        with apply_adapter(model, single):
            torch.testing.assert_close(batched[i : i + 1], logits(model, ids[i : i + 1]), rtol=0, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_restoration_after_an_exception_is_exact(tiny_dir, kind):
    model = load_quantized(tiny_dir, kind, guard=False)
    adapter = random_adapter(model)
    ids = ids_for()
    base = logits(model, ids)  # (on AVX512-BF16 CPUs this first no-grad forward repacks 4-bit weights)
    with pytest.raises(KeyError, match="boom"), apply_adapter(model, adapter):
        assert not torch.equal(logits(model, ids), base)
        raise KeyError("boom")
    assert torch.equal(logits(model, ids), base)
    assert all(not m._forward_hooks for m in model.modules())


def test_generate_on_a_4bit_base(tiny_dir):
    model = load_quantized(tiny_dir, "nf4")
    ref = float_reference(tiny_dir, model)
    adapter = ContextAdapter.random(model, rank=4, target_modules=TARGETS, seed=1, std=0.3)
    ids = ids_for(batch=2, length=5)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 3}
    with apply_adapter(model, adapter):
        out = model.generate(ids, **kwargs)
    with apply_adapter(ref, adapter):
        want = ref.generate(ids, **kwargs)
    assert torch.equal(out, want)
    assert not torch.equal(out, model.generate(ids, **kwargs))


# ------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_the_factors_and_equal_the_float_reference(tiny_dir, kind):
    model = load_quantized(tiny_dir, kind)  # with the guard for 4-bit (see the module docstring)
    ref = float_reference(tiny_dir, model)
    adapter = random_adapter(model)
    ids = ids_for()
    with apply_adapter(model, adapter):
        logits(model, ids)  # an evaluation pass first: the case that trips unguarded 4-bit layers
    got, want = factor_grads(model, adapter, ids), factor_grads(ref, adapter, ids)
    for key, grad in got.items():
        assert grad is not None and grad.abs().sum() > 0, key
        scale = want[key].abs().max()
        assert (grad - want[key]).abs().max() <= GRAD_RTOL[kind] * scale, key
    assert all(p.grad is None for p in model.parameters())


def test_4bit_gradients_survive_a_no_grad_forward_without_a_manual_guard(tiny_dir):
    """attach_adapter guards every Linear4bit itself: an evaluation forward under no_grad (which repacks the
    weights on AVX512-BF16 CPUs when unguarded) leaves later gradients exact."""
    model = load_quantized(tiny_dir, "nf4", guard=False)
    ref = float_reference(tiny_dir, model)
    adapter = random_adapter(model)
    ids = ids_for()
    with apply_adapter(model, adapter):
        logits(model, ids)  # e.g. an evaluation step before training
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    got, want = factor_grads(model, adapter, ids), factor_grads(ref, adapter, ids)
    worst = max(((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in got)
    assert worst <= 1e-3, f"gradients off by up to {worst:.0%} of their size"


@pytest.mark.skipif(
    not has_avx512_bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs"
)
def test_4bit_weights_repacked_before_attaching_are_named_and_can_be_unpacked(tiny_dir, caplog):
    """A model that ran a no-grad forward before any adapter was attached (so bitsandbytes repacked its
    weights): attaching leaves the base as it computes (detach restores it exactly) and warns;
    keep_4bit_exact unpacks the weights, after which every factor gets a non-zero gradient."""
    model = load_quantized(tiny_dir, "nf4", guard=False)
    ids = ids_for()
    base = logits(model, ids)  # repacks every Linear4bit
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert all(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    with (
        caplog.at_level(logging.WARNING, logger="ctx2param.injection"),
        apply_adapter(model, random_adapter(model)),
    ):
        pass
    assert f"{len(layers)} bitsandbytes 4-bit layers" in caplog.text and "keep_4bit_exact" in caplog.text
    assert torch.equal(logits(model, ids), base)
    assert keep_4bit_exact_library(model) == 0
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    grads = factor_grads(model, random_adapter(model), ids)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_the_base_loader_guards_4bit_layers(tiny_dir):
    from ctx2param.modeling_utils import load_base_model

    model = load_base_model(
        tiny_dir,
        quantization_config=quant_config("nf4", torch.float32),
        device_map="cpu",
        dtype=torch.float32,
    )
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)


# ---------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_into_a_quantized_layer_is_refused_and_changes_nothing(tiny_dir, kind):
    model = load_quantized(tiny_dir, kind)
    # Layer 0's q_proj becomes a float Linear holding the dequantized weight; it comes first in the adapter,
    # so a merge that changed modules one by one before checking would already have touched it.
    name = "model.layers.0.self_attn.q_proj"
    quantized = model.get_submodule(name)
    floating = nn.Linear(quantized.in_features, quantized.out_features, bias=False)
    with torch.no_grad():
        floating.weight.copy_(dequantized(quantized))
    model.model.layers[0].self_attn.q_proj = floating
    adapter = random_adapter(model)
    assert next(iter(adapter)) == name
    ids = ids_for()
    base = logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for op in (merge_adapter, unmerge_adapter):
        with pytest.raises(QuantizedMergeError, match=r"Cannot merge into .*quantized .*apply_adapter"):
            op(model, adapter)
    after = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(logits(model, ids), base)
    # The float layer alone still merges.
    only_float = ContextAdapter({name: adapter[name]})
    merge_adapter(model, only_float)
    assert not torch.equal(model.get_submodule(name).weight, state[f"{name}.weight"])
