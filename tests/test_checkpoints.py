"""Resuming falls back to the newest complete checkpoint when the latest one is half-written (with a
warning naming it); ``ctx2param train`` refuses a non-empty ``--out`` without ``--resume`` (``--overwrite``
clears it); evaluation plots are written atomically."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import matplotlib.figure
import pytest
import torch

import _methods
from ctx2param.cli import main
from ctx2param.models.compas import CompAsConfig, CompAsModel
from ctx2param.testing_utils import TARGET_MODULES, tiny_model, tiny_tokenizer
from ctx2param.training.checkpoints import checkpoint_problems, latest_complete_checkpoint, prepare_output_dir
from ctx2param.training.data import TrainingExample
from ctx2param.training.trainer import train_method

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"latent_dim": 32, "num_attention_heads": 2, "rank": 4, "decoder_hidden": 32, "chunk_tokens": 24}
EXAMPLES = [
    TrainingExample(
        ("The secret password is Marigold.",), "Question: What is the password?\nAnswer:", "Marigold"
    ),
    TrainingExample(("Paris is the capital of France.",), "Question: What is the capital?\nAnswer:", "Paris"),
]
QUIET = {"disable_tqdm": True, "per_device_train_batch_size": 2, "learning_rate": 1e-3}


def make(seed: int = 0) -> CompAsModel:
    torch.manual_seed(seed)
    config = CompAsConfig(target_modules=TARGET_MODULES["llama"], **SMALL)
    return CompAsModel.from_base(tiny_model("llama"), config, tokenizer=tiny_tokenizer())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 3-step run with a checkpoint after every step (checkpoint-1..3, all complete)."""
    out = tmp_path_factory.mktemp("run")
    train_method(make(), EXAMPLES, out, max_steps=3, save_steps=1, save_total_limit=None, **QUIET)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]
    return out


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


BREAKS = {
    "no trainer state": lambda c: (c / "trainer_state.json").unlink(),
    "truncated trainer state": lambda c: truncate(c / "trainer_state.json"),
    "truncated optimizer": lambda c: truncate(c / "optimizer.pt"),
    "no scheduler": lambda c: (c / "scheduler.pt").unlink(),
    "no rng state": lambda c: (c / "rng_state.pth").unlink(),
    "truncated weights": lambda c: truncate(c / "model.safetensors", 0.9),
    "no config": lambda c: (c / "config.json").unlink(),
    "other step": lambda c: (c / "trainer_state.json").write_text(json.dumps({"global_step": 7})),
}


def test_complete_checkpoints_have_no_problems(run_dir):
    for step in (1, 2, 3):
        assert checkpoint_problems(run_dir / f"checkpoint-{step}") == []
    assert latest_complete_checkpoint(run_dir) == run_dir / "checkpoint-3"
    assert latest_complete_checkpoint(run_dir / "missing") is None


@pytest.mark.parametrize("damage", list(BREAKS))
def test_a_half_written_latest_checkpoint_is_skipped_with_a_warning(run_dir, tmp_path, caplog, damage):
    run = copy_run(run_dir, tmp_path)
    BREAKS[damage](run / "checkpoint-3")
    assert checkpoint_problems(run / "checkpoint-3") != []
    with caplog.at_level(logging.WARNING, logger="ctx2param.training.checkpoints"):
        assert latest_complete_checkpoint(run) == run / "checkpoint-2"
    assert "checkpoint-3" in caplog.text and "incomplete" in caplog.text


def test_resume_true_continues_from_the_newest_complete_checkpoint(run_dir, tmp_path, caplog):
    run = copy_run(run_dir, tmp_path)
    (run / "checkpoint-3" / "trainer_state.json").unlink()  # killed while saving step 3
    with caplog.at_level(logging.WARNING, logger="ctx2param.training.checkpoints"):
        trainer = train_method(
            make(seed=5), EXAMPLES, run, max_steps=4, save_steps=1, save_total_limit=None,
            resume_from_checkpoint=True, **QUIET,
        )  # fmt: skip
    assert "Skipping the incomplete checkpoint" in caplog.text and "checkpoint-3" in caplog.text
    assert trainer.state.global_step == 4
    steps = [h["step"] for h in trainer.state.log_history if "loss" in h]
    assert steps == [1, 2, 3, 4]  # 1-2 from checkpoint-2's state, 3-4 trained again
    assert checkpoint_problems(run / "checkpoint-3") == []  # saved again, complete this time
    assert trainer.metrics["resumed_from"] == str(run / "checkpoint-2")
    for step in (1, 2, 3, 4):
        (run / f"checkpoint-{step}" / "optimizer.pt").unlink()
    # nothing complete to continue: train_method starts afresh (the command line refuses --resume then)
    again = train_method(make(), EXAMPLES, run, max_steps=1, resume_from_checkpoint=True, **QUIET)
    assert again.metrics["resumed_from"] is None and again.state.global_step == 1
    for optimizer in run.glob("checkpoint-*/optimizer.pt"):
        optimizer.unlink()
    with pytest.raises(ValueError, match="No complete checkpoint to resume from"):  # as Trainer.train(True)
        again.train(resume_from_checkpoint=True)


def test_model_only_checkpoints_need_no_optimizer(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (run / "checkpoint-3" / name).unlink()
    assert latest_complete_checkpoint(run) == run / "checkpoint-2"
    assert latest_complete_checkpoint(run, require_optimizer=False) == run / "checkpoint-3"


# ------------------------------------------------------------------------------------------- --out
def test_prepare_output_dir(tmp_path, monkeypatch):
    assert prepare_output_dir(tmp_path / "new" / "run", resume=False, overwrite=False).is_dir()
    assert prepare_output_dir(tmp_path / "new" / "run", resume=False, overwrite=False).is_dir()  # empty: fine
    used = tmp_path / "used"
    (used / "checkpoint-500").mkdir(parents=True)
    (used / "config.json").write_text("{}")
    with pytest.raises(
        FileExistsError, match=r"not empty \(2 entries: checkpoint-500, config.json\).*--resume.*--ov"
    ):
        prepare_output_dir(used, resume=False, overwrite=False)
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        prepare_output_dir(used, resume=True, overwrite=False)
    with pytest.raises(ValueError, match="one of them, not both"):
        prepare_output_dir(used, resume=True, overwrite=True)
    assert prepare_output_dir(used, resume=False, overwrite=True) == used
    assert list(used.iterdir()) == [] and sorted(os.listdir(tmp_path)) == ["new", "used"]  # nothing aside
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        prepare_output_dir(tmp_path / "file", resume=False, overwrite=True)
    (used / "x").write_text("x")
    monkeypatch.chdir(used)
    with pytest.raises(ValueError, match="refusing to clear"):
        prepare_output_dir(used, resume=False, overwrite=True)
    assert (used / "x").exists()


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory):
    return _methods.save_tiny_base(tmp_path_factory.mktemp("tiny-base"))


def test_train_refuses_a_used_out_before_loading_and_overwrite_clears_it(
    tiny_base_dir, run_dir, tmp_path, capsys
):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(ex.to_json()) for ex in EXAMPLES) + "\n")
    out = copy_run(run_dir, tmp_path)
    args = ["train", "compas", "--data", str(data), "--out", str(out), "--steps", "1", "--batch-size", "2"]
    args += [
        "--cpu",
        "--chunk-tokens",
        "24",
        *[f"--set={k}={v}" for k, v in SMALL.items() if k != "chunk_tokens"],
    ]
    # refused before the base loads: the base named does not even exist
    assert main([*args, "--base", str(tmp_path / "no-such-base")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "is not empty" in err and "--overwrite" in err
    assert main([*args, "--base", str(tiny_base_dir), "--overwrite"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # the old run's are gone
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["max_steps"] == 1


# ------------------------------------------------------------------------------------------- plots
def test_evaluation_plots_are_written_atomically(tmp_path, monkeypatch):
    from ctx2param.evaluation.report import write_report
    from ctx2param.evaluation.runner import EvalConfig, EvalModel, run_evaluation

    model = EvalModel(tiny_model("llama"), tiny_tokenizer(), name="tiny")
    config = EvalConfig("arc-easy-k", ks=[0, 1], n=2, systems=["closed"], progress=False)
    results = run_evaluation(model, config)
    files = write_report(results, tmp_path)
    before = files["score_plot"].read_bytes()
    real = matplotlib.figure.Figure.savefig

    def dies_half_way(self, target, *args, **kwargs):
        real(self, target, *args, **kwargs)
        if hasattr(target, "truncate"):  # a buffer: cut it, as a kill mid-write would
            target.truncate(100)
        else:
            truncate(Path(target), 0.1)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        write_report(results, tmp_path)
    assert files["score_plot"].read_bytes() == before  # the old plot, whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
