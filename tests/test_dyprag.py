"""DyPRAG (single-vector parameter translator, arXiv 2503.23895) on tiny random models: adapter shapes for
two architectures, adapters change the logits, batching and chunking, save/load, the alignment loss falls
with the shared trainer, only the translator trains, ``ctx2param train dyprag``, the parameter count for
SmolLM2-135M shapes, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import _methods
from ctx2param import AutoModelForContextAdaptation, ContextAdapter, apply_adapter
from ctx2param.errors import ContextError
from ctx2param.models.dyprag import DyPRAGConfig, DyPRAGModel
from ctx2param.testing_utils import TARGET_MODULES, tiny_model, tiny_tokenizer
from ctx2param.training.data import TrainingExample, save_jsonl
from ctx2param.training.trainer import train_method

SMALL = {"translator_hidden": 16, "rank": 2, "chunk_tokens": 24}
FACTS = [
    ("The secret password is Marigold.", "Question: What is the password?\nAnswer:", "Marigold"),
    ("The meeting is on Thursday at ten.", "Question: When is the meeting?\nAnswer:", "Thursday"),
    ("Paris is the capital of France.", "Question: What is the capital of France?\nAnswer:", "Paris"),
]
EXAMPLES = [
    TrainingExample((FACTS[0][0], FACTS[1][0]), FACTS[0][1], FACTS[0][2]),  # two chunks: adapters summed
    *(TrainingExample((fact,), query, answer) for fact, query, answer in FACTS[1:]),
    TrainingExample(
        ("The quick brown fox jumps over the lazy dog. A context adapter turns",), "", "a passage"
    ),
]
LONG = (
    "In 1905 the river flooded the old town. The bridge, the mill and the school were rebuilt two years "
    "later. Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity. "
    "She was the first woman to win a Nobel Prize."
)
# SmolLM2-135M: 30 layers, hidden 576, intermediate 1536, 9 heads / 3 KV heads (ENVIRONMENT.md).
SMOLLM2_SHAPES = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}
SMOLLM2_MAX_PARAMETERS = 2_000_000  # defaults: rank 2, translator_hidden 64


def make(arch: str = "llama", **overrides) -> DyPRAGModel:
    config = DyPRAGConfig(**{"target_modules": TARGET_MODULES[arch], **SMALL, **overrides})
    return DyPRAGModel.from_base(tiny_model(arch), config, tokenizer=tiny_tokenizer())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> DyPRAGModel:
    torch.manual_seed(0)
    return make()


# ------------------------------------------------------------------------------------------ construction
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_shapes_and_targets(arch):
    model = make(arch)
    assert model.config.model_type == "ctx2param_dyprag"
    expected = {n: tuple(s) for n, s in model.config.target_shapes.items()}
    suffixes = tuple(TARGET_MODULES[arch])
    assert expected and all(name.endswith(suffixes) for name in expected)
    adapter = model.generate_adapter("The secret password is Marigold.")
    assert isinstance(adapter, ContextAdapter) and adapter.batch_size is None
    assert adapter.shapes == expected and set(adapter.ranks.values()) == {SMALL["rank"]}
    for name, (d_out, d_in) in expected.items():
        assert adapter[name].A.shape == (SMALL["rank"], d_in) and adapter[name].B.shape == (
            d_out,
            SMALL["rank"],
        )
    assert adapter.metadata["method"] == "dyprag"
    # applied, the update changes the logits (small at initialisation, but not zero)
    ids = model.tokenizer("Question: What is the password?", return_tensors="pt")
    with torch.no_grad():
        plain = model.base_lm(**ids).logits
        with apply_adapter(model.base_lm, adapter):
            adapted = model.base_lm(**ids).logits
        assert torch.equal(model.base_lm(**ids).logits, plain)  # restored exactly
    assert not torch.allclose(plain, adapted)
    modules = dict(model.base_lm.named_modules())
    for name in adapter:
        ratio = adapter.delta_weight(name).norm() / modules[name].weight.norm()
        assert 0 < ratio < 0.25, (name, ratio)


def test_one_pooled_vector_per_passage(model):
    ids, mask = torch.tensor([[5, 6, 7, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]])
    pooled = model.pooled_context(ids, mask)
    assert pooled.shape == (1, model.base_lm.config.hidden_size)
    with torch.no_grad():
        last = model.base_lm(input_ids=ids[:, :3], output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(pooled, last.mean(1), atol=1e-5, rtol=1e-4)


def test_batched_equals_one_at_a_time(model):
    texts = ["The secret password is Marigold.", LONG[:100], "Paris is the capital of France."]
    batched = model.generate_adapter(texts)
    for text, got in zip(texts, batched, strict=True):
        alone = model.generate_adapter(text)
        for name in alone:
            torch.testing.assert_close(got[name].A, alone[name].A, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got[name].B, alone[name].B, atol=1e-5, rtol=1e-4)


def test_long_context_is_chunked_and_pieces_summed(model):
    adapter = model.generate_adapter(LONG)
    info = adapter.metadata["chunking"]
    assert info["num_chunks"] >= 2 and adapter.rank == info["num_chunks"] * SMALL["rank"]
    summed = sum(model.generate_adapter([LONG[s:e] for s, e in info["char_spans"]]))
    for name in adapter:
        torch.testing.assert_close(
            adapter.delta_weight(name), summed.delta_weight(name), atol=1e-5, rtol=1e-4
        )


def test_save_load_identical_adapters(model, tmp_path):
    model.save_pretrained(tmp_path / "gen")
    loaded = AutoModelForContextAdaptation.from_pretrained(
        tmp_path / "gen", base_model=model.base_lm, tokenizer=model.tokenizer
    )
    assert type(loaded) is DyPRAGModel and loaded.config.translator_hidden == SMALL["translator_hidden"]
    a, b = model.generate_adapter(LONG), loaded.generate_adapter(LONG)
    for name in a:
        assert torch.equal(a[name].A, b[name].A) and torch.equal(a[name].B, b[name].B)
    assert a.metadata == b.metadata


# ------------------------------------------------------------------------------------------------ training
def test_only_the_translator_trains():
    model = make()
    batch = model.collate_training_examples(EXAMPLES)
    assert batch["chunk_example"].tolist().count(0) == 2  # two contexts: two chunks, adapters summed
    losses = model.training_losses(batch)
    assert set(losses) == {"loss", "alignment", "ce"}
    losses["loss"].backward()
    own = dict(model.named_parameters())
    assert all(not p.requires_grad and p.grad is None for n, p in own.items() if n.startswith("base_lm."))
    trainable = [n for n, p in own.items() if p.requires_grad]
    assert trainable and all(n.startswith("translator.") for n in trainable)
    for name in trainable:
        assert own[name].grad is not None and own[name].grad.abs().sum() > 0, name


def test_alignment_loss_falls_with_the_trainer(tmp_path):
    torch.manual_seed(0)
    model = make(ce_weight=0.0)
    batch = model.collate_training_examples(EXAMPLES)
    with torch.no_grad():
        before = model.training_losses(batch)["alignment"].item()
    base_before = {k: v.clone() for k, v in model.base_lm.state_dict().items()}
    args = {"max_steps": 8, "per_device_train_batch_size": 4, "learning_rate": 3e-3}
    args |= {"lr_scheduler_type": "constant", "save_steps": 100, "disable_tqdm": True, "seed": 0}
    trainer = train_method(model, EXAMPLES, tmp_path, **args)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 8 and all("alignment" in entry for entry in logs)
    with torch.no_grad():
        after = model.training_losses(batch)["alignment"].item()
    assert after < 0.7 * before, (before, after)
    assert all(torch.equal(v, base_before[k]) for k, v in model.base_lm.state_dict().items())


def test_ctx2param_train_dyprag_command(tmp_path, capsys):
    from ctx2param.cli import main

    base_dir = _methods.save_tiny_base(tmp_path / "base")
    data = save_jsonl(EXAMPLES, tmp_path / "train.jsonl")
    out = tmp_path / "gen"
    argv = ["train", "dyprag", "--base", str(base_dir), "--data", str(data), "--out", str(out)]
    argv += ["--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--rank", "3", "--chunk-tokens", "16"]
    argv += ["--set", "translator_hidden=8", "--cpu", "--logging-steps", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "training dyprag" in capsys.readouterr().out
    loaded = AutoModelForContextAdaptation.from_pretrained(out)
    assert type(loaded) is DyPRAGModel
    assert loaded.config.translator_hidden == 8 and loaded.config.rank == 3
    assert loaded.generate_adapter(FACTS[0][0]).rank == 3


# ------------------------------------------------------------------------------------------------- size
def test_parameter_count_for_smollm2_shapes():
    with torch.device("meta"):  # SmolLM2-135M's shapes without its weights
        base = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPES))
    model = DyPRAGModel.from_base(base, DyPRAGConfig(), tokenizer=tiny_tokenizer())
    assert len(model.config.target_shapes) == 30 * 7
    hidden, rank = model.config.translator_hidden, model.config.rank
    outputs = rank * sum(d_in + d_out for d_out, d_in in model.layout.kind_shapes)  # 2 * 10176
    heads = (hidden + 1) * outputs
    inputs = 7 * ((576 + 1) * hidden + 30 * hidden) + 2 * 576
    parts = model.parameter_breakdown()
    assert parts["heads"] == heads and parts["total"] == heads + inputs
    assert parts["total"] == model.num_method_parameters(trainable_only=True) == 1_595_968
    assert parts["total"] < SMOLLM2_MAX_PARAMETERS


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("contexts", ["", "   \n", ["Paris is the capital of France.", ""], [], [3]])
def test_bad_contexts_raise_clear_errors(model, contexts):
    with pytest.raises(ContextError) as err:
        model.generate_adapter(contexts)
    assert any(word in str(err.value) for word in ("empty", "not a string", "non-empty"))


def test_config_errors():
    with pytest.raises(ValueError, match="translator_hidden"):
        DyPRAGConfig(translator_hidden=0)
    with pytest.raises(ValueError, match="activation"):
        DyPRAGConfig(activation="tanh")
    with pytest.raises(ValueError, match="window of 512"):
        make(chunk_tokens=10**6)
    with pytest.raises(ValueError, match="pooling_layer"):
        make(pooling_layer=99)
