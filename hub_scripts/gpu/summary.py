#!/usr/bin/env python
"""Print the short tables that end a GPU call: the recipe ablation (held-out losses, throughput) and the
best run by held-out KL, or a run's SQuAD-k reading.

    python hub_scripts/gpu/summary.py ablation RESULTS_DIR/ablation      # prints the table, then "best X"
    python hub_scripts/gpu/summary.py squad RESULTS_DIR/squad_k/results.json

Reads only the JSON the runs wrote; a missing file is reported as missing, never guessed.
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


def ablation(root: Path) -> int:
    rows = []
    print("run  steps  tokens/s   MFU  held-out KL  specificity  additivity  state   train KL (last)")
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        metrics = _read(run / "train_metrics.json")
        if metrics is None:
            print(f"{run.name:4s} (no train_metrics.json)")
            continue
        m = metrics["latest"]
        held = m.get("heldout", {})
        lines = (run / "train_log.jsonl").read_text().splitlines()
        log = [json.loads(line) for line in lines if line.strip()]
        last = log[-1] if log else {}
        mfu = m.get("mfu")
        print(
            f"{run.name:4s} {m['global_step']:6d} {m['tokens_per_s']:9,.0f} "
            f"{'n/a' if mfu is None else f'{100 * mfu:4.1f}%'} {held.get('alignment', float('nan')):11.4f} "
            f"{held.get('specificity', float('nan')):12.3f} {held.get('additivity', float('nan')):11.3f} "
            f"{held.get('state', float('nan')):6.3f} {last.get('alignment', float('nan')):10.4f}"
        )
        if "alignment" in held:
            rows.append((held["alignment"], run.name))
    if not rows:
        print("best none")
        return 1
    print(f"best {min(rows)[1]}")
    return 0


def squad(path: Path) -> int:
    report = _read(path)
    if report is None:
        print(f"{path}: missing")
        return 1
    print("system   k     n    EM     F1")
    for row in report["results"]:
        scores = row["scores"]
        print(
            f"{row['system']:8s} {row['k']:2d} {row['n']:5d} {100 * scores['exact_match']:5.1f} "
            f"{100 * scores['f1']:6.1f}"
        )
    return 0


if __name__ == "__main__":
    what, where = sys.argv[1], Path(sys.argv[2])
    sys.exit(ablation(where) if what == "ablation" else squad(where))
