"""hub_scripts/train_compas.py on a tiny model: the recipe is one ``ctx2param train`` call; a run trains,
writes its log, metrics, loss curves and card data (with the data sets its JSONL file records), and a second
call resumes it; for CompAs and for the DyPRAG baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import _methods
from ctx2param.cards import CardData
from ctx2param.training.data import TrainingExample, save_jsonl

SCRIPT = Path(__file__).resolve().parents[1] / "hub_scripts" / "train_compas.py"
SMALL = {
    "compas": ["latent_dim=32", "num_attention_heads=2", "rank=2", "decoder_hidden=32", "chunk_tokens=32"],
    "dyprag": ["translator_hidden=16", "rank=2", "chunk_tokens=32"],
}
pytestmark = pytest.mark.usefixtures("one_torch_thread")
TARGETS = '["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]'


@pytest.fixture(scope="module")
def script():
    yield from _methods.load_script(SCRIPT, "train_compas")


def _mix(folder: Path) -> Path:
    """A small exported mix (a JSONL file and its sources file, as --export-data writes them)."""
    examples = [
        TrainingExample((f"Item {i} is stored in room {i + 3}.",), f"Where is item {i}?", f"room {i + 3}")
        for i in range(6)
    ]
    path = folder / "mix.jsonl"
    save_jsonl(examples, path)
    sources = [{"name": "CoQA", "id": "stanfordnlp/coqa", "license": "mixed", "num_examples": 6}]
    Path(f"{path}.sources.json").write_text(json.dumps(sources))
    return path


@pytest.mark.parametrize("method", ["compas", "dyprag"])
def test_tiny_run_trains_and_resumes(script, tmp_path, method, capsys):
    base = _methods.save_tiny_base(tmp_path / "base")
    out = tmp_path / "run"
    settings = [arg for s in [*SMALL[method], f"target_modules={TARGETS}"] for arg in ("--set", s)]
    common = ["--base", str(base), "--data", str(_mix(tmp_path)), "--out", str(out), "--method", method,
              "--batch-size", "2", "--minutes", "5", "--warmup-steps", "1", "--logging-steps", "1",
              "--workers", "0", *settings]  # fmt: skip
    assert script.command(script.parse_args(common))[:2] == ["train", method]
    assert script.main([*common, "--steps", "2"]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["flops"] > 0 for r in log)
    card = CardData.load(out / "card_data.json")
    # the data sets come from mix.jsonl.sources.json
    assert [(d["name"], d["num_examples"]) for d in card.datasets] == [("CoQA", 6)]
    assert (out / "loss_curves.png").stat().st_size > 1000

    assert script.main([*common, "--resume", "--steps", "3"]) == 0
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["latest"]["global_step"] == 3 and len(metrics["calls"]) == 2
    assert metrics["latest"]["resumed_from"].endswith("checkpoint-2")
    assert metrics["latest"]["tokens_per_s"] > 0 and metrics["latest"]["skipped_nonfinite_steps"] == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    # a resumed run keeps its config: a changed setting is refused
    capsys.readouterr()
    assert script.main([*common, "--resume", "--steps", "4", "--set", "rank=3"]) == 1
    assert "own config" in capsys.readouterr().err
