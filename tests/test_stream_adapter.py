"""StreamAdapter: construction on four architectures, streaming, flat state, losses, save/load, errors."""

from __future__ import annotations

import math

import pytest
import torch

from ctx2param import AutoModelForContextAdaptation, ContextAdapter, apply_adapter
from ctx2param.errors import ContextError
from ctx2param.models.stream_adapter import AdapterStream, StreamAdapterConfig, StreamAdapterModel
from ctx2param.testing_utils import TARGET_MODULES, tiny_model, tiny_tokenizer

ARCHS = ("llama", "qwen2", "gemma", "gpt2")

TEXT = (
    "The quick brown fox jumps over the lazy dog. A context adapter turns a passage into a small change of "
    "the weights. The secret password is Marigold. The meeting is on Thursday at ten in the morning. In 1905 "
    "the river flooded the old town; the bridge, the mill and the school were rebuilt two years later."
)
FACTS = [
    ("The secret password is Marigold.", "Question: What is the password?\nAnswer:", "Marigold"),
    ("The meeting is on Thursday at ten.", "Question: When is the meeting?\nAnswer:", "Thursday"),
    ("Marie Curie was a physicist and chemist.", "Question: Who was a physicist?\nAnswer:", "Marie Curie"),
    ("The river flooded the old town in 1905.", "Question: When did the river flood?\nAnswer:", "1905"),
]


def make_model(arch: str = "llama", **overrides) -> StreamAdapterModel:
    settings = {"rank": 4, "state_dim": 16, "chunk_tokens": 16}
    settings.update(overrides)
    config = StreamAdapterConfig(target_modules=TARGET_MODULES[arch], **settings)
    return StreamAdapterModel.from_base(tiny_model(arch), config, tokenizer=tiny_tokenizer())


def randomize_heads(model: StreamAdapterModel, seed: int = 1) -> StreamAdapterModel:
    """Give the zero-initialised absorption heads random weights, so adapters depend on the context."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in model.heads.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.1)
        for factor in model.factors.values():
            if not factor.abs().sum():
                factor.copy_(torch.randn(factor.shape, generator=gen) * 0.1)
    return model


def adapters_equal(a: ContextAdapter, b: ContextAdapter) -> bool:
    return list(a) == list(b) and all(
        torch.equal(a[n].A, b[n].A) and torch.equal(a[n].B, b[n].B) and a[n].scale == b[n].scale for n in a
    )


def examples():
    return [
        {"contexts": [fact, "The quick brown fox jumps over the lazy dog."], "query": q, "answer": a}
        for fact, q, a in FACTS
    ]


# ------------------------------------------------------------------------------------------ construction
@pytest.mark.parametrize("arch", ARCHS)
def test_from_base_builds_rank_m_adapters_for_every_target(arch):
    model = randomize_heads(make_model(arch))
    assert model.config.model_type == "ctx2param_stream_adapter"
    assert model.adapted_layers == [0, 1]
    adapter = model.generate_adapter(TEXT)
    assert isinstance(adapter, ContextAdapter)
    assert adapter.shapes == {n: tuple(s) for n, s in model.config.target_shapes.items()}
    assert adapter.rank == 4 and adapter.batch_size is None
    assert adapter.metadata["method"] == "stream_adapter" and adapter.metadata["chunks"] >= 2
    assert float(adapter.norm()) > 0
    base_params = sum(p.numel() for p in model.base_lm.parameters())
    assert 0 < model.num_method_parameters() < base_params
    assert not any(p.requires_grad for p in model.base_lm.parameters())
    # the adapter changes the base model's output, and applying it leaves the base unchanged afterwards
    ids = model.tokenizer("Question: What is the password?", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = model.base_lm(ids).logits
        with model.adapted(adapter):
            adapted = model.base_lm(ids).logits
        again = model.base_lm(ids).logits
    assert not torch.allclose(plain, adapted)
    assert torch.equal(plain, again)


@pytest.mark.parametrize("arch", ARCHS)
def test_answer_logits_match_the_full_forward(arch):
    """Training computes the head only at answer positions; that must equal the causal LM's own logits."""
    model = make_model(arch)
    batch = model.collate_training_examples(examples()[:2])
    ids, mask, targets = batch["teacher_ids"], batch["teacher_mask"], batch["teacher_targets"]
    with torch.no_grad():
        selected = model._answer_logits(ids, mask, targets)
        full = model.base_lm(input_ids=ids, attention_mask=mask).logits[targets != -100]
    torch.testing.assert_close(selected, full.float(), rtol=1e-5, atol=1e-5)


def test_registered_with_auto_classes():
    from transformers import AutoConfig

    config = StreamAdapterConfig(target_modules=TARGET_MODULES["llama"], rank=2, state_dim=8)
    model = AutoModelForContextAdaptation.from_base(tiny_model("llama"), config, tokenizer=tiny_tokenizer())
    assert type(model) is StreamAdapterModel
    assert type(AutoConfig.for_model("ctx2param_stream_adapter")) is StreamAdapterConfig


def test_generated_factor_a_variant():
    model = make_model(generated_factor="A")
    randomize_heads(model)
    adapter = model.generate_adapter(TEXT)
    name = next(iter(adapter))
    # A comes from the state (differs between contexts), B is the same learned matrix for every context
    other = model.generate_adapter("The secret password is Marigold.")
    assert torch.equal(adapter[name].B, other[name].B)
    assert not torch.equal(adapter[name].A, other[name].A)


def test_parameter_count_stays_small_for_smollm2_sized_bases():
    """Shapes of SmolLM2-135M (30 layers, hidden 576, 9 heads / 3 KV heads, MLP 1536), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
    )
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    model = StreamAdapterModel(StreamAdapterConfig(rank=16, state_dim=64), base)
    count = model.num_method_parameters()
    assert 1_000_000 < count < 5_000_000, count


# --------------------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_adapter_equals_manual_stream_exactly(arch):
    model = randomize_heads(make_model(arch))
    chunks = model.chunk(TEXT)
    assert len(chunks) >= 3
    stream = model.stream()
    for chunk in chunks:
        stream.update(chunk)
    assert stream.num_chunks == len(chunks)
    assert adapters_equal(stream.adapter(), model.generate_adapter(TEXT))
    # a list of chunks is the same as one update per chunk
    assert adapters_equal(model.stream().update(chunks).adapter(), stream.adapter())


def test_order_matters_and_state_moves():
    model = randomize_heads(make_model())
    chunks = model.chunk(TEXT)
    forward = model.stream().update(chunks)
    backward = model.stream().update(chunks[::-1])
    assert not torch.allclose(forward.state, backward.state)
    one = model.stream().update(chunks[:1])
    assert not torch.allclose(one.state, forward.state)


def test_batched_stream_matches_single_streams():
    model = randomize_heads(make_model())
    texts = [TEXT, "The secret password is Marigold. The meeting is on Thursday."]
    batched = model.generate_adapter(texts)
    assert len(batched) == 2
    for text, adapter in zip(texts, batched, strict=True):
        single = model.generate_adapter(text)
        assert adapter.metadata["chunks"] == single.metadata["chunks"] == len(model.chunk(text))
        for name in single:
            torch.testing.assert_close(adapter[name].A, single[name].A, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(adapter[name].B, single[name].B, rtol=1e-5, atol=1e-6)
    stream = model.stream(batch_size=2)
    stream.update(["The secret password is Marigold.", None])
    assert stream.num_chunks == [1, 0]
    with pytest.raises(ContextError, match=r"Streams \[1\]"):
        stream.adapter()
    stream.update([None, "The meeting is on Thursday."])
    assert stream.adapter().batch_size == 2


def test_state_size_does_not_depend_on_the_number_of_chunks():
    model = make_model()
    chunk = "The secret password is Marigold."

    def held_bytes(stream: AdapterStream) -> int:
        return sum(
            v.numel() * v.element_size() for v in vars(stream).values() if isinstance(v, torch.Tensor)
        ) + 8 * len(stream._counts)

    sizes = {}
    for count in (1, 10):
        stream = model.stream()
        for _ in range(count):
            stream.update(chunk)
        sizes[count] = (tuple(stream.state.shape), stream.state_nbytes, held_bytes(stream))
        assert stream.num_chunks == count
        assert not stream.state.requires_grad
    assert sizes[1] == sizes[10]
    expected = len(model.adapted_layers) * model.config.rank * model.config.state_dim
    assert sizes[1][0] == (len(model.adapted_layers), model.config.rank, model.config.state_dim)
    assert sizes[1][1] == expected * 4


def test_stream_reset_and_repr():
    model = make_model()
    stream = model.stream().update("The secret password is Marigold.")
    assert "chunks=1" in repr(stream)
    stream.reset()
    assert stream.num_chunks == 0
    with pytest.raises(ContextError, match="absorbed no context"):
        stream.adapter()


# ----------------------------------------------------------------------------------------------- errors
def test_bad_input_errors():
    model = make_model()
    stream = model.stream()
    with pytest.raises(ContextError, match="absorbed no context yet"):
        stream.adapter()
    with pytest.raises(ContextError, match="empty or only whitespace"):
        stream.update("")
    with pytest.raises(ContextError, match="empty or only whitespace"):
        stream.update("   \n\t ")
    with pytest.raises(ContextError, match="only of special tokens"):
        stream.update("<|im_end|><|im_start|><|im_end|>")
    with pytest.raises(ContextError, match="more than chunk_tokens=16"):
        stream.update(TEXT)
    with pytest.raises(ContextError, match="non-empty list"):
        stream.update([])
    with pytest.raises(ContextError, match="not a string"):
        stream.update([123])  # type: ignore[list-item]
    assert stream.num_chunks == 0  # nothing half-absorbed
    with pytest.raises(ContextError):
        model.generate_adapter("   ")
    with pytest.raises(ContextError):
        model.generate_adapter([])
    batched = model.stream(batch_size=2)
    with pytest.raises(ContextError, match="list of 2 chunks"):
        batched.update(["only one"])
    with pytest.raises(ContextError, match="only None"):
        batched.update([None, None])
    with pytest.raises(ValueError, match="batch_size"):
        model.stream(batch_size=0)


def test_absurd_chunk_sizes_are_refused():
    with pytest.raises(ValueError, match="chunk_tokens"):
        StreamAdapterConfig(chunk_tokens=0)
    with pytest.raises(ValueError, match="does not fit the base model's window of 512"):
        make_model(chunk_tokens=1_000_000)
    with pytest.raises(ValueError, match="generated_factor"):
        StreamAdapterConfig(generated_factor="C")
    with pytest.raises(ValueError, match="state_dim"):
        StreamAdapterConfig(state_dim=0)


def test_no_tokenizer_is_a_clear_error_but_ids_work():
    config = StreamAdapterConfig(target_modules=TARGET_MODULES["llama"], rank=2, state_dim=8, chunk_tokens=16)
    model = StreamAdapterModel.from_base(tiny_model("llama"), config)
    model.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        model.generate_adapter("The secret password is Marigold.")
    adapter = model.stream().update_ids(torch.tensor([[5, 6, 7, 8]])).adapter()
    assert adapter.rank == 2


# --------------------------------------------------------------------------------------------- training
def test_collate_aligns_teacher_and_student_answer_tokens():
    model = make_model()
    batch = model.collate_training_examples(examples())
    for key in ("student", "teacher"):
        assert batch[f"{key}_ids"].shape == batch[f"{key}_targets"].shape
    for row in range(len(FACTS)):
        s = batch["student_targets"][row][batch["student_targets"][row] != -100]
        t = batch["teacher_targets"][row][batch["teacher_targets"][row] != -100]
        assert torch.equal(s, t) and len(s) >= 1
    # every example's chunks are numbered 0..n-1 (the rows are ordered by length, not by step)
    for row in range(len(FACTS)):
        steps = batch["chunk_step"][batch["chunk_owner"] == row]
        assert torch.equal(steps.sort().values, torch.arange(len(steps)))
    # continuation examples (empty query) predict the answer after the context
    cont = model.collate_training_examples(
        [{"contexts": [TEXT], "query": "", "answer": "It rained all day."}]
    )
    s = cont["student_targets"][0][cont["student_targets"][0] != -100]
    t = cont["teacher_targets"][0][cont["teacher_targets"][0] != -100]
    assert torch.equal(s, t) and len(s) >= 2
    with pytest.raises(ContextError, match="empty answer"):
        model.collate_training_examples([{"contexts": ["x y z"], "query": "q", "answer": " "}])
    with pytest.raises(ContextError, match="no contexts"):
        model.collate_training_examples([{"contexts": [], "query": "q", "answer": "a"}])


def test_collate_drops_leading_context_to_fit():
    model = make_model(max_context_chunks=2)
    batch = model.collate_training_examples(
        [{"contexts": [TEXT, TEXT, "Short fact."], "query": "Q:", "answer": "A"}]
    )
    assert int(batch["chunk_step"].max()) + 1 <= 2


@pytest.mark.parametrize("generated_factor", ["B", "A"])
def test_losses_fall_on_a_small_fixed_set(generated_factor):
    torch.manual_seed(0)
    model = make_model(generated_factor=generated_factor, chunk_tokens=24)
    batch = model.collate_training_examples(examples())
    optimizer = torch.optim.Adam(model.method_parameters(), lr=3e-3)
    history = []
    for _ in range(10):
        losses = model.training_losses(batch)
        assert set(losses) >= {"loss", "kl", "ce", "teacher_ce", "delta_norm"}
        assert all(math.isfinite(float(v.detach())) for v in losses.values())
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append(float(losses["loss"].detach()))
    assert not any(p.grad is not None for p in model.base_lm.parameters())
    assert min(history[-3:]) < history[0] - 0.15, history


def test_training_reaches_every_method_parameter():
    model = make_model(generated_factor="B")
    randomize_heads(model)
    losses = model.training_losses(model.collate_training_examples(examples()))
    losses["loss"].backward()
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without_grad == []
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.abs().sum()]
    assert zero == []


# ----------------------------------------------------------------------------------------- save and load
def test_save_load_roundtrip_is_identical(tmp_path):
    model = randomize_heads(make_model())
    folder = model.save_pretrained(tmp_path / "gen")
    assert (folder / "config.json").is_file()
    loaded = AutoModelForContextAdaptation.from_pretrained(
        folder, base_model=tiny_model("llama"), tokenizer=tiny_tokenizer()
    )
    assert type(loaded) is StreamAdapterModel
    assert loaded.config.to_dict() == model.config.to_dict()
    own, back = model.method_state_dict(), loaded.method_state_dict()
    assert own.keys() == back.keys() and all(torch.equal(own[k], back[k]) for k in own)
    assert adapters_equal(model.generate_adapter(TEXT), loaded.generate_adapter(TEXT))


def test_adapter_exports_as_peft_and_applies(tmp_path):
    model = randomize_heads(make_model())
    adapter = model.generate_adapter(TEXT)
    adapter.save_pretrained(tmp_path / "peft", format="peft")
    back = ContextAdapter.from_pretrained(tmp_path / "peft")
    for name in adapter:
        torch.testing.assert_close(back.delta_weight(name), adapter.delta_weight(name))
    ids = model.tokenizer("What is the password?", return_tensors="pt").input_ids
    with torch.no_grad(), apply_adapter(model.base_lm, back):
        via_file = model.base_lm(ids).logits
    with torch.no_grad(), model.adapted(adapter):
        direct = model.base_lm(ids).logits
    torch.testing.assert_close(via_file, direct, rtol=1e-5, atol=1e-5)


def test_training_states_equal_the_inference_stream():
    """The batched, differentiable fold used in training (``batch_states``) gives each example the state the
    inference stream reaches on the same chunks (the contexts joined as the teacher reads them)."""
    model = make_model().eval()
    batch = model.collate_training_examples(examples())
    with torch.no_grad():
        states = model.batch_states(batch)
        torch.testing.assert_close(states, model.batch_states(batch, reference=True), rtol=1e-6, atol=1e-6)
        for row, original in enumerate(batch["example_index"].tolist()):  # rows are ordered by length
            stream = model.stream()
            for chunk in model.chunk("\n\n".join(examples()[original]["contexts"])):
                stream.update(chunk)
            torch.testing.assert_close(states[row], stream.state, rtol=1e-5, atol=1e-5)
    assert states.abs().sum() > 0
