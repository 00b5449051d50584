"""Attaching adapters to models: the hook path against a model whose weights hold W + ΔW, exact restoration,
per-example (batched) adapters, generation, gradients, merge/unmerge, GPT-2 ``Conv1D`` and the error paths.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ctx2param import (
    ContextAdapter,
    apply_adapter,
    attach_adapter,
    detach_adapter,
    merge_adapter,
    stack,
    unmerge_adapter,
)
from ctx2param.adapter import LoraFactors
from ctx2param.errors import AdapterMismatchError
from ctx2param.modules import is_conv1d
from ctx2param.testing_utils import TARGET_MODULES, tiny_model

ARCHS = ["llama", "qwen2", "gemma", "gpt2"]
ATOL = 1e-5  # fp32 logits of a 2-layer model: hook path vs updated weights


def ids_for(batch: int = 3, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


def random_adapter(model: nn.Module, arch: str, seed: int = 1, rank: int = 4, scale: float = 1.0, std=0.1):
    return ContextAdapter.random(
        model, rank=rank, target_modules=TARGET_MODULES[arch], scale=scale, seed=seed, std=std
    )


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def updated_copy(model: nn.Module, adapter: ContextAdapter) -> nn.Module:
    """An independent oracle: a copy of ``model`` whose target weights hold W + ΔW (computed in float64)."""
    other = copy.deepcopy(model)
    modules = dict(other.named_modules())
    with torch.no_grad():
        for name, f in adapter.items():
            module = modules[name]
            delta = f.scale * (f.B.double() @ f.A.double())  # [d_out, d_in]
            if is_conv1d(module):  # GPT-2 Conv1D stores W as [d_in, d_out]
                delta = delta.T
            module.weight.copy_((module.weight.double() + delta).to(module.weight.dtype))
    return other


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def trainable(adapter: ContextAdapter) -> ContextAdapter:
    """A copy whose factors are leaves that require grad."""
    return ContextAdapter(
        {
            n: LoraFactors(
                f.A.detach().clone().requires_grad_(), f.B.detach().clone().requires_grad_(), f.scale
            )
            for n, f in adapter.items()
        }
    )


# ------------------------------------------------------------------------------------- the forward path
@pytest.mark.parametrize("arch", ARCHS)
def test_apply_adapter_computes_with_the_updated_weights(arch):
    model = tiny_model(arch)
    adapter = random_adapter(model, arch)
    ids = ids_for()
    base = logits(model, ids)
    with apply_adapter(model, adapter) as same:
        assert same is model
        adapted = logits(model, ids)
    want = logits(updated_copy(model, adapter), ids)
    assert (adapted - base).abs().max() > 1e-2  # the adapter does change the output...
    torch.testing.assert_close(adapted, want, rtol=0, atol=ATOL)  # ...and exactly as W + ΔW would


@pytest.mark.parametrize("arch", ARCHS)
def test_model_is_restored_exactly_on_exit_and_when_the_body_raises(arch):
    model = tiny_model(arch)
    adapter = random_adapter(model, arch)
    ids = ids_for()
    base = logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with apply_adapter(model, adapter):
        assert not no_hooks(model)
        assert not torch.equal(logits(model, ids), base)
    assert torch.equal(logits(model, ids), base) and no_hooks(model)
    with pytest.raises(RuntimeError, match="inside the block"), apply_adapter(model, adapter):
        logits(model, ids)
        raise RuntimeError("inside the block")
    assert torch.equal(logits(model, ids), base) and no_hooks(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # weights never touched


def test_apply_none_is_a_no_op():
    model = tiny_model("llama")
    ids = ids_for()
    base = logits(model, ids)
    with apply_adapter(model, None) as same:
        assert same is model and no_hooks(model)
        assert torch.equal(logits(model, ids), base)


def test_attach_and_detach():
    model = tiny_model("llama")
    adapter = random_adapter(model, "llama")
    ids = ids_for()
    base = logits(model, ids)
    want = logits(updated_copy(model, adapter), ids)  # copy before attaching: deepcopy copies hooks too
    handle = attach_adapter(model, adapter)
    assert handle.attached and handle.adapter is adapter and handle.model is model
    torch.testing.assert_close(logits(model, ids), want, rtol=0, atol=ATOL)
    detach_adapter(handle)
    assert not handle.attached and no_hooks(model)
    assert torch.equal(logits(model, ids), base)
    handle.detach()  # detaching twice is harmless
    assert torch.equal(logits(model, ids), base)
    with attach_adapter(model, adapter) as h:  # a handle is also a context manager
        assert h.attached
    assert no_hooks(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_two_attached_adapters_equal_their_sum(arch):
    model = tiny_model(arch)
    a = random_adapter(model, arch, seed=1, rank=2, scale=0.5)
    b = random_adapter(model, arch, seed=2, rank=3, scale=-1.5)
    ids = ids_for()
    with apply_adapter(model, a + b):
        summed = logits(model, ids)
    ha, hb = attach_adapter(model, a), attach_adapter(model, b)
    both = logits(model, ids)
    detach_adapter(ha)
    only_b = logits(model, ids)
    detach_adapter(hb)
    torch.testing.assert_close(both, summed, rtol=0, atol=ATOL)
    with apply_adapter(model, b):
        torch.testing.assert_close(only_b, logits(model, ids), rtol=0, atol=0)
    assert no_hooks(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_adapter_equals_one_at_a_time(arch):
    model = tiny_model(arch)
    singles = [
        random_adapter(model, arch, seed=s, rank=r, scale=c)
        for s, r, c in ((1, 2, 1.0), (2, 4, -0.7), (3, 1, 2.0))
    ]
    ids = ids_for(batch=3)
    with apply_adapter(model, stack(singles)):
        batched = logits(model, ids)
    for i, single in enumerate(singles):
        with apply_adapter(model, single):
            alone = logits(model, ids[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=ATOL)
    # A batch of N·m rows (as beam search makes) repeats each adapter m times, consecutively.
    repeated = ids.repeat_interleave(2, 0)
    with apply_adapter(model, stack(singles)):
        out = logits(model, repeated)
    torch.testing.assert_close(out[0::2], batched, rtol=0, atol=ATOL)
    torch.testing.assert_close(out[1::2], batched, rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generate_under_apply_adapter(arch):
    model = tiny_model(arch)
    adapter = random_adapter(model, arch, std=0.3)
    ids = ids_for(batch=2, length=5)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 3}
    with apply_adapter(model, adapter):
        out = model.generate(ids, **kwargs)
    want = updated_copy(model, adapter).generate(ids, **kwargs)
    assert out.shape == (2, 11)
    assert torch.equal(out, want)
    assert not torch.equal(model.generate(ids, **kwargs), out)  # and the adapter mattered
    assert no_hooks(model)


@pytest.mark.parametrize(
    "mode",
    [
        {"num_beams": 2, "num_return_sequences": 2, "do_sample": False},
        {"do_sample": True, "top_k": 1, "num_return_sequences": 2},  # expansion by num_return_sequences
    ],
    ids=["beams", "sampling-top1"],
)
def test_generate_with_a_batched_adapter_and_two_sequences_per_example(mode):
    model = tiny_model("llama")
    singles = [random_adapter(model, "llama", seed=s, std=0.3) for s in (1, 2)]
    ids = ids_for(batch=2, length=5)
    kwargs = {"max_new_tokens": 5, "pad_token_id": 3, **mode}
    with apply_adapter(model, stack(singles)):
        out = model.generate(ids, **kwargs)
    assert out.shape[0] == 4
    for i, single in enumerate(singles):
        with apply_adapter(model, single):
            alone = model.generate(ids[i : i + 1], **kwargs)
        assert torch.equal(out[2 * i : 2 * i + 2], alone)
    assert not torch.equal(out[0:2], out[2:4])


# ------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_the_factors_and_not_the_base(arch):
    model = tiny_model(arch).requires_grad_(False)
    adapter = trainable(random_adapter(model, arch))
    ids = ids_for()
    with apply_adapter(model, adapter):
        loss = model(ids, labels=ids).loss
    loss.backward()
    for name, f in adapter.items():
        assert f.A.grad is not None and f.A.grad.abs().sum() > 0, name
        assert f.B.grad is not None and f.B.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters())


def test_gradients_equal_those_of_peft(tmp_path):
    """The same LoRA trained through PEFT gets the same gradients in its lora_A / lora_B weights."""
    peft = pytest.importorskip("peft")
    model = tiny_model("llama").requires_grad_(False)
    adapter = trainable(random_adapter(model, "llama", rank=4, scale=1.0))
    ids = ids_for()
    with apply_adapter(model, adapter):
        model(ids, labels=ids).loss.backward()
    adapter.save_pretrained(tmp_path / "peft", format="peft")
    peft_model = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "peft", is_trainable=True)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    lora = {n: m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    for name, f in adapter.items():
        layer = lora[f"base_model.model.{name}"]
        torch.testing.assert_close(f.A.grad, layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(f.B.grad, layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-7)


def test_gradients_flow_when_the_base_requires_grad_too():
    model = tiny_model("llama")  # parameters require grad: the hook must not add in place then
    adapter = trainable(random_adapter(model, "llama"))
    ids = ids_for()
    with apply_adapter(model, adapter):
        model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert all(f.A.grad.abs().sum() > 0 for f in adapter.values())


# --------------------------------------------------------------------------------------- merge/unmerge
@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_the_hook_path_and_unmerge_restores(arch):
    model = tiny_model(arch)
    adapter = random_adapter(model, arch, scale=0.8)
    ids = ids_for()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with apply_adapter(model, adapter):
        hooked = logits(model, ids)
    # a merged block: ΔW in the weights, no hook, and the weights copied back bit for bit (also on error)
    with apply_adapter(model, adapter, merge=True) as same:
        assert same is model and no_hooks(model)
        torch.testing.assert_close(logits(model, ids), hooked, rtol=0, atol=ATOL)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="inside"), apply_adapter(model, adapter, merge=True):
        raise RuntimeError("inside the block")
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    # merged for good, then unmerged: W + ΔW − ΔW, exact up to fp32 rounding
    merge_adapter(model, adapter)
    assert no_hooks(model)
    torch.testing.assert_close(logits(model, ids), hooked, rtol=0, atol=ATOL)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
    assert len(changed) == len(adapter)  # exactly the target weights
    unmerge_adapter(model, adapter)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, original[k], rtol=0, atol=1e-6)  # fp32 rounding of W + ΔW − ΔW


def test_merge_into_a_bfloat16_model_restores_within_bfloat16_rounding():
    model = tiny_model("llama").to(torch.bfloat16)
    adapter = random_adapter(model, "llama", std=0.1)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    merge_adapter(model, adapter)
    unmerge_adapter(model, adapter)
    for k, v in model.state_dict().items():
        # two roundings to bfloat16 (8 bits of mantissa): at most about 2 ulp of |W| + |ΔW|
        bound = 2 * 2.0**-8 * (original[k].float().abs() + 0.05)
        assert ((v.float() - original[k].float()).abs() <= bound).all(), k


# ----------------------------------------------------------------------------------- dtype, modes, Conv1D
def test_float32_adapter_on_a_bfloat16_model():
    model = tiny_model("llama")
    adapter = random_adapter(model, "llama")
    ids = ids_for()
    want = logits(updated_copy(model, adapter), ids)
    model = model.to(torch.bfloat16)
    with apply_adapter(model, adapter):
        got = logits(model, ids)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_works_under_inference_mode():
    model = tiny_model("llama")
    adapter = random_adapter(model, "llama")
    ids = ids_for()
    want = logits(updated_copy(model, adapter), ids)
    with torch.inference_mode(), apply_adapter(model, adapter):
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_conv1d_layer_output_moves_by_x_delta_transposed():
    model = tiny_model("gpt2")
    adapter = random_adapter(model, "gpt2")
    name = "transformer.h.0.attn.c_attn"
    conv = model.get_submodule(name)
    assert is_conv1d(conv) and conv.weight.shape == (64, 192)  # [d_in, d_out]
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        base = conv(x)
        with apply_adapter(model, adapter):
            moved = conv(x)
    torch.testing.assert_close(moved - base, x @ adapter.delta_weight(name).T, rtol=1e-5, atol=1e-6)


def test_wrapped_models_expose_their_root():
    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def get_adapter_root(self) -> nn.Module:
            return self.inner

        def forward(self, ids):
            return self.inner(ids)

    model = tiny_model("llama")
    adapter = random_adapter(model, "llama")
    ids = ids_for()
    with apply_adapter(Wrapper(model), adapter):
        got = logits(model, ids)
    torch.testing.assert_close(got, logits(updated_copy(model, adapter), ids), rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------------------- error paths
def test_adapter_for_another_model_missing_module():
    llama, gpt2 = tiny_model("llama"), tiny_model("gpt2")
    adapter = random_adapter(llama, "llama")
    with pytest.raises(
        AdapterMismatchError, match="targets 'model.layers.0.self_attn.q_proj', which GPT2LMHeadModel"
    ):
        attach_adapter(gpt2, adapter)
    with (
        pytest.raises(AdapterMismatchError, match="made for another base model"),
        apply_adapter(gpt2, adapter),
    ):
        pass
    assert no_hooks(gpt2)


def test_adapter_for_another_model_shape_mismatch():
    model = tiny_model("llama")
    shapes = dict(ContextAdapter.random(model, target_modules=TARGET_MODULES["llama"]).shapes)
    shapes["model.layers.1.mlp.down_proj"] = (64, 256)  # last module: nothing may be attached before it
    adapter = ContextAdapter.random(shapes, base_model="org/bigger")
    ids = ids_for()
    base = logits(model, ids)
    with pytest.raises(
        AdapterMismatchError, match=r"down_proj.*maps 128 -> 64 features.*64 x 256.*org/bigger"
    ):
        attach_adapter(model, adapter)
    assert no_hooks(model) and torch.equal(logits(model, ids), base)
    with pytest.raises(AdapterMismatchError, match="maps 128 -> 64"):
        merge_adapter(model, adapter)
    assert torch.equal(logits(model, ids), base)  # the earlier modules were not merged either


def test_target_that_is_not_a_linear_layer():
    model = tiny_model("llama")
    adapter = ContextAdapter.random({"model.layers.0.input_layernorm": (64, 64)})
    with pytest.raises(AdapterMismatchError, match="input_layernorm.*is a LlamaRMSNorm, not linear"):
        attach_adapter(model, adapter)


def test_attach_needs_an_adapter():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="needs a ContextAdapter"):
        attach_adapter(model, {"model.layers.0.self_attn.q_proj": None})


@pytest.mark.parametrize("batch", [2, 4, 5])
def test_batched_adapter_with_an_incompatible_batch(batch):
    model = tiny_model("llama")
    adapter = stack([random_adapter(model, "llama", seed=s) for s in (1, 2, 3)])
    ids = ids_for(batch=batch)
    base = logits(model, ids)
    with (
        pytest.raises(
            AdapterMismatchError, match=f"batched adapter of 3 examples .*multiple of 3.*{batch}, 7"
        ),
        apply_adapter(model, adapter),
    ):
        logits(model, ids)
    assert no_hooks(model) and torch.equal(logits(model, ids), base)


def test_merging_a_batched_adapter_is_refused():
    model = tiny_model("llama")
    adapter = stack([random_adapter(model, "llama", seed=s) for s in (1, 2)])
    ids = ids_for()
    base = logits(model, ids)
    with pytest.raises(ValueError, match="batched .* cannot be merged .*unbind"):
        merge_adapter(model, adapter)
    with pytest.raises(ValueError, match="batched .* cannot be merged"):
        unmerge_adapter(model, adapter)
    assert torch.equal(logits(model, ids), base)


def test_merged_block_refuses_a_batched_adapter_and_changes_nothing():
    model = tiny_model("llama")
    batched = stack([random_adapter(model, "llama", seed=s) for s in (1, 2)])
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="batched"), apply_adapter(model, batched, merge=True):
        pass
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
