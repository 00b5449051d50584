#!/usr/bin/env python
"""Why the base model is below BoolQ's majority class: its label words' prior, and what calibration does.

For the ``boolq-k`` questions (held-out half, one shared set of k demonstrations; ``ctx2param eval``'s items
and plain-text prompts), this scores several verbalisations of the two labels after every prompt in one pass
(``ctx2param.evaluation.choice_logprobs``: the prompt once, all label words on its cache) and after the
task's content-free prompt (every input "N/A"; also "" and "[MASK]", Zhao et al. 2021) with the same
demonstrations. It reports, per k and label pair: accuracy as ``ctx2param eval`` scores it, the share of
questions answered "yes", the content-free prior p(yes | N/A) within the pair, and accuracy and "yes" share
with contextual calibration (the content-free log-likelihood subtracted, ``ctx2param eval --calibrate``).
The base model only (closed book and ICL): a trained StreamAdapter runs through ``ctx2param eval``.

    python hub_scripts/boolq_label_bias.py --model SMOLLM2_DIR --k 0,4 --n 150 \\
        --out benchmarks/results/boolq_label_bias_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

try:
    import ctx2param  # noqa: F401
except ImportError:  # run from a checkout without installing: use its src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

#: Verbalisations of (false, true): the task's own first, then capitalised and true/false variants.
LABEL_PAIRS = (("no", "yes"), ("No", "Yes"), ("false", "true"), ("False", "True"))
#: Content-free fillers of the template's passage and question (Zhao et al., 2021).
CONTENT_FREE = ("N/A", "", "[MASK]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the causal LM (folder or id)")
    p.add_argument("--k", default="0,4", help="demonstrations (comma-separated; 0 = closed book)")
    p.add_argument("--n", type=int, default=150, help="held-out questions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, help="JSON file to write")
    return p.parse_args(argv)


def _softmax_pair(a: float, b: float) -> float:
    """p(b) within the pair (a, b) from two log-likelihoods."""
    return 1.0 / (1.0 + math.exp(a - b))


def measure(model, k: int, n: int, seed: int, batch_size: int) -> dict:
    """The numbers of one k (see the module docstring)."""
    from ctx2param.evaluation import build_items, choice_logprobs

    items = build_items("boolq-k", k, n, seed, demo_set=0)
    words = [w for pair in LABEL_PAIRS for w in pair]
    contexts = items[0].contexts
    scores = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        prompts = model.prompt_ids([i.query for i in batch], [contexts] * len(batch), plain=True)
        choices = [model.choice_ids(i.query, words, plain=True) for i in batch]
        for row in choice_logprobs(model.lm, prompts, choices, model.pad_id):
            scores.append({w: s / c for w, (s, c) in zip(words, row, strict=True)})
    priors = {}
    for filler in CONTENT_FREE:
        query = f"{filler}\nQuestion: {filler}?\nAnswer:"
        prompt = model.prompt_ids([query], [contexts], plain=True)
        row = choice_logprobs(model.lm, prompt, [model.choice_ids(query, words, plain=True)], model.pad_id)[0]
        priors[filler] = {w: s / c for w, (s, c) in zip(words, row, strict=True)}
    gold = [i.label for i in items]  # 1 = yes
    out = {"k": k, "n": len(items), "gold_yes_share": sum(gold) / len(gold), "pairs": {}}
    out["majority_class"] = max(sum(gold), len(gold) - sum(gold)) / len(gold)
    prior = priors["N/A"]
    for no, yes in LABEL_PAIRS:
        raw = [int(s[yes] > s[no]) for s in scores]
        calibrated = [int(s[yes] - prior[yes] > s[no] - prior[no]) for s in scores]
        out["pairs"][f"{no}/{yes}"] = {
            "accuracy": sum(p == g for p, g in zip(raw, gold, strict=True)) / len(gold),
            "yes_share": sum(raw) / len(raw),
            "mean_p_yes": sum(_softmax_pair(s[no], s[yes]) for s in scores) / len(scores),
            "content_free_p_yes": {f: _softmax_pair(pr[no], pr[yes]) for f, pr in priors.items()},
            "calibrated_accuracy": sum(p == g for p, g in zip(calibrated, gold, strict=True)) / len(gold),
            "calibrated_yes_share": sum(calibrated) / len(calibrated),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from ctx2param.environment import hardware_info, library_versions
    from ctx2param.evaluation import EvalModel
    from ctx2param.file_utils import write_text_atomically
    from ctx2param.modeling_utils import load_base_model

    lm = load_base_model(args.model, dtype=torch.float32)
    model = EvalModel(lm, AutoTokenizer.from_pretrained(args.model), name=args.model)
    started = time.perf_counter()
    results = []
    for k in [int(v) for v in args.k.split(",")]:
        with torch.no_grad():
            results.append(measure(model, k, args.n, args.seed, args.batch_size))
        r = results[-1]
        for pair, v in r["pairs"].items():
            print(
                f"k={k} {pair}: accuracy {100 * v['accuracy']:.1f} (yes {100 * v['yes_share']:.0f} %), "
                f"calibrated {100 * v['calibrated_accuracy']:.1f} "
                f"(yes {100 * v['calibrated_yes_share']:.0f} %), p(yes | N/A) "
                f"{v['content_free_p_yes']['N/A']:.3f}; majority {100 * r['majority_class']:.1f}",
                flush=True,
            )
    report = {
        "task": "boolq-k (held-out half, demonstration set 0)",
        "model": args.model,
        "settings": {
            "n": args.n,
            "seed": args.seed,
            "label_pairs": LABEL_PAIRS,
            "content_free": CONTENT_FREE,
        },
        "scoring": "length-normalised log-likelihood of each label word after the plain-text prompt; "
        "calibrated: minus the same after the content-free prompt (N/A) with the same demonstrations",
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
        "hardware": hardware_info(torch.device("cpu")),
        "versions": library_versions(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(Path(args.out), json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
