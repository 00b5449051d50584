#!/usr/bin/env python
"""Check on a GPU the attention bug behind DyPRAG's NaN steps, and that the trainer's kernel choice avoids it.

    python hub_scripts/gpu/sdpa_nan_check.py [--out FILE.json]

``scaled_dot_product_attention`` on the attention pattern of a left-padded student batch (rows ``[left pad]
[prompt][answer][right pad]``, as ``alignment.prompt_answer_batch`` builds them; the mask is causal and
key-is-real, so left-pad query rows are fully masked), bf16, 32 rows, 9 heads of 64 (SmolLM2-135M), forward
and backward, at widths 319, 320, 321 and 384. Each width is run with the default backends, with the
trainer's :data:`~ctx2param.training.trainer.TRAINING_SDPA_BACKENDS` and with cuDNN attention alone.
pytorch/pytorch#196678 predicts NaN in the query gradient at width 320 (64 mod 128) wherever cuDNN
attention runs, and none elsewhere. Prints one row per run and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from ctx2param.training.trainer import TRAINING_SDPA_BACKENDS  # noqa: E402

ROWS, HEADS, HEAD_DIM = 32, 9, 64


def student_mask(prompt_len: int, answer_len: int, device: str, seed: int = 0) -> torch.Tensor:
    """``[ROWS, 1, W, W]`` bool, W = prompt_len + answer_len; row 0 is the longest prompt and answer."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(20, prompt_len + 1, (ROWS,), generator=g)
    answers = torch.randint(2, answer_len + 1, (ROWS,), generator=g)
    prompts[0], answers[0] = prompt_len, answer_len
    width = prompt_len + answer_len
    real = torch.zeros(ROWS, width, dtype=torch.bool)
    for i in range(ROWS):
        real[i, prompt_len - prompts[i] : prompt_len + answers[i]] = True
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    return (causal[None] & real[:, None, :])[:, None].to(device)


def run(prompt_len: int, answer_len: int, backends: list[SDPBackend] | None, device: str) -> dict:
    mask = student_mask(prompt_len, answer_len, device)
    width = mask.shape[-1]
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(ROWS, HEADS, width, HEAD_DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    context = sdpa_kernel(backends) if backends else torch.enable_grad()
    with context:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    attends = mask[:, 0].any(-1)[:, None, :, None]  # the loss reads only rows that attend to something
    (out.float() * attends).square().sum().backward()
    return {
        "width": width,
        "fully_masked_query_rows": int((~mask[:, 0].any(-1)).sum()),
        "output_finite": bool(torch.isfinite(out).all()),
        "nonfinite_grad_q": int((~torch.isfinite(q.grad)).sum()),
        "nonfinite_grad_k": int((~torch.isfinite(k.grad)).sum()),
        "nonfinite_grad_v": int((~torch.isfinite(v.grad)).sum()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file for the rows")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    settings = {
        "default": None,
        "trainer (no cuDNN)": list(TRAINING_SDPA_BACKENDS),
        "cuDNN only": [SDPBackend.CUDNN_ATTENTION],
    }
    rows = []
    for name, backends in settings.items():
        for prompt_len, answer_len in ((287, 32), (288, 32), (288, 33), (352, 32)):
            rows.append({"backends": name, **run(prompt_len, answer_len, backends, "cuda")})
    report = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['gpu']}, torch {report['torch']}, cuDNN {report['cudnn']}")
    print(f"{'backends':20s} {'width':>5s} {'masked rows':>11s} {'out ok':>6s} {'NaN dq/dk/dv':>16s}")
    for r in rows:
        bad = f"{r['nonfinite_grad_q']}/{r['nonfinite_grad_k']}/{r['nonfinite_grad_v']}"
        print(
            f"{r['backends']:20s} {r['width']:5d} {r['fully_masked_query_rows']:11d} "
            f"{str(r['output_finite']):>6s} {bad:>16s}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
