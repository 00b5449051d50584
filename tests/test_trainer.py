"""The shared trainer: only the method trains, checkpoints hold its weights only, resuming continues exactly,
loss components are logged, fine-tuning a released generator (--init-from) leaves the base untouched, and
the ``train`` / ``decode`` commands work end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend
from transformers import TrainerCallback

import _methods
from ctx2param import AutoModelForContextAdaptation, ContextAdapter
from ctx2param.cards import CardData
from ctx2param.cli import main
from ctx2param.hub import CARD_DATA_NAME, folder_card, get_card_data
from ctx2param.models.compas import CompAsConfig, CompAsModel
from ctx2param.testing_utils import TARGET_MODULES, tiny_model, tiny_tokenizer
from ctx2param.training.callbacks import NonFiniteGradientGuard
from ctx2param.training.data import TrainingExample, load_jsonl, save_jsonl
from ctx2param.training.trainer import (
    MAX_CARD_LOSS_ROWS,
    TRAINING_SDPA_BACKENDS,
    ContextAdaptationTrainer,
    TrainingExampleDataset,
    _thin,
    default_training_arguments,
    train_method,
)

SMALL = {
    "latent_dim": 32, "num_attention_heads": 2, "rank": 4, "decoder_hidden": 32, "chunk_tokens": 24,
    "ce_weight": 0.5, "reconstruction_weight": 0.1,  # every loss term, so that each is exercised
}  # fmt: skip
EXAMPLES = [
    TrainingExample(
        ("The secret password is Marigold.",), "Question: What is the password?\nAnswer:", "Marigold"
    ),
    TrainingExample(("Paris is the capital of France.",), "Question: What is the capital?\nAnswer:", "Paris"),
    TrainingExample(
        ("The meeting is on Thursday at ten.",), "Question: When is the meeting?\nAnswer:", "Thursday"
    ),
    TrainingExample(
        ("The quick brown fox jumps over the lazy dog. A context",), "", "adapter turns a passage"
    ),
]
QUIET = {"disable_tqdm": True, "per_device_train_batch_size": 2, "learning_rate": 1e-3}


def make(seed: int = 0, **overrides) -> CompAsModel:
    torch.manual_seed(seed)
    config = CompAsConfig(target_modules=TARGET_MODULES["llama"], **{**SMALL, **overrides})
    return CompAsModel.from_base(tiny_model("llama"), config, tokenizer=tiny_tokenizer())


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


def step_losses(trainer: ContextAdaptationTrainer) -> dict[int, dict]:
    return {h["step"]: h for h in trainer.state.log_history if "loss" in h}


def test_resume_restores_optimizer_step_and_next_loss(tmp_path):
    first = train_method(make(), EXAMPLES, tmp_path, max_steps=4, save_steps=2, max_chunks=2, **QUIET)
    checkpoint = tmp_path / "checkpoint-2"
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {
        p.name for p in checkpoint.iterdir()
    }
    # checkpoints hold the method's weights only
    keys = load_file(str(checkpoint / "model.safetensors")).keys()
    assert keys and not any(k.startswith("base_lm.") for k in keys)
    # a fresh model (other initialisation) resumed from step 2 continues exactly like the first run
    second = train_method(
        make(seed=123), EXAMPLES, tmp_path, max_steps=4, save_steps=2, max_chunks=2,
        resume_from_checkpoint=str(checkpoint), **QUIET,
    )  # fmt: skip
    assert second.state.global_step == 4
    a, b = step_losses(first), step_losses(second)
    assert set(b) == {1, 2, 3, 4}  # steps 1-2 restored from trainer_state.json, 3-4 computed again
    for step in (3, 4):
        for key in ("loss", "alignment", "ce", "additivity", "reconstruction"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-5, abs=1e-7), (step, key)
    # the card's training time goes on from the checkpoint's; its losses cover the whole run
    before = CardData.load(checkpoint / CARD_DATA_NAME)
    after = CardData.load(tmp_path / CARD_DATA_NAME)
    assert after.training_time_s > before.training_time_s > 0
    assert [row["step"] for row in before.losses] == [1, 2]
    assert [row["step"] for row in after.losses] == [1, 2, 3, 4]


def test_only_method_parameters_train_and_components_are_logged(tmp_path):
    model = make()
    base_before = {k: v.clone() for k, v in model.base_lm.state_dict().items()}
    method_before = {k: v.clone() for k, v in model.method_state_dict().items()}
    trainer = train_method(model, EXAMPLES, tmp_path, max_steps=2, **QUIET)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.method_parameters()}
    assert all(torch.equal(v, base_before[k]) for k, v in model.base_lm.state_dict().items())
    assert any(not torch.equal(v, method_before[k]) for k, v in model.method_state_dict().items())
    logs = step_losses(trainer)
    assert {"alignment", "ce", "additivity", "reconstruction"} <= set(logs[1])
    assert trainer.state.total_flos > 0  # the FLOP count of the CompAs step
    # evaluation reports the loss on held-out examples
    trainer.eval_dataset = TrainingExampleDataset(EXAMPLES[:2])
    assert trainer.evaluate()["eval_loss"] > 0
    # the final weights are a loadable generator
    loaded = AutoModelForContextAdaptation.from_pretrained(tmp_path, base_model=tiny_model("llama"))
    for key, value in model.method_state_dict().items():
        assert torch.equal(loaded.method_state_dict()[key], value.cpu())


def test_training_fills_and_writes_card_data(tmp_path):
    model = make(alignment_weight=0.7)
    get_card_data(model).add_dataset("recorded before", num_examples=1)
    data = [{"name": "toy QA", "num_examples": 4, "license": "CC0-1.0"}]
    train_method(
        model, EXAMPLES, tmp_path, max_steps=3, save_steps=2, max_chunks=2, seed=7, datasets=data, **QUIET
    )
    for folder in (tmp_path / "checkpoint-2", tmp_path):
        assert (folder / CARD_DATA_NAME).is_file(), folder
    card = CardData.load(tmp_path / CARD_DATA_NAME)
    assert card == get_card_data(model)
    assert [d["name"] for d in card.datasets] == ["recorded before", "toy QA"]
    hp = card.hyperparameters
    assert hp["learning_rate"] == 1e-3 and hp["steps"] == 3 and hp["seed"] == 7 and hp["max_chunks"] == 2
    assert hp["per_device_batch_size"] == 2 and hp["gradient_accumulation_steps"] == 1
    assert hp["effective_batch_size"] == 2 and hp["precision"] == "fp32" and hp["num_examples"] == 4
    assert hp["alignment_weight"] == 0.7 and {"ce_weight", "reconstruction_weight"} <= set(hp)
    assert [row["step"] for row in card.losses] == [1, 2, 3]
    assert {"loss", "alignment", "reconstruction"} <= set(card.losses[0])
    assert "learning_rate" not in card.losses[0] and "grad_norm" not in card.losses[0]
    assert card.training_time_s > 0 and card.hardware == "CPU"
    assert card.framework_versions["torch"] == torch.__version__ and "transformers" in card.framework_versions
    assert CardData.load(tmp_path / "checkpoint-2" / CARD_DATA_NAME).hyperparameters["steps"] == 2
    # the folder's card (what `ctx2param push` and hub_scripts/publish.py upload) describes the training
    readme = folder_card(tmp_path, repo_id="org/toy")
    assert "No training data has been recorded" not in readme
    assert "| toy QA |" in readme and "| learning_rate | 0.001 |" in readme and "Trained on CPU" in readme
    assert "| step | loss |" in readme
    assert f"Of the training run:\n\n- python {card.framework_versions['python']}" in readme
    card.framework_versions = {"torch": "0.0-trained-elsewhere"}  # the card shows the training's versions
    card.save(tmp_path / CARD_DATA_NAME)
    assert "- torch 0.0-trained-elsewhere" in folder_card(tmp_path, repo_id="org/toy")
    with pytest.raises(TypeError, match="datasets entries"):
        train_method(make(), EXAMPLES, tmp_path / "bad", max_steps=1, datasets=[3], **QUIET)


def test_card_losses_are_thinned():
    rows = [{"step": i, "loss": 1.0} for i in range(1, 1001)]
    kept = _thin(rows, MAX_CARD_LOSS_ROWS)
    assert len(kept) == MAX_CARD_LOSS_ROWS and kept[0] == rows[0] and kept[-1] == rows[-1]
    assert _thin(rows[:5], MAX_CARD_LOSS_ROWS) == rows[:5]


def test_trainer_refuses_a_trainable_base(tmp_path):
    model = make()
    model.base_lm.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="base model require gradients"):
        ContextAdaptationTrainer(model, default_training_arguments(tmp_path), train_dataset=EXAMPLES)


def test_gradient_accumulation_and_epochs(tmp_path):
    trainer = train_method(
        make(), EXAMPLES, tmp_path, num_train_epochs=1, gradient_accumulation_steps=2,
        per_device_train_batch_size=1, disable_tqdm=True,
    )  # fmt: skip
    assert trainer.state.global_step == 2  # 4 examples, 1 per micro-batch, 2 micro-batches per step
    assert {"alignment", "reconstruction"} <= set(step_losses(trainer)[1])


def test_dataset_adds_distractors_deterministically():
    dataset = TrainingExampleDataset(EXAMPLES, max_chunks=3, seed=5)
    counts = []
    for i in range(len(dataset)):
        item = dataset[i]
        assert item == dataset[i]  # the same on every access (resuming sees the same data)
        assert set(EXAMPLES[i].contexts) <= set(item.contexts)
        assert (item.query, item.answer) == (EXAMPLES[i].query, EXAMPLES[i].answer)
        counts.append(len(item.contexts))
        assert 1 <= len(item.contexts) <= 3
    assert dataset[3] == EXAMPLES[3]  # continuation examples get no distractors
    assert len(TrainingExampleDataset(EXAMPLES, max_chunks=3, seed=1)[0].contexts) >= 1
    with pytest.raises(ValueError, match="max_chunks"):
        TrainingExampleDataset(EXAMPLES, max_chunks=0)
    with pytest.raises(TypeError, match="TrainingExample"):
        TrainingExampleDataset(["just text"])
    with pytest.raises(ValueError, match="No training examples"):
        TrainingExampleDataset([])


def test_fine_tune_released_generator_on_user_jsonl(tmp_path):
    released = make()
    with torch.no_grad():  # a trained generator: its output scale has left zero (a fresh one starts there)
        released.generator.output_scale.normal_(0.0, 0.5)
    released.save_pretrained(tmp_path / "released")
    data = tmp_path / "mine.jsonl"
    save_jsonl(EXAMPLES[:3], data)
    model = AutoModelForContextAdaptation.from_pretrained(
        tmp_path / "released", base_model=tiny_model("llama"), tokenizer=tiny_tokenizer()
    )
    base_before = {k: v.clone() for k, v in model.base_lm.state_dict().items()}
    # gradients reach the generator (non-zero) and never the base
    model.training_losses(model.collate_training_examples(load_jsonl(data)))["loss"].backward()
    generator_grads = [p.grad for p in model.generator.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in generator_grads)
    assert all(p.grad is None for p in model.base_lm.parameters())
    model.zero_grad()
    train_method(model, load_jsonl(data), tmp_path / "tuned", max_steps=2, **QUIET)
    for key, value in model.base_lm.state_dict().items():
        assert torch.equal(value, base_before[key]), key
    tuned = load_file(str(tmp_path / "tuned" / "model.safetensors"))
    start = load_file(str(tmp_path / "released" / "model.safetensors"))
    assert set(tuned) == set(start) and any(not torch.equal(tuned[k], start[k]) for k in tuned)


# --------------------------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory):
    return _methods.save_tiny_base(tmp_path_factory.mktemp("tiny-base"))


def test_cli_train_init_from_and_decode(tiny_base_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    lines = [json.dumps(ex.to_json()) for ex in EXAMPLES[:3]]
    lines.append(json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 4}))
    data.write_text("\n".join(lines) + "\n")
    settings = [f"--set={k}={v}" for k, v in SMALL.items() if k != "chunk_tokens"]
    common = ["--data", str(data), "--steps", "2", "--batch-size", "2", "--context-tokens", "12"]
    common += ["--target-tokens", "6", "--logging-steps", "1", "--cpu"]
    status = main(["train", "compas", "--base", str(tiny_base_dir), "--out", str(tmp_path / "gen"), *common,
                   "--chunk-tokens", "24", *settings])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0 and "on 4 examples" in out and "done: 2 steps" in out
    assert (tmp_path / "gen" / "config.json").is_file()
    # the card data names the JSONL file it was trained on, with its example count
    card = CardData.load(tmp_path / "gen" / CARD_DATA_NAME)
    assert card.datasets == [{"name": "data.jsonl", "num_examples": 4, "description": "JSONL file"}]
    assert card.hyperparameters["steps"] == 2 and card.hyperparameters["per_device_batch_size"] == 2
    readme = folder_card(tmp_path / "gen")
    assert "| data.jsonl: JSONL file |" in readme and "No training data has been recorded" not in readme
    # fine-tune it (the base comes from its config)
    status = main(
        ["train", "compas", "--init-from", str(tmp_path / "gen"), "--out", str(tmp_path / "tuned"), *common]
    )
    assert status == 0 and "done: 2 steps" in capsys.readouterr().out
    # decode an adapter it makes
    model = AutoModelForContextAdaptation.from_pretrained(tmp_path / "tuned")
    model.generate_adapter("The secret password is Marigold.").save_pretrained(tmp_path / "adapter")
    status = main(
        ["decode", str(tmp_path / "adapter"), "--model", str(tmp_path / "tuned"), "--max-new-tokens", "5"]
    )
    assert status == 0
    assert capsys.readouterr().out.strip() == model.decode_context(
        ContextAdapter.from_pretrained(tmp_path / "adapter"), max_new_tokens=5
    )


def test_cli_train_errors(tiny_base_dir, tmp_path, capsys):
    base = ["train", "compas", "--base", str(tiny_base_dir), "--out", str(tmp_path / "o")]
    assert main([*base, "--data", "squad"]) == 1
    assert "evaluation data" in capsys.readouterr().err
    assert main(["train", "nomethod", "--base", "x", "--data", "coqa", "--out", str(tmp_path)]) == 1
    assert "Unknown method 'nomethod'" in capsys.readouterr().err
    assert main([*base, "--data", "coqa", "--batch-size", "0"]) == 1
    assert "--batch-size" in capsys.readouterr().err
    assert main([*base, "--data", "coqa", "--set", "latent_dim"]) == 1
    assert "FIELD=VALUE" in capsys.readouterr().err
    assert main(["train", "compas", "--data", "coqa", "--out", str(tmp_path)]) == 1
    assert "--base" in capsys.readouterr().err


def test_train_command_records_the_built_in_sources():
    from ctx2param.commands.train import load_training_examples

    datasets: list[dict] = []
    load_training_examples(["coqa", "boolq"], tiny_tokenizer(), max_examples=2, datasets=datasets)
    coqa, boolq = datasets
    assert (coqa["name"], coqa["id"], coqa["num_examples"]) == ("CoQA", "stanfordnlp/coqa", 2)
    assert "CC BY-SA 4.0" in coqa["license"] and "MSR-LA" in coqa["license"]
    assert (boolq["name"], boolq["id"], boolq["license"]) == ("BoolQ", "google/boolq", "CC BY-SA 3.0")


class _PoisonGradients(TrainerCallback):
    """Puts a NaN into one gradient before the optimizer steps given (1-based); snapshots weights per step."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.weights = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 in self.steps:
            next(p for p in model.method_parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {k: v.clone() for k, v in model.method_state_dict().items()}


def test_a_step_with_nan_gradients_is_skipped_and_the_weights_stay_finite(tmp_path):
    model = make()
    poison = _PoisonGradients(steps=[2])
    trainer = train_method(model, EXAMPLES, tmp_path, max_steps=3, callbacks=[poison], **QUIET)
    assert trainer.gradient_guard.skipped_steps == 1
    before, at_2, at_3 = poison.weights[1], poison.weights[2], poison.weights[3]
    assert all(torch.equal(at_2[k], before[k]) for k in before)  # step 2 changed nothing
    assert any(not torch.equal(at_3[k], at_2[k]) for k in at_2)  # step 3 trained again
    assert all(torch.isfinite(v).all() for v in model.method_state_dict().values())
    assert step_losses(trainer)[3]["skipped_nonfinite_steps"] == 1


def test_training_stops_after_consecutive_nan_steps(tmp_path):
    model = make()
    initial = {k: v.clone() for k, v in model.method_state_dict().items()}
    trainer = train_method(
        model, EXAMPLES, tmp_path, max_steps=6, callbacks=[_PoisonGradients(range(1, 7)),
        NonFiniteGradientGuard(max_consecutive=2)], **QUIET,
    )  # fmt: skip
    assert trainer.state.global_step == 2 and trainer.gradient_guard.skipped_steps == 2
    assert all(torch.equal(v, initial[k]) for k, v in model.method_state_dict().items())
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGradientGuard(max_consecutive=-1)


def test_the_loss_is_computed_without_cudnn_attention(tmp_path, monkeypatch):
    """cuDNN attention's backward gives NaN for some padded batches on H100 / H200 (pytorch#196678): the
    trainer switches it off while ``training_losses`` runs, and restores the global setting afterwards."""
    model = make()
    seen = []
    losses = model.training_losses

    def recording(batch):
        seen.append(
            (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())
        )
        return losses(batch)

    monkeypatch.setattr(model, "training_losses", recording)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    train_method(model, EXAMPLES, tmp_path, max_steps=2, **QUIET)
    assert seen and all(flags == (False, True) for flags in seen)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    assert SDPBackend.CUDNN_ATTENTION not in TRAINING_SDPA_BACKENDS
    assert {SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH} <= set(
        TRAINING_SDPA_BACKENDS
    )
