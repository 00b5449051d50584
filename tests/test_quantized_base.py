"""A generator over the real SmolLM2-135M-Instruct loaded in 4 bits (nf4) and 8 bits with bitsandbytes, on
CPU, through ``from_base`` and ``from_pretrained``: the base really is quantized, generated adapters apply
unmerged (the change of a quantized layer's output is exactly scale · x Aᵀ Bᵀ), and ``generate`` works."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip(
    "bitsandbytes", reason="bitsandbytes is not installed (pip install 'ctx2param[quant]')"
)

from transformers import BitsAndBytesConfig  # noqa: E402

try:
    import _methods
except ModuleNotFoundError as _err:  # tests/ imported as a package
    if _err.name != "_methods":
        raise
    from tests import _methods

from ctx2param import AutoModelForContextAdaptation, testing_utils  # noqa: E402
from ctx2param.errors import QuantizedMergeError  # noqa: E402
from ctx2param.injection import merge_adapter  # noqa: E402

pytestmark = pytest.mark.slow

CONTEXT = "The secret password is Marigold."
PROMPT = "What is the password?"
PROBE = "model.layers.0.self_attn.q_proj"  # its input does not depend on any adapter

_methods.register()


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    try:
        return testing_utils.smollm2_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def model_4bit(smollm2_dir: Path) -> _methods.MeanPoolModel:
    config = _methods.MeanPoolConfig(target_modules=["q_proj", "v_proj"], rank=2, bottleneck=8, init_std=0.05)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    torch.manual_seed(0)
    return _methods.MeanPoolModel.from_base(str(smollm2_dir), config, quantization_config=quant)


def _check_unmerged_application(
    model: _methods.MeanPoolModel, layer_type: type, check_restore: bool = True
) -> None:
    """The adapter changes a quantized layer's output by exactly scale · x Aᵀ Bᵀ, changes the logits, is
    removed exactly afterwards (``check_restore``), and generate() runs with it. (Forward passes are few:
    8-bit matmuls are slow on CPU.)"""
    probe = dict(model.base_lm.named_modules())[PROBE]
    assert isinstance(probe, layer_type)
    adapter = model.generate_adapter(CONTEXT)
    assert len(adapter) == 60 and adapter.rank == 2  # q and v of 30 layers
    enc = model.tokenizer(PROMPT, return_tensors="pt")
    seen = {}

    def capture(key):
        def hook(module, inputs, output):
            seen[key] = (inputs[0].detach(), output.detach())

        return hook

    with torch.no_grad():
        handle = probe.register_forward_hook(capture("plain"))
        plain = model(**enc).logits
        handle.remove()
        with model.adapted(adapter):
            handle = probe.register_forward_hook(capture("adapted"))  # runs after the adapter's hook
            adapted = model(**enc).logits
            handle.remove()
            out = model.generate(**enc, max_new_tokens=2, do_sample=False)
        after = model(**enc).logits if check_restore else plain
    x, y_plain = seen["plain"]
    x_adapted, y_adapted = seen["adapted"]
    assert torch.equal(x, x_adapted)
    f = adapter[PROBE]
    expected = f.scale * (x @ f.A.detach().T @ f.B.detach().T)
    torch.testing.assert_close(y_adapted - y_plain, expected, atol=1e-4, rtol=1e-3)
    assert expected.abs().max() > 1e-3
    assert (adapted - plain).abs().max() > 1e-2
    assert torch.equal(after, plain)  # detached exactly
    assert out.shape[0] == 1 and enc["input_ids"].shape[1] < out.shape[1] <= enc["input_ids"].shape[1] + 2
    with pytest.raises(QuantizedMergeError):
        merge_adapter(model.base_lm, adapter)  # quantized weights take adapters unmerged only
    with pytest.raises(QuantizedMergeError), model.adapted(adapter, merge=True):
        pass
    assert torch.equal(model(**enc).logits, plain)  # nothing was changed


def test_4bit_base_via_from_base(model_4bit: _methods.MeanPoolModel) -> None:
    q = dict(model_4bit.base_lm.named_modules())[PROBE]
    assert q.weight.quant_state.quant_type == "nf4"
    assert model_4bit.base_lm.get_memory_footprint() < 200e6  # fp32 is 538 MB
    _check_unmerged_application(model_4bit, bnb.nn.Linear4bit)


def test_8bit_base_via_from_pretrained(model_4bit: _methods.MeanPoolModel, tmp_path: Path) -> None:
    folder = model_4bit.save_pretrained(
        tmp_path / "gen"
    )  # only the method's weights, however the base is held
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    model = AutoModelForContextAdaptation.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    assert model.base_lm.get_memory_footprint() < 260e6
    own, back = model_4bit.method_state_dict(), model.method_state_dict()
    assert all(torch.equal(own[k], back[k]) for k in own)
    _check_unmerged_application(model, bnb.nn.Linear8bitLt, check_restore=False)
