"""``StackedAdapter``: a batch of adapters held as one factor pair per module kind (how training computes).

A generator whose heads are organised by module kind (CompAs, DyPRAG, StreamAdapter) makes, for a batch of
``N`` contexts and each kind ``k`` of a :class:`~ctx2param.modules.LayerKindLayout`, the factors of every
adapted layer at once::

    A_k [N, L, r, d_in_k]    B_k [N, L, d_out_k, r]    ΔW(n, layer j, kind k) = scale · B_k[n, j] A_k[n, j]

Kept stacked, what training does with them costs a few batched ops per kind instead of a Python loop over the
~200 target modules of a ``ContextAdapter``:

- per-example sums of chunk adapters (rank concatenation): :meth:`StackedAdapter.group_sum`;
- Frobenius inner products and norms from r × r Gram matrices: :meth:`StackedAdapter.dot`,
  :meth:`StackedAdapter.sq_norm`; weighted sums and differences: :meth:`StackedAdapter.combine`;
- injection into the base model: :func:`ctx2param.injection.attach_stacked_adapter` (each target module's
  hook reads its layer's slice, a view).

:meth:`StackedAdapter.to_adapter` gives the same ΔW as a public :class:`~ctx2param.adapter.ContextAdapter`.
(layer, kind) slots that are not target modules (a kind that some layer lacks) are left out there and weigh
zero in every reduction here (``presence``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .adapter import ContextAdapter, LoraFactors
from .modules import LayerKindLayout

__all__ = ["StackedAdapter"]

Factors = tuple[tuple[torch.Tensor, torch.Tensor], ...]


@dataclass(frozen=True)
class StackedAdapter:
    """``N`` adapters over the target modules of ``layout``, stacked per module kind.

    Attributes:
        layout: target modules by (layer position, kind position).
        factors: per kind (layout order): ``A [N, L, r, d_in]`` and ``B [N, L, d_out, r]``, every kind with
            the same ``N``, ``L = len(layout.layers)`` and ``r``.
        scale: ΔW = scale · B A.
        presence: ``[L, K]`` bool on the factors' device: which (layer, kind) slots are target modules
            (``None``: all of them).
        base_model, base_revision: the base model the adapters were made for (as in ``ContextAdapter``).
    """

    layout: LayerKindLayout
    factors: Factors
    scale: float = 1.0
    presence: torch.Tensor | None = None
    base_model: str | None = None
    base_revision: str | None = None

    def __post_init__(self) -> None:
        kinds = len(self.layout.kinds)
        if len(self.factors) != kinds:
            raise ValueError(
                f"StackedAdapter needs factors for {kinds} module kinds, got {len(self.factors)}."
            )
        n = rank = None
        for (A, B), (d_out, d_in), kind in zip(
            self.factors, self.layout.kind_shapes, self.layout.kinds, strict=True
        ):
            if A.dim() != 4 or B.dim() != 4:
                raise ValueError(f"Kind {kind!r}: A and B must be [N, L, r, d_in] / [N, L, d_out, r].")
            expected_a = (A.shape[0], len(self.layout.layers), A.shape[2], d_in)
            expected_b = (A.shape[0], len(self.layout.layers), d_out, A.shape[2])
            if tuple(A.shape) != expected_a or tuple(B.shape) != expected_b:
                raise ValueError(
                    f"Kind {kind!r}: got A {tuple(A.shape)} and B {tuple(B.shape)}; expected {expected_a} "
                    f"and {expected_b}."
                )
            if n is None:
                n, rank = A.shape[0], A.shape[2]
            elif (A.shape[0], A.shape[2]) != (n, rank):
                raise ValueError("Every kind of a StackedAdapter has the same batch size and rank.")

    # ---------------------------------------------------------------------------------------- properties
    @property
    def batch_size(self) -> int:
        return int(self.factors[0][0].shape[0])

    @property
    def rank(self) -> int:
        return int(self.factors[0][0].shape[2])

    @property
    def dtype(self) -> torch.dtype:
        return self.factors[0][0].dtype

    @property
    def device(self) -> torch.device:
        return self.factors[0][0].device

    def _with(
        self, factors: Sequence[tuple[torch.Tensor, torch.Tensor]], scale: float | None = None
    ) -> StackedAdapter:
        return StackedAdapter(
            self.layout,
            tuple(factors),
            self.scale if scale is None else scale,
            self.presence,
            self.base_model,
            self.base_revision,
        )

    def _weights(self, dtype: torch.dtype) -> torch.Tensor:
        """``[L, K]`` 0/1 weights of the slots (ones when every slot is a target module)."""
        if self.presence is None:
            return torch.ones(
                len(self.layout.layers), len(self.layout.kinds), dtype=dtype, device=self.device
            )
        return self.presence.to(dtype)

    # ------------------------------------------------------------------------------------------ algebra
    def select(self, index: torch.Tensor) -> StackedAdapter:
        """The adapters ``index [M]`` (a batched gather per kind)."""
        return self._with([(A[index], B[index]) for A, B in self.factors])

    def group_sum(
        self, group: torch.Tensor, slot: torch.Tensor, num_groups: int, num_slots: int
    ) -> StackedAdapter:
        """Per-group sums of the adapters, exactly (ranks concatenate): ``[G, L, S·r, ...]``.

        Adapter ``c`` is the ``slot[c]``-th member of group ``group[c]``; a group with fewer than ``S``
        members gets zero rank blocks. The rank index of member ``s``'s component ``i`` is ``s·r + i``, as in
        :func:`ctx2param.alignment.sum_chunk_adapters`. Differentiable; one scatter per kind.

        Args:
            group, slot: ``[C]`` long tensors on the factors' device.
            num_groups: ``G``; num_slots: ``S`` (at least ``slot.max() + 1``; given by the caller so that no
                value is read back from the device).
        """
        out = []
        for A, B in self.factors:
            c, n_layers, r, d_in = A.shape
            d_out = B.shape[2]
            a = A.new_zeros(num_groups, num_slots, n_layers, r, d_in).index_put((group, slot), A)
            b = B.new_zeros(num_groups, num_slots, n_layers, d_out, r).index_put((group, slot), B)
            out.append(
                (
                    a.permute(0, 2, 1, 3, 4).reshape(num_groups, n_layers, num_slots * r, d_in),
                    b.permute(0, 2, 3, 1, 4).reshape(num_groups, n_layers, d_out, num_slots * r),
                )
            )
        return self._with(out)

    def combine(self, others: Sequence[StackedAdapter], weights: Sequence[float]) -> StackedAdapter:
        """``weights[0] · self + Σ_i weights[i+1] · others[i]`` exactly (ranks concatenate; the weights are
        folded into B). Every adapter has the same layout and batch size."""
        parts = [self, *others]
        if len(weights) != len(parts):
            raise ValueError(f"combine() got {len(parts)} adapters and {len(weights)} weights.")
        out = []
        for k in range(len(self.factors)):
            As = [p.factors[k][0] for p in parts]
            Bs = [p.factors[k][1] * (w * p.scale) for p, w in zip(parts, weights, strict=True)]
            out.append((torch.cat(As, 2), torch.cat(Bs, 3)))
        return self._with(out, scale=1.0)

    def slot_products(self, other: StackedAdapter) -> torch.Tensor:
        """``[N, L, K]`` float32: ⟨ΔW_self, ΔW_other⟩ of every (layer, kind) slot, from r × r products (absent
        slots count zero). Computed in float32 (float64 for float64 factors) with autocast off."""
        work = torch.float64 if self.dtype == torch.float64 else torch.float32
        columns = []
        with torch.autocast(self.device.type, enabled=False):
            for (A, B), (A2, B2) in zip(self.factors, other.factors, strict=True):
                gram_b = B.to(work).mT @ B2.to(work)  # [N, L, r, r2]
                gram_a = A.to(work) @ A2.to(work).mT  # [N, L, r, r2]
                columns.append((gram_b * gram_a).sum((-2, -1)))  # [N, L]
            slots = torch.stack(columns, -1) * (self.scale * other.scale)  # [N, L, K]
        return slots * self._weights(work)

    def dot(self, other: StackedAdapter) -> torch.Tensor:
        """``[N]``: Σ over target modules of ⟨ΔW_self, ΔW_other⟩ (Frobenius), as ``ContextAdapter.dot``."""
        return self.slot_products(other).sum((1, 2))

    def sq_norm(self) -> torch.Tensor:
        """``[N]``: ‖ΔW‖²_F summed over the target modules."""
        return self.dot(self).clamp_min(0)

    # --------------------------------------------------------------------------------------- conversion
    def detach(self) -> StackedAdapter:
        return self._with([(A.detach(), B.detach()) for A, B in self.factors])

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> StackedAdapter:
        moved = StackedAdapter(
            self.layout,
            tuple(
                (A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)) for A, B in self.factors
            ),
            self.scale,
            None if self.presence is None else self.presence.to(device=device),
            self.base_model,
            self.base_revision,
        )
        return moved

    def to_adapter(self) -> ContextAdapter:
        """The same ΔW as a batched :class:`~ctx2param.adapter.ContextAdapter` ``[N, ...]`` (target modules
        only; the factors are views of these)."""
        out = {}
        for name, (layer, kind) in self.layout.positions.items():
            A, B = self.factors[kind]
            out[name] = LoraFactors(A[:, layer], B[:, layer], self.scale)
        return ContextAdapter(out, self.base_model, self.base_revision)

    @classmethod
    def from_adapter(
        cls, adapter: ContextAdapter, layout: LayerKindLayout, presence: torch.Tensor | None = None
    ) -> StackedAdapter:
        """Stack a batched :class:`~ctx2param.adapter.ContextAdapter` whose modules are ``layout``'s targets
        (slots that are not targets get zero factors). Every module must have the same rank and scale."""
        if adapter.batch_size is None:
            raise ValueError("StackedAdapter.from_adapter needs a batched adapter (use stack([...]) first).")
        if set(adapter) != set(layout.positions):
            raise ValueError("The adapter's modules are not the layout's target modules.")
        scales = {f.scale for f in adapter.values()}
        ranks = {f.rank for f in adapter.values()}
        if len(scales) != 1 or len(ranks) != 1:
            raise ValueError("StackedAdapter.from_adapter needs one rank and one scale for every module.")
        n, r = adapter.batch_size, ranks.pop()
        layers = len(layout.layers)
        factors = []
        for k, (d_out, d_in) in enumerate(layout.kind_shapes):
            A = torch.zeros(n, layers, r, d_in, dtype=adapter.dtype, device=adapter.device)
            B = torch.zeros(n, layers, d_out, r, dtype=adapter.dtype, device=adapter.device)
            for name, (layer, kind) in layout.positions.items():
                if kind == k:
                    A[:, layer] = adapter[name].A
                    B[:, layer] = adapter[name].B
            factors.append((A, B))
        return cls(layout, tuple(factors), scales.pop(), presence, adapter.base_model, adapter.base_revision)
