"""Approximate FLOP counts of a training step, for model-FLOPs utilisation (MFU) and ``total_flos``.

Conventions (the usual ones of MFU reports): a matrix multiply of ``[n, k] x [k, m]`` costs ``2·n·k·m``; only
real (non-padding) tokens count; causal self-attention over ``T`` tokens costs ``2·T²·w`` per layer (scores
and values, each ``T²/2 · w`` multiply-adds), ``w`` = query width. A backward pass costs twice the forward
for trainable weights (input and weight gradients) and once the forward for frozen weights (input gradients
only): the base model is frozen, so a student or decoder pass through it costs 2× its forward, not 3×.
Normalisation layers, activations, softmax and the optimizer are ignored (a few percent).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..modules import config_int, module_shape

__all__ = [
    "PEAK_BF16_FLOPS",
    "BaseCost",
    "base_cost",
    "batch_flops",
    "batch_statistics",
    "compas_batch_flops",
    "dyprag_batch_flops",
    "peak_bf16_flops",
    "token_slots",
]

#: Dense bf16 peak FLOP/s by GPU name (substring, first match wins): the denominator of every MFU ctx2param
#: reports (the vendors' datasheets; an H100 PCIe is slower than the SXM part).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),
    ("A100", 312.0e12),
    ("L40S", 362.0e12),
    ("A10G", 70.0e12),
    ("L4", 121.0e12),
)


def peak_bf16_flops(device: torch.device | str | None = None, name: str | None = None) -> float | None:
    """The dense bf16 peak of a CUDA device (by its name in :data:`PEAK_BF16_FLOPS`); None on the CPU or
    for a GPU the table does not know."""
    if name is None:
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_FLOPS if key in name), None)


@dataclass(frozen=True)
class BaseCost:
    """What a forward pass of a causal LM costs.

    Attributes:
        linear_params: weights of the linear layers of the decoder stack (embeddings and LM head excluded).
        lm_head_params: vocabulary × hidden (the logits projection).
        num_layers: decoder layers.
        attn_width: query width (heads × head dim) of each attention layer.
        hidden_size: embedding width.
    """

    linear_params: int
    lm_head_params: int
    num_layers: int
    attn_width: int
    hidden_size: int

    def forward(self, lengths: torch.Tensor | list[int], logit_positions: int = 0) -> float:
        """Forward FLOPs over sequences of the given real lengths, computing ``logit_positions`` logits."""
        lengths = [int(t) for t in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        tokens = sum(lengths)
        attention = sum(2.0 * self.num_layers * self.attn_width * t * t for t in lengths)
        return 2.0 * self.linear_params * tokens + attention + 2.0 * self.lm_head_params * logit_positions


_COSTS: weakref.WeakKeyDictionary[nn.Module, BaseCost] = weakref.WeakKeyDictionary()


def _compute_base_cost(model: nn.Module) -> BaseCost:
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = 0
    for module in model.modules():
        if module is out_emb:
            continue
        shape = module_shape(module)
        if shape is not None:
            linear += shape[0] * shape[1]
    hidden = int(model.get_input_embeddings().embedding_dim)
    layers = config_int(model, ("num_hidden_layers", "n_layer"), positive=True) or 0
    heads = config_int(model, ("num_attention_heads", "n_head"), positive=True)
    head_dim = config_int(model, ("head_dim",), positive=True)
    width = int(heads * head_dim) if heads and head_dim else hidden
    vocab = int(model.get_input_embeddings().num_embeddings)
    return BaseCost(linear, vocab * hidden, layers, width, hidden)


def base_cost(model: nn.Module) -> BaseCost:
    """The :class:`BaseCost` of a causal LM (cached per model object, without keeping it alive)."""
    if model not in _COSTS:
        _COSTS[model] = _compute_base_cost(model)
    return _COSTS[model]


def _lengths(inputs: dict[str, Any], key: str) -> torch.Tensor:
    return inputs[key].sum(-1).detach().cpu()


def _alignment_flops(cost: BaseCost, inputs: dict[str, Any], lora_params: int) -> tuple[float, float, float]:
    """Teacher forward, student forward + input-gradient backward (with the summed adapters' low-rank
    products, ``lora_params`` = rank × Σ(d_in + d_out) over the adapted modules, per chunk slot), and the
    tokens both read."""
    n, answer_len = inputs["answer_ids"].shape
    logits = n * (answer_len + 1)
    teacher_lengths = _lengths(inputs, "teacher_attention_mask")
    student_lengths = _lengths(inputs, "student_attention_mask")
    slots = int(inputs["chunk_slot"].max()) + 1
    lora = 2.0 * slots * lora_params
    teacher = cost.forward(teacher_lengths, logits)
    student = 2.0 * cost.forward(student_lengths, logits) + 3.0 * lora * float(student_lengths.sum())
    return teacher, student, float(teacher_lengths.sum() + student_lengths.sum())


def compas_batch_flops(model: Any, inputs: dict[str, Any]) -> dict[str, float]:
    """FLOPs of one CompAs training step on a collated batch, by part, and token counts.

    Returns:
        ``generator`` (base forward over chunks and pairs + the Perceiver block and heads, forward and
        backward), ``teacher`` (forward), ``student`` (forward and input-gradient backward through the base,
        plus the adapters' low-rank products), ``decoder`` (the same for the decoder's pass, plus its prompt
        MLP and LoRA), ``total``; and ``context_tokens``, ``tokens`` (every token any pass read).
    """
    cfg = model.config
    cost = base_cost(model.base_lm)
    d, m = cfg.latent_dim, cfg.rank
    n_layers = len(model.layout.layers)
    kinds = model.layout.kind_shapes
    head_io = sum(d_in + d_out for d_out, d_in in kinds)
    d_model = cost.hidden_size
    out: dict[str, float] = {"generator": 0.0, "teacher": 0.0, "student": 0.0, "decoder": 0.0}
    tokens = 0.0

    blocks = int(getattr(cfg, "num_blocks", 1))
    head_dim = int(getattr(cfg, "head_dim", d // 2))

    def generator_pass(lengths: torch.Tensor) -> float:
        t = float(lengths.sum())
        c = len(lengths)
        per_token = 2.0 * d_model * d + blocks * 2.0 * d * 2 * d  # input projection; keys/values per block
        attention = blocks * 4.0 * m * d * t  # scores and values
        ff = 2.0 * 2 * cfg.ff_mult * d * d
        self_attn = (2.0 * 4 * d * d + 4.0 * m * d) if cfg.latent_self_attention else 0.0
        per_latent = (
            blocks * (2.0 * 2 * d * d + ff + self_attn) + 2.0 * d * head_dim + 2.0 * head_dim * head_io
        )
        block = n_layers * (per_token * t + attention + c * m * per_latent)
        return cost.forward(lengths) + 3.0 * block  # frozen base forward; generator forward + backward

    chunk_lengths = _lengths(inputs, "chunk_attention_mask")
    out["generator"] += generator_pass(chunk_lengths)
    tokens += float(chunk_lengths.sum())
    context_tokens = float(chunk_lengths.sum())
    if "pair_attention_mask" in inputs:
        pair_lengths = _lengths(inputs, "pair_attention_mask")
        out["generator"] += generator_pass(pair_lengths)
        tokens += float(pair_lengths.sum())
    if "answer_ids" in inputs:
        out["teacher"], out["student"], read = _alignment_flops(cost, inputs, m * head_io * n_layers)
        tokens += read
    if "recon_ids" in inputs:
        prompt = model.decoder.prompt_length
        recon_lengths = _lengths(inputs, "recon_mask") + prompt
        r, recon_len = inputs["recon_ids"].shape
        lora_params = sum(p.numel() for p in [*model.decoder.lora_A, *model.decoder.lora_B])
        mlp = sum(p.numel() for p in [model.decoder.proj_in.weight, model.decoder.proj_out.weight])
        out["decoder"] = (
            2.0 * cost.forward(recon_lengths, r * (recon_len + 1))
            + 3.0 * 2.0 * lora_params * float(recon_lengths.sum())
            + 3.0 * 2.0 * mlp * r * n_layers
        )
        tokens += float(recon_lengths.sum())
    out["total"] = sum(out.values())
    out["context_tokens"] = context_tokens
    out["tokens"] = tokens
    return out


def dyprag_batch_flops(model: Any, inputs: dict[str, Any]) -> dict[str, float]:
    """FLOPs of one DyPRAG training step: ``generator`` (frozen base forward over the chunks + the
    translator MLP forward and backward, once per chunk), ``teacher``, ``student`` (as for CompAs),
    ``total``, ``context_tokens`` and ``tokens``."""
    cost = base_cost(model.base_lm)
    chunk_lengths = _lengths(inputs, "chunk_attention_mask")
    translator = sum(p.numel() for p in model.translator.parameters())
    out: dict[str, float] = {
        "generator": cost.forward(chunk_lengths) + 3.0 * 2.0 * translator * len(chunk_lengths),
        "teacher": 0.0,
        "student": 0.0,
    }
    tokens = float(chunk_lengths.sum())
    if "answer_ids" in inputs:
        shapes = model.config.target_shapes.values()
        lora = model.config.rank * sum(d_in + d_out for d_out, d_in in shapes)
        out["teacher"], out["student"], read = _alignment_flops(cost, inputs, lora)
        tokens += read
    out["total"] = sum(out.values())
    out["context_tokens"] = float(chunk_lengths.sum())
    out["tokens"] = tokens
    return out


def batch_flops(model: Any, inputs: dict[str, Any]) -> dict[str, float]:
    """FLOPs of one training step of ``model`` on ``inputs``: CompAs and DyPRAG here, any method with a
    ``training_flops(batch)`` of its own (StreamAdapter); KeyError for others."""
    method = getattr(getattr(model, "config", None), "method_name", None)
    if method == "compas":
        return compas_batch_flops(model, inputs)
    if method == "dyprag":
        return dyprag_batch_flops(model, inputs)
    own = getattr(model, "training_flops", None)
    if callable(own):
        return own(inputs)
    raise KeyError(f"No FLOP count for method {method!r}.")


#: Attention masks of the passes a training step runs, by the methods' batch keys.
PASS_MASKS = (
    "chunk_attention_mask",
    "pair_attention_mask",
    "teacher_attention_mask",
    "student_attention_mask",
    "recon_mask",
    "chunk_mask",
    "teacher_mask",
    "student_mask",
)


def _buckets_key(mask_key: str) -> str:
    """``chunk_attention_mask`` / ``chunk_mask`` -> ``chunk_buckets`` (the pass's length buckets)."""
    for suffix in ("_attention_mask", "_mask"):
        if mask_key.endswith(suffix):
            return mask_key.removesuffix(suffix) + "_buckets"
    return mask_key + "_buckets"


def token_slots(inputs: dict[str, Any]) -> tuple[float, float]:
    """``(real tokens, token slots)`` the passes of a step compute: slots count padding too (a pass read in
    length buckets, ``<pass>_buckets`` beside its ``<pass>_attention_mask`` or ``<pass>_mask``, e.g.
    ``chunk_buckets``, pays only for each bucket's own width)."""
    real = slots = 0.0
    for key in PASS_MASKS:
        mask = inputs.get(key)
        if not isinstance(mask, torch.Tensor):
            continue
        real += float(mask.sum())
        buckets = inputs.get(_buckets_key(key))
        slots += float(sum((e - s) * w for s, e, w in buckets)) if buckets else float(mask.numel())
    return real, slots


def batch_statistics(model: Any, inputs: dict[str, Any] | None) -> dict[str, float]:
    """Plain numbers of a collated batch for the training log: ``flops`` (0 for a method without a FLOP
    count) and its parts (``flops_<part>``), ``tokens`` (every token any pass reads), ``context_tokens``,
    ``real`` and ``slots`` (:func:`token_slots`), ``examples``. Runs on the CPU (in the data loader).
    ``inputs=None`` only resolves the base model's cost (call it before data-loader workers fork)."""
    base = getattr(model, "base_lm", None)
    if inputs is None:
        if isinstance(base, nn.Module):
            base_cost(base)
        return {}
    try:
        parts = batch_flops(model, inputs)
    except (KeyError, TypeError, AttributeError, ValueError):
        parts = {}
    real, slots = token_slots(inputs)
    out = {
        "flops": float(parts.get("total", 0.0)),
        "tokens": float(parts.get("tokens", real)),
        "context_tokens": float(parts.get("context_tokens", 0.0)),
        "real": real,
        "slots": slots,
        "examples": float(
            next(
                (len(inputs[k]) for k in ("answer_ids", "student_ids", "student_input_ids") if k in inputs), 0
            )
        ),
    }
    for key, value in parts.items():
        if key not in ("total", "tokens", "context_tokens"):
            out[f"flops_{key}"] = float(value)
    return out
