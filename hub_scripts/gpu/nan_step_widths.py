#!/usr/bin/env python
"""Which steps of a `train_compas.py` run fed the student a batch whose width is 64 mod 128, next to the steps
that the run's log says were skipped for non-finite gradients.

    python hub_scripts/gpu/nan_step_widths.py --data runs/compas_data.jsonl \\
        --log benchmarks/results/training/h200_2026-12-01/dyprag/train_stdout.log [--steps 1099]

The student rows are ``[left pad][prompt][answer][right pad]`` (``alignment.prompt_answer_batch``), so a
batch's width is its longest prompt plus its longest answer: it depends on the data order alone, not on the
contexts or the model. The order is the Trainer's (accelerate's ``SeedableRandomSampler``): epoch e is
``torch.randperm(n)`` drawn from a generator seeded with ``seed + e``, in batches of ``--batch-size``, the
last partial batch kept. cuDNN attention's backward returns NaN at widths 64 mod 128 when a mask is passed
and a query row is fully masked (pytorch/pytorch#196678), which is why the trainer no longer uses it.
Runs on the CPU in seconds (the tokenizer only).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from ctx2param.alignment import ChunkAlignmentMixin  # noqa: E402
from ctx2param.commands.train import load_training_examples  # noqa: E402
from ctx2param.models.dyprag import DyPRAGConfig  # noqa: E402


class _Tokenization(ChunkAlignmentMixin):
    """The mixin's prompt and answer tokenization, without a base model."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001
        self.config, self.tokenizer, self.base_lm = DyPRAGConfig(), tokenizer, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the run's JSONL training mix")
    parser.add_argument("--log", help="the run's stdout log (its 'Step N: the gradient norm is nan' lines)")
    parser.add_argument("--base", help="base model folder (default: the local SmolLM2-135M-Instruct)")
    parser.add_argument("--steps", type=int, default=1099)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from ctx2param.testing_utils import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(args.base or smollm2_path())
    examples = load_training_examples(
        [args.data], tokenizer, context_tokens=96, target_tokens=32, max_chunks=4, seed=args.seed
    )  # train_compas.py's defaults
    tokens = _Tokenization(tokenizer)
    prompts = [len(tokens.prompt_ids(e.query)) for e in examples]
    answers = [len(tokens.answer_ids(e.query, e.answer)) for e in examples]
    n = len(examples)
    per_epoch = -(-n // args.batch_size)
    hits, order = [], []
    for step in range(1, args.steps + 1):
        epoch, k = divmod(step - 1, per_epoch)
        if k == 0:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        batch = order[k * args.batch_size : (k + 1) * args.batch_size]
        width = max(prompts[i] for i in batch) + max(answers[i] for i in batch)
        if width % 128 == 64:
            hits.append((step, width))
    print(f"{n} examples, {per_epoch} steps an epoch")
    print(f"steps whose student batch is 64 mod 128 wide: {hits}")
    if args.log:
        text = Path(args.log).read_text(errors="replace")
        skipped = [int(s) for s in re.findall(r"Step (\d+): the gradient norm is (?:nan|inf)", text)]
        print(f"steps the log says had non-finite gradients: {skipped}")
        print("same steps" if skipped == [s for s, _ in hits] else "the two lists differ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
