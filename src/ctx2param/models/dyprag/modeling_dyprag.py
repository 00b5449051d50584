"""DyPRAG: a single-vector parameter translator from a passage to LoRA factors (a prior-generator baseline).

After Tan et al., "Dynamic Parametric Retrieval Augmented Generation for Test-time Knowledge Enhancement"
(arXiv 2503.23895), in this project's reading. The passage runs through the frozen base model; its hidden
states at ``config.pooling_layer`` (the last layer by default) are mean-pooled over the non-padding tokens
into ONE vector ``s [D]``. For each target module kind (the part of the module name after the layer index),
a small MLP shared across layers, with a learned layer embedding, maps ``s`` to that kind's factors in every
layer:

    z_ℓ = act(W_in · LayerNorm(s) + e_ℓ)        [h]
    A_ℓ = H_A(z_ℓ) / √d_in                      [r, d_in]
    B_ℓ = H_B(z_ℓ) / √r                         [d_out, r]      ΔW_ℓ = scale · B_ℓ A_ℓ

So the whole passage is squeezed through one pooled vector, where CompAs lets per-layer latents read every
token: DyPRAG is the "earlier generator" that CompAs and StreamAdapter are measured against.

Training (shared with CompAs's alignment term, :mod:`ctx2param.alignment`): on examples with chunks
c_1..c_n, query q and answer y, KL(teacher with all chunks then q in its prompt ‖ student with Σ_i ΔW(c_i)
and only q) on y's tokens plus the student's cross-entropy on y. DyPRAG's own recipe also regresses the
translator's output onto LoRAs trained offline per document; that needs such LoRAs and is not used here.
Only the translator trains; the base model stays frozen.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...alignment import ChunkAlignmentMixin
from ...modeling_utils import ContextAdaptationModel
from ...modules import LayerKindLayout
from .configuration_dyprag import DyPRAGConfig

__all__ = ["DyPRAGLayout", "DyPRAGModel", "DyPRAGTranslator"]

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class DyPRAGLayout(LayerKindLayout):
    """DyPRAG's :class:`~ctx2param.modules.LayerKindLayout` (one MLP per module kind, shared by layers)."""

    method = "DyPRAG"
    sharing = "shares one MLP per module kind across layers"
    example = "model.layers.3.mlp.up_proj"
    kind_sharing = "shares one MLP per kind across layers"


class DyPRAGTranslator(nn.Module):
    """One pooled passage vector ``[C, D]`` → per-kind LoRA factors for every adapted layer.

    Args:
        config: the :class:`DyPRAGConfig` (``rank``, ``translator_hidden``, ``activation``, ``init_b_std``).
        layout: the target modules' layers and kinds.
        hidden_size: the base model's hidden width ``D``.
    """

    def __init__(self, config: DyPRAGConfig, layout: DyPRAGLayout, hidden_size: int) -> None:
        super().__init__()
        h, r = config.translator_hidden, config.rank
        self.rank = r
        self.kinds = list(layout.kinds)
        self.kind_shapes = list(layout.kind_shapes)
        self.input_norm = nn.LayerNorm(hidden_size)
        self.activation = _ACTIVATIONS[config.activation]()
        self.in_proj = nn.ModuleDict()
        self.layer_embedding = nn.ParameterDict()
        self.a_heads = nn.ModuleDict()
        self.b_heads = nn.ModuleDict()
        for kind, (d_out, d_in) in zip(layout.kinds, layout.kind_shapes, strict=True):
            key = DyPRAGLayout.key(kind)
            self.in_proj[key] = nn.Linear(hidden_size, h)
            self.layer_embedding[key] = nn.Parameter(torch.randn(len(layout.layers), h) * 0.5)
            a_head, b_head = nn.Linear(h, r * d_in), nn.Linear(h, d_out * r)
            nn.init.normal_(a_head.weight, std=1.0 / math.sqrt(h))
            nn.init.normal_(b_head.weight, std=config.init_b_std / math.sqrt(h))
            nn.init.zeros_(a_head.bias)
            nn.init.zeros_(b_head.bias)
            self.a_heads[key], self.b_heads[key] = a_head, b_head

    def forward(self, pooled: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Factors of every (layer, kind).

        Args:
            pooled: ``[C, D]``, one vector per chunk.

        Returns:
            Per kind (layout order): ``A [C, L, r, d_in]`` and ``B [C, L, d_out, r]``.
        """
        dtype = self.input_norm.weight.dtype
        s = self.input_norm(pooled.to(dtype))
        c, r = s.shape[0], self.rank
        out = []
        for kind, (d_out, d_in) in zip(self.kinds, self.kind_shapes, strict=True):
            key = DyPRAGLayout.key(kind)
            z = self.activation(
                self.in_proj[key](s)[:, None, :] + self.layer_embedding[key][None]
            )  # [C, L, h]
            n_layers = z.shape[1]
            A = self.a_heads[key](z).view(c, n_layers, r, d_in) / math.sqrt(d_in)
            B = self.b_heads[key](z).view(c, n_layers, d_out, r) / math.sqrt(r)
            out.append((A, B))
        return out


class DyPRAGModel(ChunkAlignmentMixin, ContextAdaptationModel):
    """DyPRAG (Tan et al., arXiv 2503.23895): a frozen base causal LM plus a single-vector parameter
    translator. A prior-generator baseline for CompAs and StreamAdapter, trained with the same data and
    trainer (``ctx2param train dyprag``).

    Build a fresh one with ``DyPRAGModel.from_base(base, DyPRAGConfig(...))``; load a trained one with
    ``AutoModelForContextAdaptation.from_pretrained(...)``. Adapters of separate passages (or of the chunks
    of a long one) are summed.

    Example:
        >>> a, b = model.generate_adapter(["Passage one ...", "Passage two ..."])
        >>> with model.adapted(a + b):
        ...     out = model.generate(**tok("Question: ...", return_tensors="pt"), max_new_tokens=8)
    """

    config_class = DyPRAGConfig

    def __init__(self, config: DyPRAGConfig, base_model: nn.Module, tokenizer: Any = None) -> None:
        super().__init__(config, base_model, tokenizer=tokenizer)
        self.layout = self._target_layout(DyPRAGLayout, base_model)
        self._check_chunk_window()
        num_layers = self._num_hidden_layers()
        if num_layers is not None and not -(num_layers + 1) <= config.pooling_layer <= num_layers:
            raise ValueError(
                f"pooling_layer={config.pooling_layer} is outside the base's {num_layers + 1} hidden states "
                f"(use -1 for the last layer, or 0..{num_layers})."
            )
        hidden_size = int(base_model.get_input_embeddings().embedding_dim)
        self.translator = DyPRAGTranslator(config, self.layout, hidden_size)
        self.register_buffer("_presence", self.layout.presence(), persistent=False)
        self.post_init()

    def parameter_breakdown(self) -> dict[str, int]:
        """Trainable parameters: the translator's input layers and embeddings, its output heads, total."""
        heads = sum(
            p.numel() for m in (self.translator.a_heads, self.translator.b_heads) for p in m.parameters()
        )
        return {
            "heads": heads,
            "input": self.num_method_parameters() - heads,
            "total": self.num_method_parameters(),
        }

    # ------------------------------------------------------------------------------ adapter generation
    def pooled_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[C, D]`` (float32): the mean over real tokens of the frozen base's hidden states at
        ``config.pooling_layer`` (no gradient; padding does not contribute)."""
        device = self.base_device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        layer = self.config.pooling_layer
        states = self.frozen_hidden_states(input_ids, attention_mask, all_layers=layer != -1)[layer]
        mask = attention_mask.to(torch.float32)[..., None]
        return (states.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def generate_factors(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-kind factors ``A [C, L, r, d_in]``, ``B [C, L, d_out, r]`` for a batch of chunks
        (differentiable in the translator's parameters)."""
        return self.translator(self.pooled_context(input_ids, attention_mask))
