"""CompAs on tiny random models: construction for several architectures, adapters, chunking, decoding,
saving, the losses (each one falls when trained alone; additivity is zero for an additive generator) and
clear errors for bad input."""

from __future__ import annotations

import pytest
import torch

from ctx2param import AutoModelForContextAdaptation, ContextAdapter
from ctx2param.errors import AdapterMismatchError, ContextError
from ctx2param.models.compas import CompAsConfig, CompAsModel, additivity_loss
from ctx2param.testing_utils import TARGET_MODULES, tiny_model, tiny_tokenizer
from ctx2param.training.data import TrainingExample

SMALL = {"latent_dim": 32, "num_attention_heads": 2, "rank": 4, "decoder_hidden": 32, "chunk_tokens": 24}

EXAMPLES = [
    TrainingExample(
        ("The secret password is Marigold.", "The meeting is on Thursday at ten in the morning."),
        "Question: What is the password?\nAnswer:",
        "Marigold",
    ),
    TrainingExample(
        ("Paris is the capital of France.",), "Question: What is the capital of France?\nAnswer:", "Paris"
    ),
    TrainingExample(
        ("The quick brown fox jumps over the lazy dog. A context adapter turns",), "", "a passage"
    ),
]
LONG = (
    "In 1905 the river flooded the old town. The bridge, the mill and the school were rebuilt two years "
    "later. Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity. "
    "She was the first woman to win a Nobel Prize. The meeting is on Thursday at ten in the morning."
)


def make(arch: str = "llama", **overrides) -> CompAsModel:
    config = CompAsConfig(**{"target_modules": TARGET_MODULES[arch], **SMALL, **overrides})
    return CompAsModel.from_base(tiny_model(arch), config, tokenizer=tiny_tokenizer())


def trained_like(model: CompAsModel, std: float = 0.5, seed: int = 0) -> CompAsModel:
    """Move the output scale off zero, as training does (a fresh generator's ΔW is zero for every passage)."""
    with torch.no_grad():
        model.generator.output_scale.copy_(
            torch.randn(model.generator.output_scale.shape, generator=torch.Generator().manual_seed(seed))
            * std
        )
    return model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> CompAsModel:
    torch.manual_seed(0)
    return make()


# ------------------------------------------------------------------------------------------ construction
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2"])
def test_from_base_any_causal_lm(arch):
    model = make(arch)
    n_modules = len(model.config.target_shapes)
    assert model.config.model_type == "ctx2param_compas"
    single = model.generate_adapter("The secret password is Marigold.")
    assert isinstance(single, ContextAdapter) and single.batch_size is None
    assert len(single) == n_modules and single.rank == SMALL["rank"]  # r = m latents
    assert single.shapes == {n: tuple(s) for n, s in model.config.target_shapes.items()}
    pair = model.generate_adapter(["Paris is the capital of France.", "The meeting is on Thursday."])
    assert isinstance(pair, list) and len(pair) == 2
    # ΔW is exactly zero for every passage at initialisation (the output scale starts at zero) ...
    assert all(torch.count_nonzero(single.delta_weight(name)) == 0 for name in single)
    tok = model.tokenizer
    ids = tok("Question: What is the password?", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, model(**ids, adapter=single).logits)
    # ... and small, passage-dependent and nonzero once the scale has moved
    trained_like(model, std=0.05)
    single = model.generate_adapter("The secret password is Marigold.")
    modules = dict(model.base_lm.named_modules())
    for name in single:
        ratio = single.delta_weight(name).norm() / modules[name].weight.norm()
        assert 0 < ratio < 1.0, (name, ratio)  # tiny random weights are small (std 0.02)
    other = model.generate_adapter("Paris is the capital of France.")
    assert single.cosine(other) < 0.999
    with torch.no_grad():
        assert not torch.equal(model(**ids).logits, model(**ids, adapter=single).logits)
    assert isinstance(model.decode_context(single, max_new_tokens=4), str)


ALL_TERMS = {"ce_weight": 0.5, "reconstruction_weight": 0.1, "state_weight": 0.5, "additivity_weight": 0.1}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradients_start_at_the_output_scale_and_then_reach_every_head(arch):
    model = make(arch, **ALL_TERMS)
    batch = model.collate_training_examples(EXAMPLES)
    losses = model.training_losses(batch)
    assert set(losses) == {"loss", "alignment", "ce", "state", "additivity", "reconstruction", "specificity"}
    losses["loss"].backward()
    # ΔW = 0 for every passage at initialisation: of the generator, only the output scale has a gradient
    grads = {n: p.grad for n, p in model.generator.named_parameters()}
    assert grads["output_scale"] is not None and grads["output_scale"].abs().sum() > 0
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n != "output_scale")
    # one step later the gradient reaches every generator parameter, and never the base
    torch.optim.Adam(model.method_parameters(), lr=1e-2).step()
    model.zero_grad()
    model.training_losses(batch)["loss"].backward()
    for name, param in model.named_parameters():
        if name.startswith("base_lm."):
            assert param.grad is None, name
        elif ".lora_A." in name:
            continue  # the decoder's LoRA starts as standard LoRA (B = 0), so A's first gradient is zero
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert len(model.generator.heads) == len(model.layout.kinds)
    assert model.generator.heads[0].shape[0] == len(model.layout.layers)  # one head per layer by default
    shared = make(arch, head_sharing="kind")
    assert shared.generator.heads[0].shape[0] == 1
    assert shared.parameter_breakdown()["generator"] < model.parameter_breakdown()["generator"]


def test_parameter_breakdown_adds_up(model):
    parts = model.parameter_breakdown()
    assert parts["generator"] + parts["decoder"] == parts["total"] == model.num_method_parameters()
    assert model.num_method_parameters(trainable_only=True) == parts["total"]


# --------------------------------------------------------------------------------------------- adapters
def test_padding_does_not_contribute(model):
    short = "The secret password is Marigold."
    alone = model.generate_adapter(short)
    batched = model.generate_adapter([short, LONG[:150]])[0]
    for name in alone:
        torch.testing.assert_close(batched.delta_weight(name), alone.delta_weight(name), atol=1e-5, rtol=1e-4)


def test_long_context_is_chunked_and_pieces_summed(model):
    adapter = model.generate_adapter(LONG)
    info = adapter.metadata["chunking"]
    assert info["num_chunks"] >= 3 and info["chunk_tokens"] == SMALL["chunk_tokens"]
    assert adapter.rank == info["num_chunks"] * SMALL["rank"]
    assert all(n <= SMALL["chunk_tokens"] for n in info["token_counts"])
    spans = info["char_spans"]
    pieces = [LONG[s:e] for s, e in spans]
    # the spans cover the text in order, with only whitespace between them
    assert spans[0][0] == 0 and spans[-1][1] == len(LONG)
    assert all(
        e1 <= s2 and not LONG[e1:s2].strip() for (_, e1), (s2, _) in zip(spans, spans[1:], strict=False)
    )
    summed = sum(model.generate_adapter(pieces))
    for name in adapter:
        torch.testing.assert_close(
            adapter.delta_weight(name), summed.delta_weight(name), atol=1e-5, rtol=1e-4
        )
    # a short text is one chunk; a larger chunk size per call keeps the long one whole
    assert model.generate_adapter("Short text.").metadata["chunking"]["num_chunks"] == 1
    assert model.generate_adapter(LONG, chunk_tokens=200).metadata["chunking"]["num_chunks"] == 1


def test_save_load_generate_identical(model, tmp_path):
    model.save_pretrained(tmp_path / "gen")
    loaded = AutoModelForContextAdaptation.from_pretrained(
        tmp_path / "gen", base_model=model.base_lm, tokenizer=model.tokenizer
    )
    assert isinstance(loaded, CompAsModel)
    a, b = model.generate_adapter(LONG), loaded.generate_adapter(LONG)
    for name in a:
        assert torch.equal(a[name].A, b[name].A) and torch.equal(a[name].B, b[name].B)
    assert a.metadata == b.metadata


# --------------------------------------------------------------------------------------------- decoder
def test_decoder_features_are_linear_and_factorisation_free(model):
    a, b = model.generate_adapter(["The secret password is Marigold.", "Paris is the capital of France."])
    features = model.decoder.features
    torch.testing.assert_close(features(a + b), features(a) + features(b), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(features(2.5 * a), 2.5 * features(a), atol=1e-5, rtol=1e-4)
    refactored = (a + b).compress(2 * SMALL["rank"])  # same ΔW, other factors
    torch.testing.assert_close(features(refactored), features(a + b), atol=1e-4, rtol=1e-3)
    # the training path (straight from the generator's factors) gives the same features
    ids, mask = model.collate_training_examples(EXAMPLES[1:2])["chunk_input_ids"], None
    factors = model.generate_factors(ids, torch.ones_like(ids))
    torch.testing.assert_close(
        model.features_from_factors(factors),
        features(model.factors_to_adapter(factors)),
        atol=1e-5,
        rtol=1e-4,
    )
    del mask


def test_decode_sum_and_batch(model):
    a, b = model.generate_adapter(["The secret password is Marigold.", "Paris is the capital of France."])
    assert isinstance(model.decode_context(a + b, max_new_tokens=3), str)
    from ctx2param import stack

    texts = model.decode_context(stack([a, b]), max_new_tokens=3)
    assert isinstance(texts, list) and len(texts) == 2
    assert texts == [model.decode_context(a, max_new_tokens=3), model.decode_context(b, max_new_tokens=3)]


# ---------------------------------------------------------------------------------------------- batches
def test_prompts_use_the_chat_template(model):
    batch = model.collate_training_examples(EXAMPLES)
    tok = model.tokenizer
    teacher = tok.decode(batch["teacher_input_ids"][0], skip_special_tokens=False)
    student = tok.decode(batch["student_input_ids"][0], skip_special_tokens=False)
    assert "<|im_start|>user" in teacher and "Marigold." in teacher and "Thursday" in teacher
    assert "<|im_start|>user" in student and "Marigold." not in student
    assert teacher.replace("<|pad|>", "").endswith("<|im_start|>assistant\nMarigold<|im_end|>")
    # continuation examples (empty query) are plain text: context, then its continuation
    plain = tok.decode(batch["teacher_input_ids"][2], skip_special_tokens=True)
    assert plain.strip() == "The quick brown fox jumps over the lazy dog. A context adapter turns a passage"
    # the continuation's context is longer than chunk_tokens (24): two chunks, as generate_adapter splits it;
    # the rows are sorted longest first (length buckets), each knowing its example and slot
    rows = sorted(zip(batch["chunk_example"].tolist(), batch["chunk_slot"].tolist(), strict=True))
    assert rows == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1)]
    lengths = batch["chunk_attention_mask"].sum(-1).tolist()
    assert lengths == sorted(lengths, reverse=True)
    assert batch["num_groups"] == 3 and batch["num_slots"] == 2
    assert batch["example_group"].tolist() == [0, 1, 2]
    # left-padded prompts end in the same column: the answer's logits are the last positions
    n, la = batch["answer_ids"].shape
    for role in ("teacher", "student"):
        ids = batch[f"{role}_input_ids"]
        assert torch.equal(
            ids[:, -la:][batch["answer_mask"].bool()], batch["answer_ids"][batch["answer_mask"].bool()]
        )


def test_answer_logits_ignore_left_padding(model):
    batch = model.collate_training_examples(EXAMPLES)
    la = batch["answer_ids"].shape[1]
    batched = model._answer_logits(batch, "teacher", la)
    one = model.collate_training_examples(EXAMPLES[1:2])
    alone = model._answer_logits(one, "teacher", one["answer_ids"].shape[1])
    k = int(one["answer_mask"].sum())
    torch.testing.assert_close(batched[1, :k], alone[0, :k], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize(
    ("term", "lr", "factor"),
    # learning rates and bounds from a small sweep (10 Adam steps, 3 examples, seed 0, output scale moved off
    # zero as after some training): see the values in the assertion message when it fails
    [
        ("alignment", 1e-3, 0.5),
        ("ce", 3e-3, 0.96),
        ("state", 3e-3, 0.9),
        ("additivity", 3e-3, 0.5),
        ("reconstruction", 1e-2, 0.95),
    ],
)
def test_each_loss_falls_when_trained_alone(term, lr, factor):
    torch.manual_seed(0)
    weights = {
        w: 0.0
        for w in (
            "alignment_weight",
            "ce_weight",
            "state_weight",
            "additivity_weight",
            "reconstruction_weight",
        )
    }
    weights[f"{term}_weight"] = 1.0
    model = trained_like(make(**weights))
    batch = model.collate_training_examples(EXAMPLES)
    optimizer = torch.optim.Adam(model.method_parameters(), lr=lr)
    values = []
    for _ in range(10):
        losses = model.training_losses(batch)
        assert set(losses) - {"additivity", "specificity"} == {"loss", term} - {"additivity"}  # + diagnostics
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        values.append(losses[term].item())
    assert max(values[-2:]) < factor * values[0], values


def test_additivity_loss_from_factors():
    torch.manual_seed(0)
    shapes = {"l.0.q": (6, 5), "l.0.v": (3, 5)}
    a = ContextAdapter.random(shapes, rank=2, seed=1)
    b = ContextAdapter.random(shapes, rank=3, seed=2)
    # ΔW(c1 ⊕ c2) equal to ΔW(c1) + ΔW(c2), factored differently (rank 5 core from an SVD): zero
    joint = (a + b).compress(5)
    assert additivity_loss(joint, a, b).item() < 1e-8
    # otherwise the relative squared error of the dense updates
    dense = {n: a.delta_weight(n) for n in a}
    expected = sum((b.delta_weight(n) ** 2).sum() for n in b) / sum(
        (dense[n] ** 2).sum() + (b.delta_weight(n) ** 2).sum() for n in b
    )
    torch.testing.assert_close(additivity_loss(a, a, b), expected.float(), atol=1e-6, rtol=1e-5)
    # scale free: shrinking every update does not change it
    torch.testing.assert_close(
        additivity_loss(0.01 * a, 0.01 * a, 0.01 * b), expected.float(), rtol=1e-3, atol=1e-7
    )


class _AdditiveCompAs(CompAsModel):
    """A generator additive by construction: ΔW(text) = Σ over its content tokens t of b(t) a(t)ᵀ, with a and
    b fixed functions of the token's embedding (the base's hidden states, which depend on context, are not
    read). Concatenating two chunks with whitespace unites their content tokens (the tiny byte-level BPE
    tokenizes ``c1 + "\\n\\n" + c2`` as the tokens of c1, whitespace tokens, then those of c2), so
    ΔW(c1 ⊕ c2) = ΔW(c1) + ΔW(c2) exactly, and the additivity loss must be zero."""

    def generate_factors(self, input_ids, attention_mask):
        tok = self.tokenizer
        special = set(tok.all_special_ids)
        keep = [
            0.0 if i in special or not tok.decode([i]).strip() else 1.0 for i in range(len(tok))
        ]  # content tokens only: whitespace and special tokens add nothing
        content = torch.tensor(keep)[input_ids] * attention_mask
        emb = self.base_lm.get_input_embeddings()(input_ids) * content[..., None]  # [C, T, D]
        out = []
        g = torch.Generator().manual_seed(0)
        for d_out, d_in in self.layout.kind_shapes:
            proj_a = torch.randn(emb.shape[-1], d_in, generator=g)
            proj_b = torch.randn(emb.shape[-1], d_out, generator=g)
            A = (emb @ proj_a)[:, None].expand(-1, len(self.layout.layers), -1, -1)  # [C, L, T, d_in]
            B = (emb @ proj_b).transpose(1, 2)[:, None].expand(-1, len(self.layout.layers), -1, -1)
            out.append((A, B))
        return out


def test_additivity_is_zero_for_an_additive_generator():
    weights = {
        "alignment_weight": 0.0,
        "ce_weight": 0.0,
        "reconstruction_weight": 0.0,
        "additivity_weight": 1.0,
    }
    config = CompAsConfig(target_modules=TARGET_MODULES["llama"], **{**SMALL, **weights})
    additive = _AdditiveCompAs.from_base(tiny_model("llama"), config, tokenizer=tiny_tokenizer())
    batch = additive.collate_training_examples(EXAMPLES)
    assert batch["pair_left"].numel() >= 2
    assert additive.training_losses(batch)["additivity"].item() < 1e-6
    # the real (attention-based) generator is not additive (once its ΔW is not zero)
    real = trained_like(make(**weights))
    assert real.training_losses(real.collate_training_examples(EXAMPLES))["additivity"].item() > 0.05


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "contexts",
    ["", "   \n\t", ["Paris is the capital of France.", ""], [], "<|im_end|><|pad|><|im_start|>", [3]],
)
def test_bad_contexts_raise_clear_errors(model, contexts):
    with pytest.raises(ContextError) as err:
        model.generate_adapter(contexts)
    assert any(word in str(err.value) for word in ("empty", "special", "not a string", "non-empty"))


def test_absurd_chunk_sizes(model):
    with pytest.raises(ValueError, match="chunk_tokens"):
        CompAsConfig(chunk_tokens=0)
    with pytest.raises(ValueError, match="window of 512"):
        make(chunk_tokens=10**9)
    for bad in (0, 10**9, 3.5):
        with pytest.raises(ValueError, match="chunk_tokens"):
            model.generate_adapter("Some text.", chunk_tokens=bad)


def test_decoder_rejects_foreign_adapters(model):
    foreign = ContextAdapter.random(model.base_lm, rank=2, target_modules=("q_proj",))
    with pytest.raises(AdapterMismatchError, match="target"):
        model.decode_context(foreign)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.decode_context(model.generate_adapter("Some text."), max_new_tokens=0)


def test_config_errors():
    with pytest.raises(ValueError, match="divisible"):
        CompAsConfig(latent_dim=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="latent_init_std"):
        CompAsConfig(latent_init_std=0.0)
    with pytest.raises(ValueError, match="head_sharing"):
        CompAsConfig(head_sharing="module")
    with pytest.raises(ValueError, match="state_layer_fraction"):
        CompAsConfig(state_layer_fraction=0.0)
    with pytest.raises(ValueError, match="alignment_weight"):
        CompAsConfig(alignment_weight=-1.0)
    with pytest.raises(ValueError, match="numbered"):
        make(target_modules=["lm_head"])
    zero = make(alignment_weight=0.0, ce_weight=0.0, additivity_weight=0.0, reconstruction_weight=0.0)
    with pytest.raises(ValueError, match="weight is zero"):
        zero.training_losses(zero.collate_training_examples(EXAMPLES))


def test_training_batch_fits_the_window():
    model = make("gpt2", chunk_tokens=200)  # GPT-2 has a hard window (512 positions here)
    contexts = tuple(f"Passage {i}. " + LONG for i in range(4))  # ~70 tokens each with the tiny tokenizer
    contexts = tuple(c * 3 for c in contexts)  # ~200 tokens each: four do not fit next to each other
    batch = model.collate_training_examples(
        [TrainingExample(contexts, "Question: Which passage?\nAnswer:", "two")]
    )
    assert batch["teacher_input_ids"].shape[1] <= 512
    kept = int(batch["chunk_slot"].max()) + 1
    assert 1 <= kept < 4
    teacher = model.tokenizer.decode(batch["teacher_input_ids"][0])
    assert "Passage 0." in teacher and f"Passage {kept}." not in teacher  # it reads exactly the kept chunks
    assert batch["pair_input_ids"].shape[1] <= 512
    assert torch.isfinite(model.training_losses(batch)["loss"])
