"""The CompAs decoder: reads a ΔW through learned probes into a soft prompt for the base model.

Features are bilinear probes of each module's update, ``φ = Qᵀ ΔW P = scale · (Qᵀ B)(A P)`` with ``P``
``[d_in, p]`` and ``Q`` ``[d_out, q]`` learned per module kind (shared across layers). They are computed
from the factors only (r × p and q × r products), are linear in ΔW and so do not depend on how ΔW is
factored: ``features(a + b) == features(a) + features(b)`` exactly (up to rounding), whatever the ranks.
Each layer's features (all kinds, ``K · q · p`` numbers) go through a small MLP (with a layer embedding) to
``tokens_per_layer`` soft-prompt vectors, normalised to the scale of the base model's token embeddings.
The base model reads that prompt with a small LoRA of its own (the decoder's parameters, applied with
:func:`~ctx2param.apply_adapter` only while decoding) and writes the context back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ...adapter import ContextAdapter, LoraFactors
from ...errors import AdapterMismatchError

__all__ = ["CompAsDecoder"]


class CompAsDecoder(nn.Module):
    """ΔW → features (linear in ΔW) → soft prompt ``[N, num_layers · tokens_per_layer, hidden]``.

    Args:
        kinds: ``(d_out, d_in)`` of each module kind, in the layout's kind order.
        positions: ``{module name: (layer position, kind position)}`` of every target module.
        num_layers: number of adapted layers.
        hidden_size: the base model's embedding width ``D``.
        embed_rms: typical RMS of the base model's input embeddings (the soft prompt's initial scale).
        lora_shapes: ``{module name: (d_out, d_in)}`` of the decoder's own LoRA on the base model.
        probes, probe_outputs, tokens_per_layer, mlp_hidden, lora_rank: see
            :class:`~ctx2param.models.compas.CompAsConfig` (``decoder_*``).
    """

    def __init__(
        self,
        kinds: Sequence[tuple[int, int]],
        positions: Mapping[str, tuple[int, int]],
        num_layers: int,
        hidden_size: int,
        embed_rms: float,
        lora_shapes: Mapping[str, tuple[int, int]],
        probes: int,
        probe_outputs: int,
        tokens_per_layer: int,
        mlp_hidden: int,
        lora_rank: int,
    ) -> None:
        super().__init__()
        self.kinds = [tuple(k) for k in kinds]
        self.positions = dict(positions)
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.tokens_per_layer = tokens_per_layer
        p, q = probes, probe_outputs
        self.probe_in = nn.ParameterList(
            [nn.Parameter(torch.randn(d_in, p) / math.sqrt(d_in)) for _, d_in in self.kinds]
        )
        self.probe_out = nn.ParameterList(
            [nn.Parameter(torch.randn(d_out, q) / math.sqrt(d_out)) for d_out, _ in self.kinds]
        )
        feature_dim = len(self.kinds) * q * p
        self.feature_norm = nn.LayerNorm(feature_dim)
        self.proj_in = nn.Linear(feature_dim, mlp_hidden)
        self.layer_embedding = nn.Parameter(torch.randn(num_layers, mlp_hidden) * 0.02)
        self.proj_out = nn.Linear(mlp_hidden, tokens_per_layer * hidden_size)
        nn.init.normal_(self.proj_out.weight, std=0.02)
        nn.init.zeros_(self.proj_out.bias)
        self.token_embedding = nn.Parameter(torch.randn(num_layers * tokens_per_layer, hidden_size))
        self.output_gain = nn.Parameter(torch.full((hidden_size,), float(embed_rms)))
        # the decoder's own LoRA on the base model: A random, B zero (standard LoRA start)
        self.lora_names = list(lora_shapes)
        self.lora_A = nn.ParameterList(
            [
                nn.Parameter((torch.rand(lora_rank, d_in) * 2 - 1) / math.sqrt(d_in))
                for _, d_in in lora_shapes.values()
            ]
        )
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(d_out, lora_rank)) for d_out, _ in lora_shapes.values()]
        )

    @property
    def prompt_length(self) -> int:
        """Number of soft-prompt vectors ``S = num_layers · tokens_per_layer``."""
        return self.num_layers * self.tokens_per_layer

    # ------------------------------------------------------------------------------------------ features
    def kind_features(self, kind: int, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        """Features of one kind's updates: ``scale · (Qᵀ B)(A P)``.

        Args:
            kind: position of the module kind.
            A: ``[..., r, d_in]``; B: ``[..., d_out, r]`` (any leading dimensions, e.g. ``[N, L]``).

        Returns:
            ``[..., q, p]`` in float32 (float64 for float64 factors).
        """
        work = torch.float64 if A.dtype == torch.float64 else torch.float32
        P = self.probe_in[kind].to(work)
        Q = self.probe_out[kind].to(work)
        left = torch.matmul(Q.T, B.to(work))  # [..., q, r]
        right = torch.matmul(A.to(work), P)  # [..., r, p]
        return torch.matmul(left, right) * scale

    def features(self, adapter: ContextAdapter) -> torch.Tensor:
        """Per-layer features of an adapter: ``[N, num_layers, K·q·p]`` (N = 1 for a single adapter).

        Linear in ΔW: the features of ``a + b`` are those of ``a`` plus those of ``b``. Modules missing from a
        layer (a kind a layer does not have) contribute zeros.
        """
        self.check_adapter(adapter)
        batch = adapter.batch_size
        n = 1 if batch is None else batch
        device = self.probe_in[0].device
        grid: list[list[torch.Tensor | None]] = [[None] * len(self.kinds) for _ in range(self.num_layers)]
        for name, (layer, kind) in self.positions.items():
            f = adapter[name]
            A, B = f.A.to(device), f.B.to(device)
            if batch is None:
                A, B = A.unsqueeze(0), B.unsqueeze(0)
            grid[layer][kind] = self.kind_features(kind, A, B, f.scale)  # [N, q, p]
        q, p = self.probe_out[0].shape[1], self.probe_in[0].shape[1]
        zero = None
        rows = []
        for layer in range(self.num_layers):
            cells = []
            for cell in grid[layer]:
                if cell is None:
                    if zero is None:
                        work = torch.float64 if adapter.dtype == torch.float64 else torch.float32
                        zero = torch.zeros(n, q, p, device=device, dtype=work)
                    cell = zero
                cells.append(cell.reshape(n, q * p))
            rows.append(torch.cat(cells, -1))
        return torch.stack(rows, 1)

    def check_adapter(self, adapter: ContextAdapter) -> None:
        """Raise :class:`AdapterMismatchError` unless ``adapter`` has exactly this decoder's modules."""
        if not isinstance(adapter, ContextAdapter):
            raise TypeError(f"decode_context needs a ContextAdapter, got {type(adapter).__name__}.")
        if set(adapter) != set(self.positions):
            missing = sorted(set(self.positions) - set(adapter))[:3]
            extra = sorted(set(adapter) - set(self.positions))[:3]
            raise AdapterMismatchError(
                f"This CompAs decoder reads adapters over its generator's {len(self.positions)} target "
                f"modules; the adapter has {len(adapter)} (missing {missing}, extra {extra}). Decode "
                "adapters made by this generator (or sums of them)."
            )
        for name, f in adapter.items():
            layer, kind = self.positions[name]
            if tuple(f.shape) != tuple(self.kinds[kind]):
                raise AdapterMismatchError(
                    f"Module {name!r}: the adapter's ΔW is {f.shape}, the decoder expects {self.kinds[kind]}."
                )

    # -------------------------------------------------------------------------------------- soft prompt
    def prompt_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, num_layers, F]`` features → soft prompt ``[N, S, D]`` in the decoder's dtype."""
        dtype = self.proj_in.weight.dtype
        x = self.feature_norm(features.to(dtype))
        x = torch.nn.functional.gelu(self.proj_in(x) + self.layer_embedding)
        x = self.proj_out(x)  # [N, L, t·D]
        x = x.reshape(x.shape[0], self.prompt_length, self.hidden_size) + self.token_embedding
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * self.output_gain

    def soft_prompt(self, adapter: ContextAdapter) -> torch.Tensor:
        """The soft prompt ``[N, S, D]`` of an adapter (N = 1 for a single adapter)."""
        return self.prompt_from_features(self.features(adapter))

    def lora_adapter(self, base_model: str | None = None) -> ContextAdapter:
        """The decoder's own LoRA on the base model (parameters, so gradients reach it)."""
        return ContextAdapter(
            {
                name: LoraFactors(A, B, 1.0)
                for name, A, B in zip(self.lora_names, self.lora_A, self.lora_B, strict=True)
            },
            base_model=base_model,
        )
