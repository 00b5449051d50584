"""FLOP counts of a training step (``ctx2param.training.flops``), used for model-FLOPs utilisation: the parts
add up, the teacher's share equals the forward-pass formula computed independently, and the count grows
exactly linearly when the batch is repeated."""

from __future__ import annotations

import pytest
import torch

from ctx2param.models.compas import CompAsConfig, CompAsModel
from ctx2param.models.dyprag import DyPRAGConfig, DyPRAGModel
from ctx2param.testing_utils import TARGET_MODULES, tiny_model, tiny_tokenizer
from ctx2param.training.data import TrainingExample
from ctx2param.training.flops import base_cost, batch_flops

EXAMPLES = [
    TrainingExample(
        ("The secret password is Marigold.", "The meeting is on Thursday."), "Password?", "Marigold"
    ),
    TrainingExample(("Paris is the capital of France.",), "Question: capital of France?\nAnswer:", "Paris"),
]


def _compas() -> CompAsModel:
    config = CompAsConfig(target_modules=TARGET_MODULES["llama"], latent_dim=16, rank=2, chunk_tokens=24)
    return CompAsModel.from_base(tiny_model("llama"), config, tokenizer=tiny_tokenizer())


def _dyprag() -> DyPRAGModel:
    config = DyPRAGConfig(target_modules=TARGET_MODULES["llama"], translator_hidden=16, chunk_tokens=24)
    return DyPRAGModel.from_base(tiny_model("llama"), config, tokenizer=tiny_tokenizer())


def _linear_params(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings()
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)


@pytest.mark.parametrize("build", [_compas, _dyprag], ids=["compas", "dyprag"])
def test_parts_add_up_and_teacher_matches_the_formula(build):
    model = build()
    batch = model.collate_training_examples(EXAMPLES)
    flops = batch_flops(model, batch)
    parts = {k: v for k, v in flops.items() if k not in ("total", "tokens", "context_tokens")}
    assert flops["total"] == pytest.approx(sum(parts.values()))
    assert all(v > 0 for k, v in parts.items() if k != "decoder"), parts
    cost = base_cost(model.base_lm)
    assert cost.linear_params == _linear_params(model.base_lm)
    lengths = batch["teacher_attention_mask"].sum(-1).tolist()
    n, answer_len = batch["answer_ids"].shape
    text = model.base_lm.config
    expected = (
        2.0 * cost.linear_params * sum(lengths)
        + sum(
            2.0 * text.num_hidden_layers * text.num_attention_heads * text.head_dim * t * t for t in lengths
        )
        + 2.0 * text.vocab_size * text.hidden_size * n * (answer_len + 1)
    )
    assert flops["teacher"] == pytest.approx(expected)
    assert flops["context_tokens"] == batch["chunk_attention_mask"].sum().item()


@pytest.mark.parametrize("build", [_compas, _dyprag], ids=["compas", "dyprag"])
def test_a_repeated_batch_costs_twice(build):
    model = build()
    once = batch_flops(model, model.collate_training_examples(EXAMPLES))
    twice = batch_flops(model, model.collate_training_examples(EXAMPLES + EXAMPLES))
    for key in ("teacher", "student"):
        assert twice[key] == pytest.approx(2 * once[key]), key
    # examples that share their contexts share their adapters: the chunks are read once
    assert twice["context_tokens"] == once["context_tokens"]
    if build is _dyprag:
        assert twice["generator"] == pytest.approx(once["generator"])


def test_unknown_method_is_named():
    class Stub:
        config = type("C", (), {"method_name": "nope"})()

    with pytest.raises(KeyError, match="nope"):
        batch_flops(Stub(), {})
