#!/usr/bin/env python
"""Recipe: the StreamAdapter generator for SmolLM2-135M-Instruct.

Settings and data only: the training itself is one call of ``ctx2param train stream-adapter`` (the one
trainer every method shares: length-grouped batches from DataLoader workers, StreamAdapter's stacked fast
path, the time budget, exact resume, ``train_log.jsonl``, ``train_metrics.json``, ``loss_curves.png`` and
``card_data.json`` in ``--out``). Evaluation is ``ctx2param eval``'s (the ``<task>-k`` demonstration tasks,
ARC and MMLU; see the commands below).

Data (all offline, training parts of the fixed hash split only; ``ctx2param train``'s own sources):
demonstrations -> task on the seen tasks (default SST-2, BoolQ, RTE), each input with k demonstrations, k
drawn per example from {1, 2, 4, 8, 16}, six independent demonstration draws per input, at most 8,000
examples per task; plus continuation of the long passages (BoolQ and CoQA passages of the train part: the
first 384 tokens read as context, the next 64 predicted). CB, COPA and MRPC stay out of training entirely
(the unseen tasks); ARC and MMLU are never training data. Teacher: the frozen base with the demonstrations
(or the passage's beginning) and the query in its prompt; student: the base with the absorbed update and the
query only; loss KL(teacher || student) + 0.5 CE on the answer tokens.

Calls of at most 10 minutes (``--minutes`` of training each; the schedule spans ``--steps``)::

    python hub_scripts/train_stream_adapter.py --base BASE --out runs/stream_adapter --minutes 8   # call 1
    python hub_scripts/train_stream_adapter.py --base BASE --out runs/stream_adapter --minutes 8 \\
        --resume                                                                                # call 2
    ctx2param eval --model runs/stream_adapter --base BASE --task sst2-k --k 16 --n 300 \\
        --demo-seeds 3 --systems closed,icl,stream --out runs/stream_adapter/eval/sst2-k

Every ``--set FIELD=VALUE`` overrides a field of ``StreamAdapterConfig``; a resumed run continues its
checkpoint, whose config must be the same.
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

#: The generator's settings (``StreamAdapterConfig``; the first H200 run's, hub_scripts/gpu/NOTES.md): rank 16
#: on all seven projections, a state of 16 x 64 per layer, B generated from the state, 256-token chunks.
SETTINGS = {
    "rank": 16,
    "state_dim": 64,
    "generated_factor": "B",
    "chunk_tokens": 256,
    "max_teacher_tokens": 4096,
    "kl_weight": 1.0,
    "ce_weight": 0.5,
}
#: The seen tasks (``demos-<task>`` sources of ``ctx2param train``); the others are held out of training.
SEEN_TASKS = ("sst2", "boolq", "rte")
#: The data mix: k per example from DEMO_K, DEMO_DRAWS draws per input, at most MAX_PER_SOURCE per source,
#: continuation of the passages longer than CONTEXT_TOKENS; one chunk of context per item (no distractors).
DATA = {
    "demo_k": "1,2,4,8,16",
    "demo_draws": 6,
    "max_per_source": 8000,
    "context_tokens": 384,
    "target_tokens": 64,
}
#: Optimisation: 128 examples (each with its 1-16 demonstrations) per step (fewer is launch-bound on an
#: H200), AdamW with warm-up and a cosine decay to a tenth over --steps, gradient clipping, a log every 20
#: steps (the only host syncs of the loop).
TRAINING = {"batch_size": 128, "lr": 1e-3, "warmup_steps": 30, "min_lr_ratio": 0.1, "logging_steps": 20}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="folder or id of the base model (SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tasks", nargs="+", default=list(SEEN_TASKS), help="seen tasks (demos-<task> sources)")
    p.add_argument("--no-passages", dest="passages", action="store_false", help="no continuation data")
    p.add_argument("--minutes", type=float, default=8.0, help="training-time budget of this call")
    p.add_argument("--steps", type=int, default=3000, help="planned optimizer steps (the schedule's length)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--batch-size", type=int, default=TRAINING["batch_size"])
    p.add_argument("--lr", type=float, default=TRAINING["lr"])
    p.add_argument("--warmup-steps", type=int, default=TRAINING["warmup_steps"])
    p.add_argument("--logging-steps", type=int, default=TRAINING["logging_steps"])
    p.add_argument("--max-per-source", type=int, default=DATA["max_per_source"])
    p.add_argument("--workers", type=int, default=6, help="DataLoader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE")
    return p.parse_args(argv)


def command(args: argparse.Namespace) -> list[str]:
    """The ``ctx2param train`` command line of this recipe."""
    import torch

    settings = dict(SETTINGS)
    for item in args.settings:
        key, _, value = item.partition("=")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    sources = [f"demos-{task}" for task in args.tasks] + (["passages"] if args.passages else [])
    argv = ["train", "stream-adapter", "--base", args.base, "--data", *sources, "--out", args.out]
    argv += ["--demo-k", DATA["demo_k"], "--demo-draws", str(DATA["demo_draws"])]
    argv += ["--max-examples", str(args.max_per_source), "--max-chunks", "1"]  # 1: no distractor contexts
    argv += ["--context-tokens", str(DATA["context_tokens"]), "--target-tokens", str(DATA["target_tokens"])]
    argv += ["--steps", str(args.steps), "--minutes", str(args.minutes), "--batch-size", str(args.batch_size)]
    argv += ["--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps), "--scheduler", "cosine"]
    argv += ["--min-lr-ratio", str(TRAINING["min_lr_ratio"]), "--logging-steps", str(args.logging_steps)]
    argv += ["--workers", str(args.workers), "--seed", str(args.seed)]
    argv += ["--save-steps", str(10**9)]  # checkpoints when the budget is spent (and at the end)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        argv.append("--bf16")
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
