#!/usr/bin/env python
"""Print the short table that ends a GPU lease: training throughput, the first quality readings, baselines.

    python hub_scripts/gpu/summary.py RESULTS_DIR

Reads what ``train.sh`` / ``evaluate.sh`` gathered in RESULTS_DIR (``<run>/train_metrics.json``,
``<run>/squad_eval/results.json``, ``<run>/heldout_eval.json``, ``baseline_*/results.json``); missing files
are reported as missing, never guessed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def training_rows(root: Path) -> list[str]:
    rows = ["run             steps    tok/s      MFU  peak GiB  seconds"]
    for name in ("compas", "dyprag", "stream_adapter"):
        metrics = _read(root / name / "train_metrics.json")
        if metrics is None:
            rows.append(f"{name:15s} (no train_metrics.json)")
            continue
        if "latest" in metrics:  # hub_scripts/train_compas.py
            m = metrics["latest"]
            step, tps, mfu, mem, sec = (
                m["global_step"],
                m["tokens_per_s"],
                m["mfu"],
                m["peak_memory_gib"],
                m["train_seconds"],
            )
        else:  # hub_scripts/train_stream_adapter.py
            t = metrics["total"]
            step, tps, mfu, mem, sec = (
                metrics["global_step"],
                t["tokens_per_s"],
                t["mfu"],
                t["peak_gpu_memory_gib"],
                t["step_seconds"],
            )
        mfu_text = "n/a" if mfu is None else f"{100 * mfu:.2f}%"
        rows.append(f"{name:15s} {step:>6} {tps:>8.0f} {mfu_text:>8} {mem or float('nan'):>9.2f} {sec:>8.0f}")
    return rows


def squad_rows(root: Path) -> list[str]:
    """SQuAD-k of the CompAs / DyPRAG runs (``train_compas.py --eval-squad``: ctx2param eval's report)."""
    return [
        results_row(f"{name} SQuAD-k", root / name / "squad_eval" / "results.json")
        for name in ("compas", "dyprag")
    ]


def heldout_rows(root: Path) -> list[str]:
    data = _read(root / "stream_adapter" / "heldout_eval.json")
    if data is None:
        return ["stream_adapter: no heldout_eval.json"]
    return [
        f"stream_adapter held-out {task} (n={r['n']}): zero-shot {r['zero_shot']:.3f}, ICL {r['icl']:.3f}, "
        f"StreamAdapter {r['stream_adapter']:.3f}, majority {r['majority_class']:.3f}"
        for task, r in data["results"].items()
    ]


def results_row(label: str, path: Path) -> str:
    """One line of a ``ctx2param eval`` results.json: the primary metric of every (system, k)."""
    data = _read(path)
    if data is None:
        return f"{label}: no results.json"
    metric = data["task"]["primary_metric"]
    cells = [
        f"{r['system']}@{r['k']}={100 * r['scores'][metric]:.1f}"
        for r in data["results"]
        if metric in r["scores"]
    ]
    return f"{label} ({metric}, n={data['settings']['n']}): " + " ".join(cells)


def baseline_rows(root: Path) -> list[str]:
    return [results_row(folder.name, folder / "results.json") for folder in sorted(root.glob("baseline_*"))]


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else "/tmp/results")
    for row in training_rows(root) + squad_rows(root) + heldout_rows(root) + baseline_rows(root):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
