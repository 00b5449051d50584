"""``ctx2param data``: build the training mix, add the base model's own questions, precompute the teacher's
responses, and show a mix's counts.

- ``data mix --out runs/mix.jsonl.gz``: passages and questions from the offline training-safe sources
  (:mod:`ctx2param.training.mix`), reproducibly; CPU only, needs ``datasets`` (MMLU for the overlap check).
- ``data questions --model M --mix IN --out OUT``: the base model writes questions about each passage.
- ``data responses --model M --mix IN --out OUT.jsonl.gz``: the teacher's greedy responses with k shuffled
  passages, as ``ctx2param train --data`` reads them (:mod:`ctx2param.training.teacher`).
- ``data stats MIX``: the table of counts and the model card's dataset entries.

``questions`` and ``responses`` need torch and transformers only (no ``datasets``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["format_counts", "register"]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _add_model(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        "-m",
        required=True,
        metavar="ID_OR_DIR",
        help="the base causal LM (folder or Hub id; 'smollm2': the bundled SmolLM2-135M-Instruct)",
    )
    group.add_argument("--revision", help="revision of a Hub model")
    group.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=None)
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    group.add_argument(
        "--batch-size", type=int, default=None, help="most rows a batch (default 1024 on CUDA, 16 on CPU)"
    )
    group.add_argument(
        "--batch-tokens",
        type=int,
        default=None,
        help="most tokens a batch, rows x (prompt + new tokens) (default 2^20 on CUDA, 16384 on CPU)",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="build the training mix, self-generated questions and the teacher's responses",
        description="Training data for context distillation: the passage/question mix (offline sources), the "
        "base model's own questions about its passages, and the teacher's greedy responses over k shuffled "
        "passages.",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="STEP", required=True)

    mix = sub.add_parser(
        "mix",
        help="build the passage/question mix (offline, reproducible)",
        description="Wikipedia lead summaries (minus SQuAD validation's titles), BoolQ and CoQA (training "
        "halves), SciQ, DROP and SciRIFF passages with their questions and template questions; nothing that "
        "the "
        "evaluation tasks use. Writes a gzipped JSONL mix and prints its counts.",
    )
    mix.add_argument("--out", "-o", required=True, metavar="FILE.jsonl.gz", help="the mix file to write")
    mix.add_argument("--seed", type=int, default=0, help="seed of the --max-passages-per-source choice")
    mix.add_argument(
        "--sources",
        type=_name_list,
        default=None,
        metavar="S1,S2",
        help="wiki,boolq,coqa,sciq,drop,sciriff (default all)",
    )
    mix.add_argument(
        "--max-passages-per-source", type=int, default=None, metavar="N", help="cap each source (seeded)"
    )
    mix.add_argument(
        "--max-words", type=int, default=160, help="longest passage piece in words (default 160)"
    )
    mix.add_argument(
        "--dev-frac", type=float, default=0.02, help="fraction of passages held out as 'dev' (default 0.02)"
    )
    mix.set_defaults(func=run_mix)

    questions = sub.add_parser(
        "questions",
        help="add the base model's own questions about each passage",
        description="The base model (chat template) is asked for N questions about each passage; the usable, "
        "distinct ones are added to the mix (source self-<source>, no gold answer). Resumable.",
    )
    _add_model(questions)
    questions.add_argument("--mix", required=True, metavar="IN", help="the mix to read")
    questions.add_argument(
        "--out", "-o", required=True, metavar="OUT", help="the mix to write (may equal --mix)"
    )
    questions.add_argument("--per-passage", type=int, default=3, help="questions per passage (default 3)")
    questions.add_argument(
        "--max-new-tokens", type=int, default=None, help="reply length (default 24 N + 16)"
    )
    questions.add_argument("--limit", type=int, default=None, help="ask about at most N passages (seeded)")
    questions.add_argument("--seed", type=int, default=0, help="seed of the --limit choice")
    questions.set_defaults(func=run_questions)

    responses = sub.add_parser(
        "responses",
        help="precompute the teacher's greedy responses over k shuffled passages",
        description="For each question: k passages (the gold one and k-1 distractors of other titles, "
        "shuffled), the SQuAD-k ICL prompt of `ctx2param eval`, and the teacher's whole greedy reply. Writes "
        "training JSONL "
        "that `ctx2param train --data FILE` reads, and FILE's .stats.json. Resumable.",
    )
    _add_model(responses)
    responses.add_argument("--mix", required=True, metavar="IN", help="the mix to read")
    responses.add_argument(
        "--out", "-o", required=True, metavar="OUT.jsonl[.gz]", help="the training file to write"
    )
    responses.add_argument(
        "--k", type=_int_list, default=[1, 2, 4, 8], metavar="K1,K2", help="k values (default 1,2,4,8)"
    )
    responses.add_argument(
        "--k-weights", type=_float_list, default=None, metavar="W1,W2", help="weights of the k values"
    )
    responses.add_argument("--seed", type=int, default=0, help="seed of k, distractors, order and groups")
    responses.add_argument("--max-new-tokens", type=int, default=32, help="longest response (default 32)")
    responses.add_argument(
        "--questions-per-example",
        type=int,
        default=1,
        metavar="Q",
        help="group up to Q questions of one passage under one context set (default 1)",
    )
    responses.add_argument(
        "--part", choices=("train", "dev", "all"), default="train", help="passages (default train)"
    )
    responses.add_argument(
        "--max-context-tokens",
        type=int,
        default=256,
        help="skip passages longer than this many tokens, so each context is one generator chunk (default "
        "256 "
        "= CompAs chunk_tokens; 0: no limit)",
    )
    responses.add_argument(
        "--limit", type=int, default=None, help="answer at most N questions in each output file (seeded)"
    )
    responses.add_argument(
        "--answers",
        choices=("teacher", "gold"),
        default="teacher",
        help="teacher: generate (default); gold: the data sets' answers, no model run (only --model's "
        "tokenizer and config are read; questions without one are left out)",
    )
    responses.add_argument(
        "--heldout-out",
        metavar="FILE.jsonl[.gz]",
        default=None,
        help="also write the examples of the mix's dev passages (held out from training) to FILE",
    )
    responses.add_argument(
        "--heldout-frac",
        type=float,
        default=None,
        help="the held-out fraction; must be the mix's --dev-frac (0.02 by default)",
    )
    responses.set_defaults(func=run_responses)

    stats = sub.add_parser("stats", help="print a mix's counts and its model card dataset entries")
    stats.add_argument("mix", metavar="MIX", help="a mix file")
    stats.add_argument(
        "--json", action="store_true", help="print the sources record and card entries as JSON"
    )
    stats.set_defaults(func=run_stats)


# ---------------------------------------------------------------------------------------------- helpers


def format_counts(mix: Any) -> str:
    """A plain-text table of a mix's sources: passages (dev), questions by kind, licence."""
    rows = [("source", "passages", "dev", "dataset", "template", "self", "questions", "licence")]
    totals = [0] * 6
    for name, entry in mix.sources.items():
        by = entry.get("questions", {})
        dataset = sum(v for k, v in by.items() if k == name)
        template = sum(v for k, v in by.items() if k.endswith("-template"))
        own = sum(v for k, v in by.items() if k.startswith("self-"))
        values = [
            entry.get("passages", 0),
            entry.get("dev_passages", 0),
            dataset,
            template,
            own,
            sum(by.values()),
        ]
        totals = [t + v for t, v in zip(totals, values, strict=True)]
        rows.append((name, *(f"{v:,}" for v in values), str(entry.get("license", ""))))
    rows.append(("total", *(f"{v:,}" for v in totals), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1], strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
        if j == 0 or j == len(rows) - 2:
            lines.append("-" * len(lines[-1]))
    return "\n".join(lines)


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")


def _load_model(args: argparse.Namespace) -> Any:
    """The base model as the evaluation runner sees it (``ctx2param eval``'s loader)."""
    from .eval import _load

    namespace = argparse.Namespace(
        model=args.model,
        revision=args.revision,
        base=None,
        dtype=args.dtype,
        device=args.device,
        quantize=None,
    )
    return _load(namespace)


def _tokenizer_only(args: argparse.Namespace) -> Any:
    """The model's tokenizer and window without its weights (``--answers gold``: nothing is generated)."""
    from transformers import AutoConfig, AutoTokenizer

    from ..evaluation.runner import EvalModel
    from . import resolve_model_arguments

    resolve_model_arguments(args, ("model",))  # 'smollm2': the bundled model (eval's _load does it too)
    tokenizer = AutoTokenizer.from_pretrained(args.model, revision=args.revision)
    config = AutoConfig.from_pretrained(args.model, revision=args.revision)
    config = getattr(config, "text_config", None) or config
    window = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    lm: Any = None  # never run with --answers gold
    return EvalModel(lm, tokenizer, name=args.model, revision=args.revision, window=window)


def _write_sources(mix: Any, out: Path) -> Path:
    """``OUT.sources.json``: the mix's ``CardData.add_dataset`` entries, beside it (for the model card)."""
    from ..file_utils import write_text_atomically
    from ..training.mix import card_datasets

    path = Path(f"{out}.sources.json")
    write_text_atomically(path, json.dumps(card_datasets(mix.sources), indent=2, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- steps


def run_mix(args: argparse.Namespace) -> int:
    from ..training.mix import PASSAGE_SOURCES, build_mix, save_mix

    out = Path(args.out)
    if not out.name.endswith(".jsonl.gz"):
        raise ValueError(f"--out {out}: name the mix *.jsonl.gz (it is written gzipped).")
    _check_positive(args, "max_passages_per_source")
    mix = build_mix(
        sources=args.sources or PASSAGE_SOURCES,
        seed=args.seed,
        max_passages_per_source=args.max_passages_per_source,
        max_words=args.max_words,
        dev_frac=args.dev_frac,
    )
    save_mix(mix, out)
    _write_sources(mix, out)
    print(format_counts(mix))
    dropped = ", ".join(
        f"{source}: " + ", ".join(f"{n:,} {why}" for why, n in reasons.items())
        for source, reasons in mix.header.get("filtered", {}).items()
    )
    print(f"dropped: {dropped or 'nothing'}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def run_questions(args: argparse.Namespace) -> int:
    from ..training.mix import load_mix, save_mix
    from ..training.teacher import self_questions

    _check_positive(args, "per_passage", "max_new_tokens", "limit", "batch_size", "batch_tokens")
    out = Path(args.out)
    if not out.name.endswith(".jsonl.gz"):
        raise ValueError(f"--out {out}: name the mix *.jsonl.gz.")
    mix = load_mix(args.mix)
    model = _load_model(args)
    record = self_questions(
        mix,
        model,
        per_passage=args.per_passage,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        batch_tokens=args.batch_tokens,
        limit=args.limit,
        seed=args.seed,
        partial=out.with_name(out.name + ".partial"),
        progress=not args.no_progress,
    )
    save_mix(mix, out)
    _write_sources(mix, out)
    out.with_name(out.name + ".partial").unlink(missing_ok=True)
    print(format_counts(mix))
    asked = max(record["passages_asked"], 1)
    print(
        f"asked about {record['passages_asked']:,} passages, added {record['questions_added']:,} questions "
        f"({record['questions_added'] / asked:.2f} a passage; {record['replies_at_token_limit']:,} replies "
        "hit "
        f"--max-new-tokens) in {record['seconds']:.1f} s ({record['seconds'] / asked:.3f} s a passage)"
    )
    print(f"wrote {out}")
    return 0


def run_responses(args: argparse.Namespace) -> int:
    from ..training.mix import load_mix
    from ..training.teacher import teacher_responses

    _check_positive(args, "max_new_tokens", "questions_per_example", "limit", "batch_size", "batch_tokens")
    if args.max_context_tokens is not None and args.max_context_tokens < 0:
        raise ValueError(f"--max-context-tokens must be >= 0, got {args.max_context_tokens}.")
    mix = load_mix(args.mix)
    model = _load_model(args) if args.answers == "teacher" else _tokenizer_only(args)
    stats = teacher_responses(
        mix,
        model,
        args.out,
        ks=args.k,
        k_weights=args.k_weights,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        questions_per_example=args.questions_per_example,
        part=args.part,
        max_context_tokens=args.max_context_tokens or None,
        batch_size=args.batch_size,
        batch_tokens=args.batch_tokens,
        limit=args.limit,
        progress=not args.no_progress,
        mix_path=args.mix,
        answers=args.answers,
        heldout_out=args.heldout_out,
        heldout_frac=args.heldout_frac,
    )
    hist = ", ".join(f"k={k}: {n:,}" for k, n in stats["k_histogram"].items())
    if args.answers == "gold":
        print(
            f"{stats['examples']:,} examples with gold answers ({stats['groups']:,} context sets; {hist}); "
            f"{stats['skipped_without_gold']:,} questions without one left out"
        )
    else:
        print(
            f"{stats['examples']:,} examples ({stats['groups']:,} context sets; {hist}); mean response "
            f"{stats['mean_response_tokens']:.1f} tokens, {stats['responses_at_token_limit']:,} at the "
            f"limit; {stats['dropped_empty_responses']:,} empty responses dropped; "
            f"{stats['generation_seconds']:.1f} s ({stats['seconds_per_question']:.4f} s a question) on "
            f"{stats['device']}"
        )
    if "heldout" in stats:
        held = stats["heldout"]
        print(
            f"held out: {held['examples']:,} examples ({held['groups']:,} context sets) in {args.heldout_out}"
        )
    print(f"wrote {args.out}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from ..training.mix import card_datasets, load_mix

    mix = load_mix(args.mix)
    if args.json:
        print(json.dumps({"sources": mix.sources, "card_datasets": card_datasets(mix.sources)}, indent=2))
        return 0
    print(format_counts(mix))
    print(f"{len(mix.passages):,} passages, {len(mix.questions):,} questions in {args.mix}")
    return 0
