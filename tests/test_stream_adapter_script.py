"""hub_scripts/train_stream_adapter.py on a tiny model: the recipe is one ``ctx2param train stream-adapter``
call on the demonstration mix (k drawn per example, several draws, continuation passages); a run trains,
writes its log, metrics, loss curves and card data (the data sets with their licences), and a second call
resumes it exactly where the first stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import _methods
from ctx2param.cards import CardData

SCRIPT = Path(__file__).resolve().parents[1] / "hub_scripts" / "train_stream_adapter.py"
SMALL = ["rank=2", "state_dim=8", "chunk_tokens=32", "max_teacher_tokens=480"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def script():
    yield from _methods.load_script(SCRIPT, "train_stream_adapter")


def test_the_recipe_is_one_train_call(script):
    args = script.parse_args(["--base", "B", "--out", "O"])
    argv = script.command(args)
    assert argv[:2] == ["train", "stream-adapter"]
    data = argv[argv.index("--data") + 1 : argv.index("--out")]
    assert data == ["demos-sst2", "demos-boolq", "demos-rte", "passages"]  # CB, COPA, MRPC stay unseen
    assert argv[argv.index("--demo-k") + 1] == "1,2,4,8,16" and argv[argv.index("--demo-draws") + 1] == "6"
    assert argv[argv.index("--max-chunks") + 1] == "1"  # no distractor contexts
    settings = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")
    assert settings["rank"] == "16" and settings["state_dim"] == "64"
    assert "--resume" not in argv
    assert "--resume" in script.command(script.parse_args(["--base", "B", "--out", "O", "--resume"]))
    source = SCRIPT.read_text()
    assert len(source.splitlines()) <= 300
    for absent in ("class ", "Trainer", "PEAK", "lr_factor", "def evaluate", "arrow"):
        assert absent not in source, absent


def test_tiny_run_trains_and_resumes(script, tmp_path, capsys):
    base = _methods.save_tiny_base(tmp_path / "base")
    out = tmp_path / "run"
    settings = [arg for s in SMALL for arg in ("--set", s)]
    common = ["--base", str(base), "--out", str(out), "--tasks", "sst2", "rte", "--max-per-source", "3",
              "--batch-size", "2", "--minutes", "5", "--warmup-steps", "1", "--logging-steps", "1",
              "--workers", "0", *settings]  # fmt: skip
    assert script.main([*common, "--steps", "2"]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["flops"] > 0 for r in log)
    assert all({"loss", "kl", "ce", "teacher_ce", "delta_norm"} <= set(r) for r in log)
    card = CardData.load(out / "card_data.json")
    names = [(d["name"], d["num_examples"]) for d in card.datasets]
    assert names == [("SST-2 demonstrations", 3), ("RTE demonstrations", 3), ("passages", 3)]
    assert all(d.get("license") for d in card.datasets)
    assert (out / "loss_curves.png").stat().st_size > 1000
    first = json.loads((out / "train_metrics.json").read_text())["latest"]
    assert first["padding_fraction"] is not None and 0 <= first["padding_fraction"] < 1

    assert script.main([*common, "--resume", "--steps", "3"]) == 0
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["latest"]["global_step"] == 3 and len(metrics["calls"]) == 2
    assert metrics["latest"]["resumed_from"].endswith("checkpoint-2")
    assert metrics["latest"]["tokens_per_s"] > 0 and metrics["latest"]["skipped_nonfinite_steps"] == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    from ctx2param import AutoModelForContextAdaptation

    loaded = AutoModelForContextAdaptation.from_pretrained(out, base_model=str(base))
    assert loaded.config.rank == 2 and loaded.config.state_dim == 8
    capsys.readouterr()
    assert script.main([*common, "--resume", "--steps", "4", "--set", "rank=3"]) == 1
    assert "own config" in capsys.readouterr().err
