"""StreamAdapter with the shared trainer: training logs every loss component, and resuming is exact."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

import _methods
from ctx2param import AutoModelForContextAdaptation
from ctx2param.models.stream_adapter import StreamAdapterConfig, StreamAdapterModel
from ctx2param.testing_utils import TARGET_MODULES, tiny_model, tiny_tokenizer
from ctx2param.training.data import TrainingExample
from ctx2param.training.trainer import train_method

FACTS = [
    ("The secret password is Marigold.", "Question: What is the password?\nAnswer:", "Marigold"),
    ("The meeting is on Thursday at ten.", "Question: When is the meeting?\nAnswer:", "Thursday"),
    ("Marie Curie was a physicist and chemist.", "Question: Who was a physicist?\nAnswer:", "Marie Curie"),
    ("The river flooded the old town in 1905.", "Question: When did the river flood?\nAnswer:", "1905"),
]
ARGS = {
    "max_steps": 4,
    "per_device_train_batch_size": 2,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "constant",
    "save_steps": 2,
    "seed": 0,
    "disable_tqdm": True,
}


def fresh_model() -> StreamAdapterModel:
    torch.manual_seed(0)
    config = StreamAdapterConfig(
        target_modules=TARGET_MODULES["llama"], rank=4, state_dim=16, chunk_tokens=16
    )
    return StreamAdapterModel.from_base(tiny_model("llama"), config, tokenizer=tiny_tokenizer())


def training_examples() -> list[TrainingExample]:
    qa = [TrainingExample((fact,), query, answer) for fact, query, answer in FACTS]
    text = " ".join(fact for fact, _, _ in FACTS)
    return [*qa, TrainingExample((text,), "", "The quick brown fox jumps over the lazy dog.")]


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - transformers callback signature
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    model = fresh_model()
    trainer = train_method(model, training_examples(), out, max_chunks=3, **ARGS)
    return out, model, trainer


def test_trainer_logs_components_and_saves_a_loadable_generator(full_run):
    out, model, trainer = full_run
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    for key in ("kl", "ce", "teacher_ce", "delta_norm"):
        assert all(key in entry for entry in logs), key
    assert all(p.grad is None for p in model.base_lm.parameters())
    loaded = AutoModelForContextAdaptation.from_pretrained(
        out, base_model=tiny_model("llama"), tokenizer=tiny_tokenizer()
    )
    own, back = model.method_state_dict(), loaded.method_state_dict()
    assert all(torch.equal(own[k], back[k]) for k in own)
    assert float(model.generate_adapter(FACTS[0][0]).norm()) > 0  # trained heads: no longer zero


def test_resume_continues_exactly(full_run, tmp_path):
    _, full_model, _ = full_run
    interrupted = fresh_model()
    train_method(interrupted, training_examples(), tmp_path, max_chunks=3, callbacks=[StopAt(2)], **ARGS)
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()
    assert not any(k.startswith("base_lm.") for k in interrupted.method_state_dict())
    resumed = fresh_model()
    train_method(
        resumed, training_examples(), tmp_path, max_chunks=3, resume_from_checkpoint=str(checkpoint), **ARGS
    )
    expected, got = full_model.method_state_dict(), resumed.method_state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    differs = fresh_model().method_state_dict()
    assert any(not torch.allclose(differs[k], expected[k]) for k in expected)  # training did change weights


def test_ctx2param_train_stream_adapter_command(tmp_path, capsys):
    from ctx2param.cli import main
    from ctx2param.training.data import save_jsonl

    base_dir = _methods.save_tiny_base(tmp_path / "base")
    data = save_jsonl(training_examples(), tmp_path / "train.jsonl")
    out = tmp_path / "gen"
    argv = ["train", "stream-adapter", "--base", str(base_dir), "--data", str(data), "--out", str(out)]
    argv += ["--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--rank", "2", "--chunk-tokens", "16"]
    argv += ["--set", "state_dim=8", "--cpu", "--logging-steps", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "training stream-adapter" in capsys.readouterr().out
    loaded = AutoModelForContextAdaptation.from_pretrained(out)
    assert type(loaded) is StreamAdapterModel
    assert loaded.config.state_dim == 8 and loaded.config.rank == 2
    assert loaded.generate_adapter(FACTS[0][0]).rank == 2


def test_ctx2param_train_stream_adapter_on_demonstrations(tmp_path, capsys):
    """``--data demos-sst2``: k (= --max-chunks) SST-2 demonstrations of the training part -> a new input;
    the card data names the source; evaluation sets stay refused."""
    import json

    from ctx2param.cli import main
    from ctx2param.commands.train import load_training_examples
    from ctx2param.evaluation.datasets import heldout_split, load_classification

    examples = load_training_examples(["demos-sst2"], tiny_tokenizer(), max_chunks=3, max_examples=5)
    assert len(examples) == 5 and all(len(ex.contexts) == 3 for ex in examples)
    heldout = {ex.prompt() for ex in heldout_split(load_classification("sst2"), "heldout")}
    assert not any(ex.query in heldout for ex in examples)  # queries come from the training part only
    assert all(ex.answer in ("positive", "negative") for ex in examples), {ex.answer for ex in examples}
    base_dir = _methods.save_tiny_base(tmp_path / "base")
    out = tmp_path / "gen"
    argv = ["train", "stream-adapter", "--base", str(base_dir), "--data", "demos-sst2", "--out", str(out)]
    argv += ["--steps", "2", "--batch-size", "2", "--max-chunks", "2", "--max-examples", "4", "--rank", "2"]
    argv += ["--chunk-tokens", "16", "--set", "state_dim=8", "--cpu"]
    assert main(argv) == 0, capsys.readouterr().err
    card = json.loads((out / "card_data.json").read_text())
    assert [d["name"] for d in card["datasets"]] == ["SST-2 demonstrations"]
    assert card["datasets"][0]["num_examples"] == 4
    assert main(["train", "stream-adapter", "--base", str(base_dir), "--data", "demos-mmlu", "--out",
                 str(tmp_path / "no")]) != 0  # fmt: skip
    assert "neither a file nor one of" in capsys.readouterr().err
