"""The training fast path computes the same numbers as the module-by-module path.

Adapters inside training travel as per-kind stacked factors (:class:`ctx2param.stacked.StackedAdapter`):
their sums, inner products, additivity terms and injection must equal those of ``ContextAdapter`` objects
attached with ``apply_adapter`` — checked here on tiny random models in float32 on the CPU, for the losses
and for every gradient (relative difference below 1e-5), with batches whose chunks fall into several length
buckets and whose examples share context sets."""

from __future__ import annotations

import pytest
import torch

from ctx2param import ContextAdapter, apply_adapter
from ctx2param.adapter import stack
from ctx2param.alignment import length_buckets, sum_chunk_adapters
from ctx2param.injection import attach_stacked_adapter
from ctx2param.models.compas import CompAsConfig, CompAsModel
from ctx2param.models.dyprag import DyPRAGConfig, DyPRAGModel
from ctx2param.modules import LayerKindLayout, target_module_shapes
from ctx2param.stacked import StackedAdapter
from ctx2param.testing_utils import TARGET_MODULES, tiny_model, tiny_tokenizer
from ctx2param.training.data import TrainingExample
from ctx2param.training.sampler import LengthGroupedBatchSampler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"]
WORDS += ["mu", "nu", "xi", "omicron", "pi", "rho"]


def passage(i: int) -> str:
    """A passage of ``4 + 3 * (i % 6)`` words: lengths spread over several buckets."""
    return f"Passage {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(4 + 3 * (i % 6))) + "."


def examples() -> list[TrainingExample]:
    out = []
    for i in range(9):
        contexts = tuple(passage(3 * i + j) for j in range(1 + i % 3))  # 1-3 chunks
        out.append(
            TrainingExample(contexts, f"Question: what is {i}?\nAnswer:", WORDS[i] + " " + WORDS[i + 1])
        )
    # two more questions about the first context set: they share its adapters
    out.append(TrainingExample(out[0].contexts, "Question: and then?\nAnswer:", "gamma"))
    out.append(TrainingExample(out[1].contexts, "Question: why?\nAnswer:", "because delta"))
    return out


def build(method: str, arch: str):
    torch.manual_seed(0)
    common = {"target_modules": TARGET_MODULES[arch], "chunk_tokens": 24}
    if method == "compas":
        config = CompAsConfig(
            latent_dim=32, num_attention_heads=2, rank=3, decoder_hidden=32, ce_weight=0.3, state_weight=0.5,
            additivity_weight=0.2, reconstruction_weight=0.1, num_blocks=2, **common,
        )  # fmt: skip
        model = CompAsModel.from_base(tiny_model(arch), config, tokenizer=tiny_tokenizer())
        with torch.no_grad():  # off zero, as after training: every parameter gets a gradient
            model.generator.output_scale.normal_(0.0, 0.5)
        return model
    config = DyPRAGConfig(ce_weight=0.3, **common)
    return DyPRAGModel.from_base(tiny_model(arch), config, tokenizer=tiny_tokenizer())


def losses_and_grads(model, batch, reference: bool):
    model.zero_grad()
    losses = model.training_losses(batch, reference=reference)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize(
    ("method", "arch"),
    [("compas", "llama"), ("compas", "gpt2"), ("compas", "qwen2"), ("dyprag", "llama"), ("dyprag", "gpt2")],
)
def test_fast_path_equals_module_by_module(method, arch, monkeypatch):
    model = build(method, arch)
    # buckets of at least 4 rows, so that this small batch is read in several of them
    collate = model._collate_chunks

    def small_buckets(exs, with_answers=True):
        batch, texts = collate(exs, with_answers)
        batch["chunk_buckets"] = length_buckets(batch["chunk_attention_mask"].sum(-1).tolist(), 0.05, 4)
        return batch, texts

    monkeypatch.setattr(model, "_collate_chunks", small_buckets)
    batch = model.collate_training_examples(examples())
    assert len(batch["chunk_buckets"]) >= 2
    assert batch["num_groups"] < batch["answer_ids"].shape[0]  # shared context sets
    fast, fast_grads = losses_and_grads(model, batch, reference=False)
    ref, ref_grads = losses_and_grads(model, batch, reference=True)
    assert set(fast) == set(ref)
    for key in ref:
        torch.testing.assert_close(fast[key], ref[key], rtol=1e-5, atol=1e-7, msg=key)
    assert set(fast_grads) == set(ref_grads) and ref_grads
    for name, g in ref_grads.items():
        rel = (fast_grads[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel < 1e-5, (name, float(rel))


def test_shared_context_sets_give_the_losses_of_separate_batches():
    """Two questions about one context set share its adapters; the KL is what each gets on its own."""
    model = build("compas", "llama")
    model.config.additivity_pairs = 0
    exs = examples()
    pair = [exs[0], exs[9]]  # the same contexts
    together = model.collate_training_examples(pair)
    assert together["num_groups"] == 1 and together["example_group"].tolist() == [0, 0]
    with torch.no_grad():
        joint = model.training_losses(together)["alignment"]
        parts, weights = [], []
        for ex in pair:
            alone = model.collate_training_examples([ex])
            parts.append(model.training_losses(alone)["alignment"])
            weights.append(alone["answer_mask"].sum())
    expected = sum(p * w for p, w in zip(parts, weights, strict=True)) / sum(weights)
    torch.testing.assert_close(joint, expected, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------- the algebra
def layout_and_adapters(n: int = 5, rank: int = 3, seed: int = 0):
    base = tiny_model("llama")
    shapes = target_module_shapes(base, TARGET_MODULES["llama"])
    layout = LayerKindLayout.from_shapes(shapes)
    g = torch.Generator().manual_seed(seed)
    factors = tuple(
        (
            torch.randn(n, len(layout.layers), rank, d_in, generator=g),
            torch.randn(n, len(layout.layers), d_out, rank, generator=g),
        )
        for d_out, d_in in layout.kind_shapes
    )
    return base, layout, StackedAdapter(layout, factors, scale=0.7)


def test_stacked_algebra_equals_the_adapter_algebra():
    _, layout, stacked = layout_and_adapters()
    adapter = stacked.to_adapter()
    assert isinstance(adapter, ContextAdapter) and adapter.batch_size == 5
    torch.testing.assert_close(stacked.dot(stacked), adapter.dot(adapter), rtol=1e-5, atol=1e-6)
    other = stacked.select(torch.tensor([4, 3, 2, 1, 0]))
    torch.testing.assert_close(stacked.dot(other), adapter.dot(other.to_adapter()), rtol=1e-5, atol=1e-6)
    diff = stacked.combine([other], [1.0, -2.0])
    expected = adapter - 2.0 * other.to_adapter()
    torch.testing.assert_close(diff.sq_norm(), expected.dot(expected), rtol=1e-5, atol=1e-4)
    # round trip
    back = StackedAdapter.from_adapter(adapter, layout)
    for (A, B), (A2, B2) in zip(stacked.factors, back.factors, strict=True):
        assert torch.equal(A, A2) and torch.equal(B, B2)


def test_group_sum_equals_sum_chunk_adapters():
    _, _, stacked = layout_and_adapters(n=6)
    group = torch.tensor([0, 0, 1, 2, 2, 2])
    slot = torch.tensor([0, 1, 0, 2, 0, 1])
    summed = stacked.group_sum(group, slot, 3, 3).to_adapter()
    reference = sum_chunk_adapters(stacked.to_adapter(), group, slot, 3)
    for name in reference:
        torch.testing.assert_close(summed[name].A, reference[name].A)
        torch.testing.assert_close(summed[name].B, reference[name].B)
        torch.testing.assert_close(summed.delta_weight(name), reference.delta_weight(name))


@pytest.mark.parametrize("repeat", [1, 2])
def test_attach_stacked_equals_apply_adapter(repeat):
    base, _, stacked = layout_and_adapters(n=3)
    stacked = StackedAdapter(stacked.layout, tuple((0.1 * A, 0.1 * B) for A, B in stacked.factors), 0.7)
    ids = torch.randint(5, 100, (3 * repeat, 7))
    with torch.no_grad(), apply_adapter(base, stacked.to_adapter()):
        expected = base(input_ids=ids).logits
    with torch.no_grad(), attach_stacked_adapter(base, stacked):
        got = base(input_ids=ids).logits
    with torch.no_grad():
        bare = base(input_ids=ids).logits  # detached again: the model is back to itself
    assert torch.equal(got, expected)
    assert not torch.equal(got, bare)
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, bare)


def test_attach_stacked_refuses_another_base():
    _, _, stacked = layout_and_adapters()
    with pytest.raises(Exception, match="another base"):
        attach_stacked_adapter(tiny_model("gpt2"), stacked)


def test_stacked_adapter_checks_shapes():
    _, layout, stacked = layout_and_adapters()
    A, B = stacked.factors[0]
    with pytest.raises(ValueError, match="expected"):
        StackedAdapter(layout, ((A[:, :, :, :-1], B), *stacked.factors[1:]))
    with pytest.raises(ValueError, match="module kinds"):
        StackedAdapter(layout, stacked.factors[:1])


# ------------------------------------------------------------------------------------------- batching
def test_length_buckets_cover_the_rows_with_little_padding():
    lengths = sorted([5, 7, 30, 31, 29, 12, 12, 11, 64, 60, 3] * 6, reverse=True)
    buckets = length_buckets(lengths, max_padding=0.05, min_rows=4)
    assert buckets[0][0] == 0 and buckets[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(buckets, buckets[1:], strict=False))
    slots = sum((e - s) * w for s, e, w in buckets)
    assert 1 - sum(lengths) / slots < 0.06
    assert all(w == lengths[s] for s, _, w in buckets)
    with pytest.raises(ValueError, match="sorted"):
        length_buckets([1, 2])
    # one padded pass over everything pays far more padding
    assert 1 - sum(lengths) / (len(lengths) * lengths[0]) > 0.5


def test_length_grouped_batches_are_seeded_complete_and_keep_groups_together():
    lengths = [(i * 37) % 100 + 1 for i in range(200)]
    groups = [i // 4 if i < 40 else i for i in range(200)]  # ten groups of four, then singles
    sampler = LengthGroupedBatchSampler(lengths, 16, groups=groups, seed=3, megabatch=8)
    batches = sampler.batches(0)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(len(b) <= 16 for b in batches)
    where = {i: k for k, b in enumerate(batches) for i in b}
    split = sum(len({where[i] for i in range(4 * g, 4 * g + 4)}) > 1 for g in range(10))
    assert split <= 2  # a group shares a batch unless it straddles a batch boundary
    assert len(batches) == 13 and sorted(len(b) for b in batches) == [8] + [16] * 12
    assert LengthGroupedBatchSampler(lengths, 16, groups=groups, seed=3, megabatch=8).batches(0) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches and len(sampler) == len(batches)
    unsorted = LengthGroupedBatchSampler(lengths, 16, seed=3, megabatch=1)
    assert sampler.padding_fraction(0) < 0.5 * unsorted.padding_fraction(0)
    first = batches[0]
    assert len(first) * max(lengths[i] for i in first) == max(
        len(b) * max(lengths[i] for i in b) for b in batches
    )


def test_stack_refuses_mixed_batches():
    """``stack`` is the reference path's per-row gather: it takes single adapters only."""
    _, _, stacked = layout_and_adapters(n=2)
    with pytest.raises(ValueError, match="single"):
        stack([stacked.to_adapter()])
