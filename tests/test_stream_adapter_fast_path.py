"""StreamAdapter's training fast path computes the same numbers as the module-by-module path, without host
syncs.

The fast path (``training_losses(batch)``) keeps the absorbed updates stacked per module kind, reads chunks,
teacher and student rows in length buckets, runs the recurrence as batched folds and gathers the scored
positions by indices made in the collator. Checked here against ``reference=True`` (``ContextAdapter`` per
module, boolean-mask indexing, the host-side step loop) on tiny random models in float32 on the CPU: losses
and every gradient within 1e-5, for batches with several chunks per example, streams of different lengths
and several buckets of every kind."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import ctx2param
from ctx2param.models.stream_adapter import StreamAdapterConfig, StreamAdapterModel
from ctx2param.testing_utils import TARGET_MODULES, tiny_model, tiny_tokenizer
from ctx2param.training.data import TrainingExample
from ctx2param.training.flops import batch_statistics, token_slots

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = (
    "The quick brown fox jumps over the lazy dog. A context adapter turns a passage into a small change of "
    "the weights. The secret password is Marigold. The meeting is on Thursday at ten in the morning."
)


def examples() -> list[TrainingExample]:
    """Streams of 1 to 6 chunks (chunk_tokens=16), queries of different lengths, a continuation example."""
    return [
        TrainingExample((TEXT, "Short one."), "Question: What is the password?\nAnswer:", "Marigold"),
        TrainingExample(
            ("The meeting is on Thursday at ten.",), "Question: When?\nAnswer:", "Thursday at ten"
        ),
        TrainingExample((TEXT,), "", "It rained all day long and the river rose."),
        TrainingExample(
            ("Marie Curie was a physicist.", "She won two Nobel prizes."),
            "Question: Who was a physicist, and what else did she do in her long life?\nAnswer:",
            "Marie Curie",
        ),
        TrainingExample(("In 1905 the river flooded the old town.",), "Q: When?\nA:", "In 1905"),
    ]


def build(arch: str, generated_factor: str = "B", targets=None) -> StreamAdapterModel:
    torch.manual_seed(0)
    config = StreamAdapterConfig(
        target_modules=targets or TARGET_MODULES[arch],
        rank=4,
        state_dim=16,
        chunk_tokens=16,
        generated_factor=generated_factor,
        ce_weight=0.3,
    )
    model = StreamAdapterModel.from_base(tiny_model(arch), config, tokenizer=tiny_tokenizer())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the zero initialisation, as after training: every parameter gets a gradient
        for param in model.method_parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    model.config.bucket_min_rows = 1  # this small batch falls into several buckets of each kind
    return model


def losses_and_grads(model, batch, reference: bool):
    model.zero_grad()
    losses = model.training_losses(batch, reference=reference)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def assert_same(model, batch, tolerance: float = 1e-5) -> None:
    fast, fast_grads = losses_and_grads(model, batch, reference=False)
    ref, ref_grads = losses_and_grads(model, batch, reference=True)
    assert set(fast) == set(ref) == {"loss", "kl", "ce", "teacher_ce", "delta_norm"}
    for key in ref:
        torch.testing.assert_close(fast[key], ref[key], rtol=tolerance, atol=1e-7, msg=key)
    assert set(fast_grads) == set(ref_grads)
    assert set(ref_grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0, name
        rel = (fast_grads[name] - g).norm() / g.norm()
        assert rel < tolerance, (name, float(rel))


@pytest.mark.parametrize(
    ("arch", "generated_factor", "dtype"),
    [
        ("llama", "B", torch.float32),
        ("gpt2", "B", torch.float32),
        ("qwen2", "A", torch.float32),
        # Gemma's fp32 rounding alone moves a few gradients by 1.4e-5 (relative) between the two orders of
        # summation; in float64 both paths agree to 1e-15, so it is checked there, tightly.
        ("gemma", "B", torch.float64),
    ],
)
def test_fast_path_equals_module_by_module(arch, generated_factor, dtype):
    model = build(arch, generated_factor).to(dtype)
    batch = model.collate_training_examples(examples())
    chunks_per_stream = batch["chunk_active"].sum(0)
    assert int(chunks_per_stream.min()) == 1 and int(chunks_per_stream.max()) >= 3  # uneven streams
    assert batch["num_steps"] == int(chunks_per_stream.max())
    for role in ("chunk", "teacher", "student"):
        assert len(batch[f"{role}_buckets"]) >= 2, role
    assert_same(model, batch, 1e-5 if dtype == torch.float32 else 1e-10)


def test_kinds_missing_in_some_layers():
    """A kind adapted in one layer only: zero factors elsewhere, marked absent; same numbers."""
    targets = [
        f"model.layers.{n}" for n in ("0.self_attn.q_proj", "0.self_attn.v_proj", "1.self_attn.v_proj")
    ]
    targets.append("model.layers.1.mlp.down_proj")
    model = build("llama", targets=targets)
    assert len(model.layout.positions) < len(model.layout.layers) * len(model.layout.kinds)
    batch = model.collate_training_examples(examples())
    stacked = model.state_to_stacked(model.batch_states(batch))
    assert stacked.presence is not None and not bool(stacked.presence.all())
    adapter = stacked.to_adapter()
    assert list(adapter) == list(model.config.target_shapes)
    reference = model.state_to_adapter(model.batch_states(batch, reference=True))
    for name in reference:
        torch.testing.assert_close(adapter.delta_weight(name), reference.delta_weight(name))
    assert_same(model, batch)


# ------------------------------------------------------------------------------------------ no host sync
_SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy")
_SRC = str(Path(ctx2param.__file__).resolve().parent)


def test_the_fast_path_never_reads_the_device_back(monkeypatch):
    """No call in ctx2param's code of the step reads a tensor back to the host (``.item()``, ``bool()``,
    ``.tolist()``, ``nonzero``, boolean-mask indexing, ...). The reference path does, which shows the probe
    works. (transformers' own mask creation is outside this check.)"""
    model = build("llama")
    batch = model.collate_training_examples(examples())
    calls: Counter = Counter()

    def probe(name, original):
        def wrapped(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(_SRC):
                calls[(name, Path(caller).name, sys._getframe(1).f_lineno)] += 1
            return original(self, *args, **kwargs)

        return wrapped

    getitem = torch.Tensor.__getitem__

    def indexing(self, index):
        caller = sys._getframe(1).f_code.co_filename
        parts = index if isinstance(index, tuple) else (index,)
        if caller.startswith(_SRC) and any(
            isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts
        ):
            calls[("boolean index", Path(caller).name, sys._getframe(1).f_lineno)] += 1
        return getitem(self, index)

    for name in _SYNCING:
        monkeypatch.setattr(torch.Tensor, name, probe(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.Tensor, "__getitem__", indexing)
    losses = model.training_losses(batch)
    losses["loss"].backward()
    assert not calls, calls
    model.zero_grad()
    model.training_losses(batch, reference=True)["loss"].backward()
    assert calls  # the module-by-module path syncs (boolean masks, the step count)
    monkeypatch.undo()


# ------------------------------------------------------------------------------------------ the batch
def test_batch_layout_lines_up_teacher_and_student():
    model = build("llama")
    exs = examples()
    batch = model.collate_training_examples(exs)
    order = batch["example_index"].tolist()
    assert sorted(order) == list(range(len(exs)))
    lengths = batch["student_mask"].sum(-1).tolist()
    assert lengths == sorted(lengths, reverse=True)  # rows ordered by student length
    answers = batch["answer_targets"]
    assert torch.equal(answers, batch["student_targets"][batch["student_targets"] != -100])
    assert torch.equal(answers, batch["teacher_targets"][batch["teacher_targets"] != -100])
    # the gathered positions are the ones that predict those tokens
    for role in ("teacher", "student"):
        ids, buckets = batch[f"{role}_ids"], batch[f"{role}_buckets"]
        rows = batch.get(f"{role}_order", torch.arange(ids.shape[0]))
        flat = torch.cat([ids[rows[s:e], :w].reshape(-1) for s, e, w in buckets])
        following = torch.cat([torch.roll(ids[rows[s:e], :w], -1, 1).reshape(-1) for s, e, w in buckets])
        assert torch.equal(following[batch[f"{role}_scored"]], answers), role
        assert flat.numel() == sum((e - s) * w for s, e, w in buckets)
    # each row's chunks, in stream order, are those of its example
    for row, original in enumerate(order):
        steps = batch["chunk_active"][:, row].nonzero().flatten().tolist()
        chunks = [batch["chunk_ids"][batch["chunk_index"][s, row]] for s in steps]
        texts = [model.tokenizer.decode(c[c != model.pad_token_id]) for c in chunks]
        joined = model.chunk(("\n\n" if exs[original].query else " ").join(exs[original].contexts))
        assert [t.strip() for t in texts] == joined


def test_flops_and_padding_come_from_plain_counts():
    model = build("llama")
    batch = model.collate_training_examples(examples())
    from_counts = model.training_flops(batch)
    without = {k: v for k, v in batch.items() if k != "token_counts"}
    assert model.training_flops(without) == pytest.approx(from_counts)
    assert from_counts["tokens"] == pytest.approx(
        float(batch["chunk_mask"].sum() + batch["teacher_mask"].sum() + batch["student_mask"].sum())
    )
    real, slots = token_slots(batch)
    assert real == from_counts["tokens"]
    full = sum(float(batch[k].numel()) for k in ("chunk_mask", "teacher_mask", "student_mask"))
    bucketed = sum(
        sum((e - s) * w for s, e, w in batch[f"{r}_buckets"]) for r in ("chunk", "teacher", "student")
    )
    assert slots == bucketed < full  # the passes pay only for their buckets' widths
    stats = batch_statistics(model, batch)
    assert stats["flops"] == pytest.approx(from_counts["total"]) and stats["slots"] == slots


def test_one_padded_pass_per_role_gives_the_same_numbers():
    """``bucket_min_rows`` larger than the batch: one pass per role (fewer launches, more padding)."""
    model = build("llama")
    model.config.bucket_min_rows = 10**6
    batch = model.collate_training_examples(examples())
    assert all(len(batch[f"{r}_buckets"]) == 1 for r in ("chunk", "teacher", "student"))
    assert_same(model, batch)
    for bad in ({"bucket_min_rows": 0}, {"bucket_max_padding": 1.0}):
        with pytest.raises(ValueError, match="bucket_"):
            StreamAdapterConfig(**bad)
