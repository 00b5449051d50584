"""``DyPRAGConfig``: the DyPRAG parameter translator (a prior-generator baseline) and its training losses."""

from __future__ import annotations

from typing import Any

from ...configuration_utils import ContextAdaptationConfig

__all__ = ["DyPRAGConfig"]


class DyPRAGConfig(ContextAdaptationConfig):
    """Configuration of a DyPRAG-style parameter translator (Tan et al., "Dynamic Parametric Retrieval
    Augmented Generation for Test-time Knowledge Enhancement", arXiv 2503.23895; this project's reading).

    The passage runs through the frozen base model; its hidden states at ``pooling_layer`` (default: the
    last layer) are mean-pooled over the non-padding tokens into one vector ``s``. For every target module
    kind (``self_attn.q_proj``, ``mlp.down_proj``, ...) a small MLP shared across layers maps
    ``s`` plus a learned layer embedding to the LoRA factors of that kind in that layer:
    ``z = act(W_in s + e_ℓ)``, ``A = H_A(z) / √d_in`` (``[r, d_in]``), ``B = H_B(z) / √r`` (``[d_out, r]``),
    ΔW = scale · B A. Unlike CompAs there are no per-token latents: the whole passage is one vector.

    Args:
        translator_hidden: width ``h`` of each kind's MLP; the parameter count grows as
            ``h · rank · Σ_kinds (d_in + d_out)`` (the output heads dominate).
        activation: ``"gelu"``, ``"relu"`` or ``"silu"``.
        pooling_layer: index into the base model's ``hidden_states`` tuple that is pooled (-1: the last
            layer's output).
        init_b_std: scale of the B-head's initial weights relative to the A-head's: small, so the first ΔW
            is small, but not zero, so gradients reach every head from the first step.
        alignment_weight: weight of KL(teacher with the passages in its prompt ‖ student with the summed
            adapters) on the answer tokens.
        ce_weight: weight of the student's cross-entropy on the answer tokens (DyPRAG's prediction loss).
        kl_temperature: temperature of the alignment KL (multiplied by T²).
        max_train_chunks: most chunks per training example (longer contexts are split into several).
        context_separator: joins contexts in the teacher's prompt.
        generation_batch_size: most chunks per batched pass in ``generate_adapter``.
        **kwargs: :class:`~ctx2param.ContextAdaptationConfig` fields (``rank`` defaults to 2 here, as in
            DyPRAG/PRAG's LoRA, ``chunk_tokens`` to 256).
    """

    model_type = "ctx2param_dyprag"
    method_name = "dyprag"

    def __init__(
        self,
        translator_hidden: int = 64,
        activation: str = "gelu",
        pooling_layer: int = -1,
        init_b_std: float = 0.01,
        alignment_weight: float = 1.0,
        ce_weight: float = 0.5,
        kl_temperature: float = 1.0,
        max_train_chunks: int = 8,
        context_separator: str = "\n\n",
        generation_batch_size: int = 16,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("rank", 2)
        kwargs.setdefault("chunk_tokens", 256)
        for name, value in {
            "translator_hidden": translator_hidden,
            "max_train_chunks": max_train_chunks,
            "generation_batch_size": generation_batch_size,
        }.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DyPRAGConfig.{name} must be a positive integer, got {value!r}.")
        if activation not in ("gelu", "relu", "silu"):
            raise ValueError(f"DyPRAGConfig.activation must be 'gelu', 'relu' or 'silu', got {activation!r}.")
        if isinstance(pooling_layer, bool) or not isinstance(pooling_layer, int):
            raise ValueError(f"DyPRAGConfig.pooling_layer must be an integer, got {pooling_layer!r}.")
        for name, value in {"alignment_weight": alignment_weight, "ce_weight": ce_weight}.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"DyPRAGConfig.{name} must be a number >= 0, got {value!r}.")
        if not (isinstance(init_b_std, (int, float)) and init_b_std > 0):
            raise ValueError(
                f"DyPRAGConfig.init_b_std must be > 0 (zero would stop gradients to the A-heads), got "
                f"{init_b_std!r}."
            )
        if not (isinstance(kl_temperature, (int, float)) and kl_temperature > 0):
            raise ValueError(f"DyPRAGConfig.kl_temperature must be > 0, got {kl_temperature!r}.")
        self.translator_hidden = translator_hidden
        self.activation = activation
        self.pooling_layer = pooling_layer
        self.init_b_std = float(init_b_std)
        self.alignment_weight = float(alignment_weight)
        self.ce_weight = float(ce_weight)
        self.kl_temperature = float(kl_temperature)
        self.max_train_chunks = max_train_chunks
        self.context_separator = context_separator
        self.generation_batch_size = generation_batch_size
        super().__init__(**kwargs)
