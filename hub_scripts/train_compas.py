#!/usr/bin/env python
"""Recipe: the CompAs generator for SmolLM2-135M-Instruct (and the DyPRAG baseline on the same data).

Settings and data only: the training itself is one call of ``ctx2param train`` (the one trainer every method
shares: length-grouped batches from DataLoader workers, the stacked fast path, the time budget, exact resume,
``train_log.jsonl``, ``train_metrics.json``, ``loss_curves.png`` and ``card_data.json`` in ``--out``).
Evaluation is ``ctx2param eval``'s (``hub_scripts/gpu/`` runs it after training).

Data: the teacher's own greedy responses on the passage/question mix, made once with ``ctx2param data``
(never SQuAD validation, ARC test or MMLU test)::

    ctx2param data mix --out runs/mix.jsonl.gz                                   # CPU, seeded
    ctx2param data responses --model smollm2 --mix runs/mix.jsonl.gz \\
        --out runs/responses.jsonl --k 1,2,4,8 --device cuda                      # GPU, once
    python hub_scripts/train_compas.py --base BASE --data runs/responses.jsonl --out runs/compas \\
        --minutes 8                                                               # call 1
    python hub_scripts/train_compas.py --base BASE --data runs/responses.jsonl --out runs/compas \\
        --minutes 8 --resume                                                      # call 2, exactly continued

Every ``--set FIELD=VALUE`` overrides a field of the generator's config (``CompAsConfig`` /
``DyPRAGConfig``); a resumed run continues its checkpoint, whose config must be the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import ctx2param  # noqa: F401
except ImportError:  # run from a checkout without installing: use its src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ctx2param.cli import main as ctx2param_main

#: The generator's settings (``CompAsConfig``), chosen as hub_scripts/gpu/NOTES.md records: ΔW = 0 at the
#: start for every passage, per-layer heads, rank 8 on down_proj, KL to the teacher's own responses only;
#: output_gain 10 lets ΔW grow from zero in tens of steps, not hundreds (a CPU sweep on SmolLM2: KL 2.94 ->
#: 0.43 in 10 steps at lr 1e-3 with gain 10, 2.10 with gain 1; tests/test_compas_smollm2.py).
COMPAS = {
    "target_modules": ["down_proj"],
    "rank": 8,
    "latent_dim": 256,
    "num_attention_heads": 8,
    "num_blocks": 1,
    "head_dim": 64,
    "head_sharing": "layer",
    "output_gain": 10.0,
    "chunk_tokens": 256,
    "max_train_chunks": 8,
    "alignment_weight": 1.0,
    "ce_weight": 0.0,
    "state_weight": 0.0,
    "additivity_weight": 0.1,
    "reconstruction_weight": 0.0,
}
#: The baseline on equal terms: same targets, data, loss (no gold cross-entropy), trainer and budget.
DYPRAG = {
    "target_modules": ["down_proj"],
    "rank": 2,
    "chunk_tokens": 256,
    "max_train_chunks": 8,
    "ce_weight": 0.0,
}
SETTINGS = {"compas": COMPAS, "dyprag": DYPRAG}

#: Optimisation: 256 examples (questions; each with its 1-8 chunks, four questions to a context set) per step
#: (at 64 the H200 step was launch-bound: 82k tokens/s, the GPU 30 % busy), AdamW with warm-up and a cosine
#: decay to a tenth, gradient clipping, a log every 20 steps (the only host syncs of the loop).
TRAINING = {"batch_size": 256, "lr": 1e-3, "warmup_steps": 30, "min_lr_ratio": 0.1, "logging_steps": 20}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="folder or id of the base model (SmolLM2-135M-Instruct)")
    p.add_argument(
        "--data", required=True, nargs="+", help="training JSONL file(s) (ctx2param data responses)"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", choices=sorted(SETTINGS), default="compas", help="generator to train")
    p.add_argument("--minutes", type=float, default=8.0, help="training-time budget of this call")
    p.add_argument("--steps", type=int, default=4000, help="planned optimizer steps (the schedule's length)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--eval-data", nargs="+", help="held-out JSONL: every loss term on it after training")
    p.add_argument(
        "--no-group-by-length", dest="group_by_length", action="store_false", help="random batches (ablation)"
    )
    p.add_argument("--batch-size", type=int, default=TRAINING["batch_size"])
    p.add_argument("--lr", type=float, default=TRAINING["lr"])
    p.add_argument("--warmup-steps", type=int, default=TRAINING["warmup_steps"])
    p.add_argument("--logging-steps", type=int, default=TRAINING["logging_steps"])
    p.add_argument("--workers", type=int, default=6, help="DataLoader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE")
    return p.parse_args(argv)


def command(args: argparse.Namespace) -> list[str]:
    """The ``ctx2param train`` command line of this recipe."""
    import torch

    settings = dict(SETTINGS[args.method])
    for item in args.settings:
        key, _, value = item.partition("=")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    argv = ["train", args.method, "--base", args.base, "--data", *args.data, "--out", args.out]
    argv += ["--steps", str(args.steps), "--minutes", str(args.minutes), "--batch-size", str(args.batch_size)]
    argv += ["--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps), "--scheduler", "cosine"]
    argv += ["--min-lr-ratio", str(TRAINING["min_lr_ratio"]), "--logging-steps", str(args.logging_steps)]
    # the responses' examples carry their context sets (the teacher answered those): no distractors added
    argv += ["--workers", str(args.workers), "--seed", str(args.seed), "--max-chunks", "1"]
    argv += ["--save-steps", str(10**9)]  # checkpoints when the budget is spent (and at the end)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        argv.append("--bf16")
    if args.eval_data:
        argv += ["--eval-data", *args.eval_data]
    if not args.group_by_length:
        argv.append("--no-group-by-length")
    if args.resume:
        argv.append("--resume")  # continues the checkpoint, whose config must equal these settings
    for key, value in settings.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return ctx2param_main(command(args))


if __name__ == "__main__":
    sys.exit(main())
