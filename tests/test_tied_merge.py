"""``merge=True`` into a weight tied to another (an LM head tied to the input embeddings, as in SmolLM2): the
merged block computes what the hooks compute (the embeddings keep W) and gives the shared tensor back, tie
included; a merge for good into a tied weight is refused with a clear error. On a tiny tied llama and on
the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest
import torch

from ctx2param import ContextAdapter, apply_adapter, merge_adapter, unmerge_adapter
from ctx2param.errors import TiedWeightMergeError
from ctx2param.testing_utils import tiny_model

TARGETS = ("lm_head", "q_proj", "down_proj")


def check_merge_into_tied_head(model, ids: torch.Tensor, std: float, atol: float) -> float:
    """Run the checks; returns how far the hooked logits are from the bare model's (the update's size)."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embeddings.weight  # tied
    shared = head.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = ContextAdapter.random(model, rank=4, target_modules=TARGETS, seed=0, std=std)
    assert "lm_head" in adapter
    with torch.no_grad():
        bare = model(ids).logits
        with apply_adapter(model, adapter):
            hooked = model(ids).logits
        with apply_adapter(model, adapter, merge=True):
            assert torch.equal(embeddings.weight, before["model.embed_tokens.weight"])  # inputs keep W
            merged = model(ids).logits
    torch.testing.assert_close(merged, hooked, rtol=0, atol=atol)
    assert head.weight is shared and embeddings.weight is shared  # the tie is back
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # bit for bit
    for permanent in (merge_adapter, unmerge_adapter):
        with pytest.raises(TiedWeightMergeError, match=r"'lm_head'.*shared with \['model.embed_tokens"):
            permanent(model, adapter)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused: nothing changed
    untied = ContextAdapter({n: f for n, f in adapter.items() if n != "lm_head"}, adapter.base_model)
    merge_adapter(model, untied)  # the other targets still merge for good
    unmerge_adapter(model, untied)
    return float((hooked - bare).abs().max())


def test_merge_into_a_tied_head_of_a_tiny_model():
    model = tiny_model("llama")
    ids = torch.randint(4, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    assert check_merge_into_tied_head(model, ids, std=0.2, atol=1e-5) > 1e-2


@pytest.mark.slow
def test_merge_into_the_tied_head_of_smollm2(smollm2):
    model, tok = smollm2
    ids = tok(
        ["The capital of France is", "A context adapter turns a passage"], return_tensors="pt", padding=True
    )
    # float32 logits of 135M parameters, ~20 in size: the merged and hooked sums round differently
    assert check_merge_into_tied_head(model, ids.input_ids, std=0.1, atol=2e-3) > 1.0
