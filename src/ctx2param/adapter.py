"""``ContextAdapter``: per-module low-rank weight updates, their exact algebra, and their files.

An adapter maps target-module names (as in ``model.named_modules()`` of the causal LM) to factors
``A [r, d_in]``, ``B [d_out, r]`` and a float ``scale``, so that ΔW = scale · B A for each module. With a
leading batch dimension (``A [N, r, d_in]``, ``B [N, d_out, r]``) it holds one adapter per example of a
batch. The algebra is exact in ΔW: ``a + b`` concatenates ranks, ``c * a`` scales, ``compress(r)`` gives the
best rank-r approximation from the factors alone, and norms and inner products use only r × r products.

Files: the project's own format (``adapter.safetensors`` + ``ctx2param_adapter.json`` with a schema version
and a SHA-256 of the tensors) or a standard PEFT LoRA folder (``adapter_config.json`` +
``adapter_model.safetensors``), read and written. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import AdapterFileError, AdapterMismatchError, Ctx2ParamError, PublishError
from .file_utils import sha256_file, write_folder_atomically
from .modules import target_module_shapes

ADAPTER_SCHEMA_VERSION = 1
ADAPTER_CONFIG_NAME = "ctx2param_adapter.json"
ADAPTER_WEIGHTS_NAME = "adapter.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLE_NAME = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."

__all__ = ["ContextAdapter", "LoraFactors", "compose", "register_card_renderer", "stack"]

#: What :meth:`ContextAdapter.push_to_hub` renders its model card with: ``cards.render_adapter_card``,
#: registered by :func:`register_card_renderer` when ``ctx2param.cards`` is imported (``import ctx2param``
#: does). A hook rather than an import: the card code sits above the adapter (it reads adapters), so this
#: module never imports it and the two do not import each other.
_CARD_RENDERER: Any = None


def register_card_renderer(renderer: Any) -> None:
    """Make ``renderer(adapter, **card_data) -> str`` what ``push_to_hub`` writes as the README.md."""
    global _CARD_RENDERER
    if not callable(renderer):
        raise TypeError(f"The card renderer must be callable, got {type(renderer).__name__}.")
    _CARD_RENDERER = renderer


@dataclass(frozen=True)
class LoraFactors:
    """Factors of one module's update: ΔW = scale · B A.

    Attributes:
        A: ``[r, d_in]`` or ``[N, r, d_in]`` (batched).
        B: ``[d_out, r]`` or ``[N, d_out, r]`` (batched).
        scale: multiplies B A.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[-2])

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)``, the shape of ΔW."""
        return int(self.B.shape[-2]), int(self.A.shape[-1])

    @property
    def batch_size(self) -> int | None:
        return int(self.A.shape[0]) if self.A.dim() == 3 else None

    def delta_weight(self) -> torch.Tensor:
        """Dense ΔW: ``[d_out, d_in]`` or ``[N, d_out, d_in]``."""
        return self.scale * (self.B @ self.A)

    def folded(self) -> LoraFactors:
        """Same ΔW with the scale moved into B (scale 1)."""
        return self if self.scale == 1.0 else LoraFactors(self.A, self.B * self.scale, 1.0)


def _as_scalar(value: Any) -> float | None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return float(value.item())
    return None


def _pad_rank(factors: LoraFactors, rank: int) -> LoraFactors:
    """Zero-pad to ``rank`` (exact: zero rank components add nothing to ΔW)."""
    missing = rank - factors.rank
    if missing <= 0:
        return factors
    A = torch.cat([factors.A, factors.A.new_zeros(*factors.A.shape[:-2], missing, factors.A.shape[-1])], -2)
    B = torch.cat([factors.B, factors.B.new_zeros(*factors.B.shape[:-1], missing)], -1)
    return LoraFactors(A, B, factors.scale)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


#: A folder of the Hugging Face cache: ``.../models--<org>--<name>/snapshots/<revision>``.
_HF_CACHE_SNAPSHOT = re.compile(r"/models--(?P<repo>[^/]+)/snapshots/[^/]+/?$")


def normalize_base_id(base: str | os.PathLike | None) -> tuple[str, str] | None:
    """The key under which ctx2param compares the base model an adapter names; ``None`` for no id.

    - A local folder (an existing folder, an absolute path, or a path starting with ``.`` or ``~``) is
      ``("path", <its real absolute path>)``: ``out/base``, ``./out/base``, its absolute path and a symlink
      to it are the same base.
    - A folder of the Hugging Face cache (``.../models--org--name/snapshots/<revision>``) is the Hub id it
      caches, so a model loaded by id and one loaded from its cached snapshot are the same base.
    - Anything else is a Hub id, ``("hub", <id in lower case>)``: the Hub resolves ids case-insensitively.

    Two ids are different bases only when both are known and of the same kind (:func:`bases_differ`): a Hub
    id and a local folder that is not its cache snapshot cannot be told apart (a folder may hold a copy of
    that Hub model), so they are accepted, like adapters that name no base at all.
    """
    if base is None:
        return None
    text = os.fspath(base).strip()
    if not text:
        return None
    expanded = os.path.expanduser(text)
    if os.path.isabs(expanded) or text.startswith((".", "~")) or "\\" in text or os.path.isdir(expanded):
        real = os.path.realpath(expanded)
        cached = _HF_CACHE_SNAPSHOT.search(real.replace(os.sep, "/"))
        if cached:
            return "hub", cached.group("repo").replace("--", "/").lower()
        return "path", os.path.normcase(real)
    return "hub", text.lower()


def bases_differ(first: str | os.PathLike | None, second: str | os.PathLike | None) -> bool:
    """True when two base-model ids certainly name different models (see :func:`normalize_base_id`)."""
    a, b = normalize_base_id(first), normalize_base_id(second)
    return a is not None and b is not None and a[0] == b[0] and a != b


def _common_base(adapters: Sequence[ContextAdapter], what: str) -> tuple[str | None, str | None]:
    """The base id and revision shared by ``adapters`` (the first one named); every pair is checked, so a
    first adapter that names no base cannot hide two later ones that disagree."""
    bases: list[str] = []
    for adapter in adapters:
        if not adapter.base_model:
            continue
        for seen in bases:
            if bases_differ(seen, adapter.base_model):
                raise AdapterMismatchError(
                    f"Cannot {what} adapters made for different base models: {seen!r} vs "
                    f"{adapter.base_model!r}."
                )
        bases.append(adapter.base_model)
    revisions = list(dict.fromkeys(a.base_revision for a in adapters if a.base_revision))
    if len(revisions) > 1:
        raise AdapterMismatchError(
            f"Cannot {what} adapters made for different revisions of {bases[0] if bases else 'the base'!r}: "
            f"{revisions}."
        )
    return (bases[0] if bases else None), (revisions[0] if revisions else None)


def _first_nonfinite(
    factors: Mapping[str, LoraFactors], skip_grad: bool = True
) -> tuple[str, str, int] | None:
    """``(module, "A" or "B", number of bad entries)`` of the first factor holding NaN or ±Inf, else ``None``.

    Every factor's ``isfinite(...).all()`` is reduced on its device and stacked, then read with a single
    host sync; only when that fails are the factors searched for the culprit. With ``skip_grad``, an adapter
    any of whose factors requires grad (an autograd graph: inside training, where a sync per step would
    cost throughput) is not checked at all. Meta tensors and code being compiled are never checked.
    """
    if torch.compiler.is_compiling():
        return None
    pairs = [(name, which, t) for name, f in factors.items() for which, t in (("A", f.A), ("B", f.B))]
    if skip_grad and any(t.requires_grad for _, _, t in pairs):
        return None
    named = [(name, which, t) for name, which, t in pairs if t.device.type != "meta"]
    if not named:
        return None
    flags = torch.stack([torch.isfinite(t).all() for _, _, t in named])
    if bool(flags.all()):  # the one host sync
        return None
    name, which, tensor = named[int((~flags).nonzero()[0, 0])]
    return name, which, int((~torch.isfinite(tensor)).sum())


def _nonfinite_message(found: tuple[str, str, int]) -> str:
    name, which, count = found
    return (
        f"Module {name!r}: factor {which} holds {count} NaN or infinite value(s). An adapter's factors must "
        "be finite: whatever produced them diverged (check the generator, the learning rate or the inputs)."
    )


class ContextAdapter(Mapping[str, LoraFactors]):
    """A read-only mapping from target-module name to :class:`LoraFactors`, with exact ΔW algebra.

    Args:
        factors: ``{module name: LoraFactors}``; all modules share dtype, device and batch size.
        base_model: id or path of the base model the adapter was made for (checked on every operation).
        base_revision: that base model's revision, when known.
        metadata: free JSON-serialisable information (e.g. how a context was chunked).
        check_finite: refuse factors holding NaN or ±Inf (a ``ValueError`` naming the module), with one host
            sync per adapter. An adapter with factors that require grad is not checked (inside training the
            check would cost a sync per step); saving checks every factor. Adapters derived from checked ones
            by the algebra (``+``, ``*``, ``compose``, ``stack``, ``unbind``, ...) are not checked again.

    Example:
        >>> merged = a + 0.5 * b          # ΔW_a + 0.5 ΔW_b, exactly (ranks concatenate)
        >>> small = merged.compress(8)    # best rank-8 approximation of that ΔW
    """

    def __init__(
        self,
        factors: Mapping[str, LoraFactors],
        base_model: str | None = None,
        base_revision: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        check_finite: bool = True,
    ) -> None:
        if not factors:
            raise ValueError("A ContextAdapter needs at least one target module; got an empty mapping.")
        first_name, first = next(iter(factors.items()))
        for name, f in factors.items():
            if not isinstance(f, LoraFactors):
                raise TypeError(f"Module {name!r}: expected LoraFactors, got {type(f).__name__}.")
            if f.A.dim() not in (2, 3) or f.A.dim() != f.B.dim():
                raise ValueError(
                    f"Module {name!r}: A and B must both be 2-D ([r, d_in], [d_out, r]) or both 3-D "
                    f"(batched); got A {tuple(f.A.shape)} and B {tuple(f.B.shape)}."
                )
            if f.A.shape[-2] != f.B.shape[-1] or f.A.shape[:-2] != f.B.shape[:-2]:
                raise ValueError(
                    f"Module {name!r}: A {tuple(f.A.shape)} and B {tuple(f.B.shape)} disagree on the rank "
                    "(A is [..., r, d_in], B is [..., d_out, r]) or on the batch size."
                )
            if f.A.dtype != f.B.dtype or f.A.device != f.B.device:
                raise ValueError(f"Module {name!r}: A and B differ in dtype or device.")
            if not f.A.is_floating_point():
                raise ValueError(f"Module {name!r}: factors must be floating point, got {f.A.dtype}.")
            if f.batch_size != first.batch_size:
                raise ValueError(
                    f"Modules {first_name!r} and {name!r} have batch sizes {first.batch_size} and "
                    f"{f.batch_size}; every module of an adapter has the same batch size."
                )
            if f.A.dtype != first.A.dtype or f.A.device != first.A.device:
                raise ValueError(
                    f"Modules {first_name!r} and {name!r} differ in dtype or device "
                    f"({first.A.dtype}/{first.A.device} vs {f.A.dtype}/{f.A.device})."
                )
            if not math.isfinite(f.scale):
                raise ValueError(f"Module {name!r}: scale must be finite, got {f.scale}.")
        if check_finite and (found := _first_nonfinite(factors)) is not None:
            raise ValueError(_nonfinite_message(found))
        self._factors: dict[str, LoraFactors] = dict(factors)
        self.base_model = base_model
        self.base_revision = base_revision
        self.metadata: dict[str, Any] = dict(metadata or {})

    # ----------------------------------------------------------------------------------------- mapping
    def __getitem__(self, name: str) -> LoraFactors:
        try:
            return self._factors[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a target module of this adapter (it has {len(self)}).") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._factors)

    def __len__(self) -> int:
        return len(self._factors)

    def __repr__(self) -> str:
        batch = f", batch_size={self.batch_size}" if self.batch_size is not None else ""
        return (
            f"ContextAdapter(modules={len(self)}, rank={self.rank}{batch}, dtype={self.dtype}, "
            f"device={self.device}, base_model={self.base_model!r})"
        )

    # -------------------------------------------------------------------------------------- properties
    @property
    def _first(self) -> LoraFactors:
        return next(iter(self._factors.values()))

    @property
    def dtype(self) -> torch.dtype:
        return self._first.A.dtype

    @property
    def device(self) -> torch.device:
        return self._first.A.device

    @property
    def batch_size(self) -> int | None:
        """``N`` for per-example adapters, ``None`` for a single adapter."""
        return self._first.batch_size

    @property
    def rank(self) -> int:
        """The largest rank over modules."""
        return max(f.rank for f in self._factors.values())

    @property
    def ranks(self) -> dict[str, int]:
        return {name: f.rank for name, f in self._factors.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{name: (d_out, d_in)}``."""
        return {name: f.shape for name, f in self._factors.items()}

    def num_parameters(self) -> int:
        return sum(f.A.numel() + f.B.numel() for f in self._factors.values())

    def delta_weight(self, name: str) -> torch.Tensor:
        """Dense ΔW of one module: ``[d_out, d_in]`` (or ``[N, d_out, d_in]`` when batched)."""
        return self[name].delta_weight()

    # -------------------------------------------------------------------------------------- conversion
    def _with(
        self,
        factors: Mapping[str, LoraFactors],
        metadata: Mapping[str, Any] | None = None,
        check_finite: bool = False,
    ) -> ContextAdapter:
        """An adapter derived from this one (same base); finite factors stay finite, so not re-checked."""
        return ContextAdapter(
            factors, self.base_model, self.base_revision, metadata, check_finite=check_finite
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ContextAdapter:
        """A copy on ``device`` and/or in ``dtype`` (differentiable, like ``Tensor.to``)."""
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"Adapter factors must be floating point; cannot convert to {dtype}.")
        return self._with(
            {
                n: LoraFactors(
                    f.A.to(device=device, dtype=dtype), f.B.to(device=device, dtype=dtype), f.scale
                )
                for n, f in self._factors.items()
            },
            self.metadata,
            check_finite=dtype is not None and dtype != self.dtype,  # a narrower dtype may overflow
        )

    def detach(self) -> ContextAdapter:
        """A copy whose factors are cut from the autograd graph."""
        return self._with(
            {n: LoraFactors(f.A.detach(), f.B.detach(), f.scale) for n, f in self._factors.items()},
            self.metadata,
        )

    def folded(self) -> ContextAdapter:
        """Same ΔW with every scale moved into B (scale 1)."""
        return self._with({n: f.folded() for n, f in self._factors.items()}, self.metadata)

    # ------------------------------------------------------------------------------------- compatibility
    def check_compatible(self, other: ContextAdapter, what: str = "combine") -> None:
        """Raise :class:`AdapterMismatchError` naming the first way ``other`` does not fit this adapter."""
        if not isinstance(other, ContextAdapter):
            raise TypeError(f"Cannot {what} a ContextAdapter with {type(other).__name__}.")
        if bases_differ(self.base_model, other.base_model):  # a folder and its absolute path are one base
            raise AdapterMismatchError(
                f"Cannot {what} adapters made for different base models: {self.base_model!r} vs "
                f"{other.base_model!r}."
            )
        if self.base_revision and other.base_revision and self.base_revision != other.base_revision:
            raise AdapterMismatchError(
                f"Cannot {what} adapters made for different revisions of {self.base_model!r}: "
                f"{self.base_revision!r} vs {other.base_revision!r}."
            )
        if set(self) != set(other):
            missing = sorted(set(self) - set(other))[:3]
            extra = sorted(set(other) - set(self))[:3]
            raise AdapterMismatchError(
                f"Cannot {what} adapters with different target modules: only in the first {missing}, "
                f"only in the second {extra} ({len(self)} vs {len(other)} modules)."
            )
        for name, f in self._factors.items():
            if other[name].shape != f.shape:
                raise AdapterMismatchError(
                    f"Cannot {what} adapters: module {name!r} has ΔW shape {f.shape} in one and "
                    f"{other[name].shape} in the other."
                )
        if self.dtype != other.dtype:
            raise AdapterMismatchError(
                f"Cannot {what} adapters of dtype {self.dtype} and {other.dtype}; convert one first, "
                f"e.g. b.to(dtype={self.dtype})."
            )
        if self.device != other.device:
            raise AdapterMismatchError(
                f"Cannot {what} adapters on {self.device} and {other.device}; move one first, "
                f"e.g. b.to('{self.device}')."
            )
        if (
            self.batch_size is not None
            and other.batch_size is not None
            and self.batch_size != other.batch_size
        ):
            raise AdapterMismatchError(
                f"Cannot {what} batched adapters of batch sizes {self.batch_size} and {other.batch_size}."
            )

    # ------------------------------------------------------------------------------------------ algebra
    def __add__(self, other: Any) -> ContextAdapter:
        """ΔW_self + ΔW_other exactly: the ranks concatenate. For many adapters use :func:`compose`, which
        concatenates once per module (``sum([...])`` copies the growing running sum at every ``+``)."""
        if not isinstance(other, ContextAdapter):
            return NotImplemented
        return _concatenate([self, other], [1.0, 1.0], "add")

    def __radd__(self, other: Any) -> ContextAdapter:
        if isinstance(other, numbers.Number) and other == 0:  # sum([...]) starts from 0
            return self
        return NotImplemented

    def __mul__(self, c: Any) -> ContextAdapter:
        scalar = _as_scalar(c)
        if scalar is None:
            return NotImplemented
        if not math.isfinite(scalar):
            raise ValueError(f"Cannot scale an adapter by {scalar}.")
        return self._with({n: LoraFactors(f.A, f.B, f.scale * scalar) for n, f in self._factors.items()})

    __rmul__ = __mul__

    def __truediv__(self, c: Any) -> ContextAdapter:
        scalar = _as_scalar(c)
        if scalar is None:
            return NotImplemented
        if scalar == 0:
            raise ZeroDivisionError("Cannot divide an adapter by zero.")
        return self * (1.0 / scalar)

    def __neg__(self) -> ContextAdapter:
        return self * -1.0

    def __sub__(self, other: Any) -> ContextAdapter:
        if not isinstance(other, ContextAdapter):
            return NotImplemented
        return self + (-other)

    def compress(self, rank: int) -> ContextAdapter:
        """Best rank-``rank`` approximation of ΔW (Frobenius), module by module, from the factors alone.

        QR of B ``[d_out, R]`` and of Aᵀ ``[d_in, R]``, then an SVD of the small ``[R, R]`` core. Exact (up to
        floating-point rounding) when the rank already fits. Singular values are split evenly between the
        new A and B. Computed in float32 (float64 for float64 adapters) and returned in the adapter's dtype.
        """
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"compress(rank) needs a positive integer rank, got {rank!r}.")
        out = {}
        for name, f in self._factors.items():
            work = _compute_dtype(f.A.dtype)
            A, B = f.A.to(work), f.B.to(work) * f.scale
            q_b, r_b = torch.linalg.qr(B)  # [.., d_out, k1], [.., k1, R]
            q_a, r_a = torch.linalg.qr(A.mT)  # [.., d_in, k2], [.., k2, R]
            u, s, vh = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)  # core [.., k1, k2]
            k = min(rank, s.shape[-1])
            root = s[..., :k].sqrt()
            new_b = q_b @ (u[..., :, :k] * root[..., None, :])  # [.., d_out, k]
            new_a = (vh[..., :k, :] * root[..., :, None]) @ q_a.mT  # [.., k, d_in]
            out[name] = LoraFactors(new_a.to(f.A.dtype), new_b.to(f.B.dtype), 1.0)
        return self._with(out, self.metadata)

    def dot(self, other: ContextAdapter) -> torch.Tensor:
        """Frobenius inner product Σ_modules ⟨ΔW_a, ΔW_b⟩ from r × r products: 0-d, or ``[N]`` if batched."""
        self.check_compatible(other, "take the inner product of")
        total = None
        for name, fa in self._factors.items():
            fb = other[name]
            work = _compute_dtype(fa.A.dtype)
            gram_b = fa.B.to(work).mT @ fb.B.to(work)  # [.., Ra, Rb]
            gram_a = fa.A.to(work) @ fb.A.to(work).mT  # [.., Ra, Rb]
            term = (gram_b * gram_a).sum((-2, -1)) * (fa.scale * fb.scale)
            total = term if total is None else total + term
        return total

    def norm(self) -> torch.Tensor:
        """Frobenius norm of ΔW over all modules: 0-d, or ``[N]`` when batched."""
        return self.dot(self).clamp_min(0).sqrt()

    def cosine(self, other: ContextAdapter, eps: float = 1e-12) -> torch.Tensor:
        """Cosine similarity of the two ΔW (all modules flattened together)."""
        return self.dot(other) / (self.norm() * other.norm()).clamp_min(eps)

    def unbind(self) -> list[ContextAdapter]:
        """Split a batched adapter into its ``N`` single adapters."""
        if self.batch_size is None:
            raise ValueError("unbind() needs a batched adapter (factors with a leading batch dimension).")
        return [
            self._with(
                {n: LoraFactors(f.A[i], f.B[i], f.scale) for n, f in self._factors.items()}, self.metadata
            )
            for i in range(self.batch_size)
        ]

    # ------------------------------------------------------------------------------------- construction
    @classmethod
    def random(
        cls,
        model: torch.nn.Module | Mapping[str, tuple[int, int]],
        rank: int = 8,
        target_modules: str | Iterable[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
        scale: float = 1.0,
        seed: int | None = 0,
        std: float = 0.02,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        base_model: str | None = None,
    ) -> ContextAdapter:
        """A random adapter (A, B ~ N(0, std²)) for ``model``'s target modules or ``{name: (d_out, d_in)}``.

        Useful as a starting point for optimisation (set ``requires_grad_`` on the factors) and in tests.
        """
        if isinstance(model, torch.nn.Module):
            shapes = target_module_shapes(model, target_modules)
            base_model = base_model or getattr(model, "name_or_path", None) or None
            if device is None:
                device = next(model.parameters()).device
        else:
            shapes = dict(model)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        factors = {
            name: LoraFactors(
                (torch.randn(rank, d_in, generator=gen) * std).to(device=device, dtype=dtype),
                (torch.randn(d_out, rank, generator=gen) * std).to(device=device, dtype=dtype),
                scale,
            )
            for name, (d_out, d_in) in shapes.items()
        }
        return cls(factors, base_model=base_model)

    @classmethod
    def zeros_like(cls, other: ContextAdapter, rank: int = 1) -> ContextAdapter:
        """An adapter with ΔW = 0 on the same modules (identity of ``+``)."""
        f0 = other._first
        lead = f0.A.shape[:-2]
        factors = {
            n: LoraFactors(
                f.A.new_zeros(*lead, rank, f.shape[1]), f.B.new_zeros(*lead, f.shape[0], rank), 1.0
            )
            for n, f in other.items()
        }
        return cls(factors, other.base_model, other.base_revision, check_finite=False)

    # --------------------------------------------------------------------------------------------- files
    def save_pretrained(self, save_directory: str | os.PathLike, format: str = "ctx2param") -> Path:
        """Write the adapter to a folder, atomically: after a crash the folder holds the previous save or
        this one, complete (:func:`~ctx2param.file_utils.write_folder_atomically`); the other format's files
        of an earlier save go, other files in the folder stay.

        Args:
            save_directory: folder to create or update.
            format: ``"ctx2param"`` (``adapter.safetensors`` + ``ctx2param_adapter.json``; keeps batch
                dimension, per-module scales and metadata) or ``"peft"`` (a standard PEFT LoRA folder that
                ``peft.PeftModel.from_pretrained`` loads; scales are folded into B).

        Raises:
            ValueError: a factor holds NaN or ±Inf (the module is named; nothing is written).
        """
        if format not in ("ctx2param", "peft"):
            raise ValueError(f"Unknown adapter format {format!r}; use 'ctx2param' or 'peft'.")
        if (found := _first_nonfinite(self._factors, skip_grad=False)) is not None:
            raise ValueError(f"Not saving the adapter: {_nonfinite_message(found)}")
        if format == "ctx2param":
            return write_folder_atomically(
                save_directory,
                tensors={ADAPTER_WEIGHTS_NAME: self._tensors()},
                jsons={ADAPTER_CONFIG_NAME: self._own_header()},
                checksums_into=ADAPTER_CONFIG_NAME,
                remove=(PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, PEFT_PICKLE_NAME),
            )
        if format == "peft":
            tensors, config = self._peft_files()
            return write_folder_atomically(
                save_directory,
                tensors={PEFT_WEIGHTS_NAME: tensors},
                jsons={PEFT_CONFIG_NAME: config},
                remove=(ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_PICKLE_NAME),
            )
        raise ValueError(f"Unknown adapter format {format!r}; use 'ctx2param' or 'peft'.")

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, f in self._factors.items():
            tensors[f"{name}.lora_A"] = f.A
            tensors[f"{name}.lora_B"] = f.B
        return tensors

    def _own_header(self) -> dict[str, Any]:
        from . import __version__

        return {
            "format": "ctx2param-adapter",
            "schema_version": ADAPTER_SCHEMA_VERSION,
            "ctx2param_version": __version__,
            "base_model": self.base_model,
            "base_revision": self.base_revision,
            "dtype": str(self.dtype).removeprefix("torch."),
            "batch_size": self.batch_size,
            "rank": self.rank,
            "modules": {
                n: {"shape": list(f.shape), "rank": f.rank, "scale": f.scale} for n, f in self.items()
            },
            "metadata": self.metadata,
        }

    def _peft_files(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.batch_size is not None:
            raise ValueError("A batched adapter cannot be saved as one PEFT LoRA; save each of .unbind().")
        rank = self.rank
        tensors = {}
        for name, f in self._factors.items():
            padded = _pad_rank(f.folded(), rank)
            tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = padded.A
            tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = padded.B
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "revision": self.base_revision,
            "r": rank,
            "lora_alpha": rank,  # scaling = lora_alpha / r = 1: scales are folded into B
            "lora_dropout": 0.0,
            "target_modules": list(self),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
        return tensors, config

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        revision: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        **hub_kwargs: Any,
    ) -> ContextAdapter:
        """Load an adapter saved by :meth:`save_pretrained` or a PEFT LoRA (plain or rsLoRA scaling).

        ``path_or_repo_id`` is a local folder or a Hub repository id (downloaded with ``huggingface_hub``;
        ``HF_HUB_OFFLINE=1`` uses the cache only). Only safetensors files are read.
        """
        folder = Path(path_or_repo_id)
        if folder.is_file():
            inside = folder.name in (
                ADAPTER_CONFIG_NAME,
                ADAPTER_WEIGHTS_NAME,
                PEFT_CONFIG_NAME,
                PEFT_WEIGHTS_NAME,
            )
            hint = (
                f"pass its folder, {folder.parent}" if inside else "pass the folder an adapter was saved to"
            )
            raise AdapterFileError(
                f"{folder} is a file, not an adapter folder: {hint} (it holds {ADAPTER_CONFIG_NAME} or "
                f"{PEFT_CONFIG_NAME}; `ctx2param adapt` and save_pretrained write one)."
            )
        if not folder.is_dir():
            folder = _download_adapter(str(path_or_repo_id), revision, **hub_kwargs)
        if (folder / ADAPTER_CONFIG_NAME).is_file():
            adapter = _load_own(folder)
        elif (folder / PEFT_CONFIG_NAME).is_file():
            adapter = _load_peft(folder)
        else:
            present = sorted(p.name for p in folder.iterdir())[:10]
            raise AdapterFileError(
                f"{folder} holds no adapter: expected {ADAPTER_CONFIG_NAME} (ctx2param) or "
                f"{PEFT_CONFIG_NAME} (PEFT LoRA); found {present}."
            )
        return adapter.to(device=device, dtype=dtype)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload context adapter",
        card_data: Mapping[str, Any] | None = None,
    ) -> str:
        """Publish as a PEFT LoRA repository with a model card linking its base; returns the commit URL.

        Raises:
            PublishError: offline mode, no network, or the Hub refused the upload (one line, no traceback).
        """
        from huggingface_hub import HfApi, constants
        from huggingface_hub.errors import HfHubHTTPError

        from .compat import hub_unreachable_message, network_errors

        if _CARD_RENDERER is None:
            raise Ctx2ParamError(
                "No adapter card renderer is registered: import ctx2param (or ctx2param.cards)."
            )
        if constants.HF_HUB_OFFLINE:
            raise PublishError(
                "Cannot publish while HF_HUB_OFFLINE=1 (the Hub client is offline). Unset it to upload."
            )
        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "adapter", format="peft")
            (folder / "README.md").write_text(_CARD_RENDERER(self, **dict(card_data or {})), encoding="utf-8")
            try:
                api.create_repo(repo_id, private=private, exist_ok=True)
                info = api.upload_folder(
                    repo_id=repo_id, folder_path=str(folder), commit_message=commit_message
                )
            except HfHubHTTPError as err:
                raise PublishError(f"The Hub refused to publish {repo_id!r}: {err}") from err
            except network_errors() as err:
                raise PublishError(
                    hub_unreachable_message(err, f"publish {repo_id!r}", offline_hint=False)
                ) from err
        return str(getattr(info, "commit_url", info))


def _expand(f: LoraFactors, batch: int) -> LoraFactors:
    if f.batch_size is not None:
        return f
    return LoraFactors(f.A.expand(batch, *f.A.shape), f.B.expand(batch, *f.B.shape), f.scale)


def compose(adapters: Sequence[ContextAdapter], weights: Sequence[float] | None = None) -> ContextAdapter:
    """Σ_i w_i · adapters[i] (exact in ΔW). ``weights`` defaults to all ones.

    The ranks of all adapters concatenate in one ``torch.cat`` per module, so composing n adapters costs
    time linear in their total rank (a chain of ``+`` copies the running sum again at every step).
    """
    adapters = list(adapters)
    if not adapters:
        raise ValueError("compose() needs at least one adapter.")
    if weights is None:
        weights = [1.0] * len(adapters)
    weights = list(weights)
    if len(weights) != len(adapters):
        raise ValueError(f"compose() got {len(adapters)} adapters but {len(weights)} weights.")
    scalars = []
    for i, weight in enumerate(weights):
        scalar = _as_scalar(weight)
        if scalar is None or not math.isfinite(scalar):
            raise ValueError(f"compose() weights must be finite numbers; weight {i} is {weight!r}.")
        scalars.append(scalar)
    return _concatenate(adapters, scalars, "compose")


def _concatenate(adapters: list[ContextAdapter], weights: list[float], what: str) -> ContextAdapter:
    """Σ_i weights[i] · ΔW(adapters[i]) by concatenating the factors' ranks, one ``torch.cat`` per module.

    Single adapters are broadcast to the batch of batched ones; when the effective scales
    (``scale · weight``) differ between adapters they are folded into B.
    """
    if not isinstance(adapters[0], ContextAdapter):
        raise TypeError(f"Cannot {what} a {type(adapters[0]).__name__}; expected ContextAdapter objects.")
    first = adapters[0]
    for other in adapters[1:]:
        first.check_compatible(other, what)
    # the first adapter may name no base or batch where two later ones name different ones
    base, revision = _common_base(adapters, what)
    batches = list(dict.fromkeys(a.batch_size for a in adapters if a.batch_size))
    if len(batches) > 1:
        raise AdapterMismatchError(f"Cannot {what} adapters with different batch sizes: {batches}.")
    batch = batches[0] if batches else None
    out = {}
    for name in first:
        parts = [a[name] for a in adapters]
        if batch is not None:
            parts = [_expand(p, batch) for p in parts]
        scales = [p.scale * w for p, w in zip(parts, weights, strict=True)]
        A = torch.cat([p.A for p in parts], -2)
        if all(scale == scales[0] for scale in scales):
            out[name] = LoraFactors(A, torch.cat([p.B for p in parts], -1), scales[0])
        else:
            folded = [p.B if scale == 1.0 else p.B * scale for p, scale in zip(parts, scales, strict=True)]
            out[name] = LoraFactors(A, torch.cat(folded, -1), 1.0)
    return ContextAdapter(out, base, revision, check_finite=False)  # the parts were checked


def stack(adapters: Sequence[ContextAdapter]) -> ContextAdapter:
    """One batched adapter (``A [N, r, d_in]``) from N single adapters, for per-example adaptation.

    Ranks may differ: smaller ones are zero-padded (exact). Differing scales are folded into B.
    """
    adapters = list(adapters)
    if not adapters:
        raise ValueError("stack() needs at least one adapter.")
    first = adapters[0]
    for other in adapters[1:]:
        first.check_compatible(other, "stack")
    if any(a.batch_size is not None for a in adapters):
        raise ValueError("stack() takes single adapters; unbind() batched ones first.")
    base, revision = _common_base(adapters, "stack")  # as compose: every pair, not only against the first
    out = {}
    for name in first:
        parts = [a[name] for a in adapters]
        if len({p.scale for p in parts}) > 1:
            parts = [p.folded() for p in parts]
        rank = max(p.rank for p in parts)
        parts = [_pad_rank(p, rank) for p in parts]
        out[name] = LoraFactors(
            torch.stack([p.A for p in parts]), torch.stack([p.B for p in parts]), parts[0].scale
        )
    return ContextAdapter(out, base, revision, check_finite=False)  # the parts were checked


# ------------------------------------------------------------------------------------------------ files
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: JSONDecodeError
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise AdapterFileError(
            f"{path} is not valid JSON ({reason}); the file is corrupted or truncated."
        ) from err
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, found {type(data).__name__}.")
    return data


_MISSING = object()


def _field(data: Mapping[str, Any], key: str, kind: str, path: Path, default: Any = _MISSING) -> Any:
    """``data[key]`` checked to be of ``kind`` (``"str"``, ``"int"``, ``"number"``, ``"bool"``, ``"dict"``;
    ``"str?"`` etc. also allow null), else :class:`AdapterFileError` naming the file and the field.
    A missing key gives ``default`` (an error when there is none)."""
    if key not in data:
        if default is _MISSING:
            raise AdapterFileError(f"{path} lacks the field {key!r}.")
        return default
    value = data[key]
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None and optional:
        return None
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "dict": isinstance(value, dict),
    }[kind]
    if ok and kind == "number":
        try:
            ok = math.isfinite(float(value))
        except OverflowError:
            ok = False
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise AdapterFileError(
            f"{path}: field {key!r} must be {'a finite number' if kind == 'number' else f'a {kind}'}"
            f"{' or null' if optional else ''}, found {type(value).__name__} {shown}. The file is corrupted "
            "or was not written by ctx2param / PEFT."
        )
    return value


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AdapterFileError(f"Missing weight file {path}; the adapter folder is incomplete.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"Cannot read {path}: {err}. The file is corrupted or truncated.") from err


def _build_loaded(
    factors: dict[str, LoraFactors], weights: Path, base: Any, revision: Any, metadata: Any
) -> ContextAdapter:
    """The adapter read from ``weights``: malformed or non-finite factors are an :class:`AdapterFileError`."""
    try:
        adapter = ContextAdapter(factors, base, revision, metadata, check_finite=False)
    except (ValueError, TypeError) as err:
        raise AdapterFileError(f"{weights}: {err}") from err
    if (found := _first_nonfinite(factors, skip_grad=False)) is not None:
        raise AdapterFileError(f"{weights}: {_nonfinite_message(found)}")
    return adapter


def _load_own(folder: Path) -> ContextAdapter:
    path = folder / ADAPTER_CONFIG_NAME
    header = _read_json(path)
    if header.get("format") != "ctx2param-adapter":
        raise AdapterFileError(f"{path} is not a ctx2param adapter header.")
    version = header.get("schema_version")
    if (
        isinstance(version, bool)
        or not isinstance(version, int)
        or not 1 <= version <= ADAPTER_SCHEMA_VERSION
    ):
        raise AdapterFileError(
            f"{folder} uses adapter schema version {version!r}; this ctx2param reads 1 to "
            f"{ADAPTER_SCHEMA_VERSION}. Upgrade ctx2param (pip install -U ctx2param) for a newer one."
        )
    base = _field(header, "base_model", "str?", path, None)
    revision = _field(header, "base_revision", "str?", path, None)
    metadata = _field(header, "metadata", "dict?", path, None)
    checksums = _field(header, "sha256", "dict?", path, None) or {}
    expected = _field(checksums, ADAPTER_WEIGHTS_NAME, "str?", path, None)
    modules = _field(header, "modules", "dict", path)
    if not modules:
        raise AdapterFileError(f"{path} lists no modules.")
    for name, info in modules.items():
        if not isinstance(info, dict):
            raise AdapterFileError(f"{path}: module {name!r} must map to a JSON object, found {info!r:.60}.")
        _field(info, "scale", "number", path, 1.0)
        shape = info.get("shape")
        if not (
            isinstance(shape, list)
            and len(shape) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        ):
            raise AdapterFileError(f"{path}: module {name!r} has shape {shape!r:.60}, not [d_out, d_in].")
    weights = folder / ADAPTER_WEIGHTS_NAME
    if weights.is_file() and expected and sha256_file(weights) != expected:
        raise AdapterFileError(
            f"{weights} does not match the SHA-256 recorded in {ADAPTER_CONFIG_NAME}: the file is corrupted "
            "or was replaced. Save the adapter again."
        )
    tensors = _read_tensors(weights)
    factors = {}
    for name, info in modules.items():
        try:
            A, B = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        except KeyError:
            raise AdapterFileError(f"{weights} lacks the factors of module {name!r}.") from None
        if A.dim() not in (2, 3) or B.dim() != A.dim():
            raise AdapterFileError(
                f"{weights}: module {name!r} has factors A {tuple(A.shape)} and B {tuple(B.shape)}, not "
                "matrices ([r, d_in], [d_out, r]) or batches of them."
            )
        factors[name] = LoraFactors(A, B, float(info.get("scale", 1.0)))
        if list(factors[name].shape) != info["shape"]:
            raise AdapterFileError(
                f"Module {name!r}: the weights give ΔW shape {factors[name].shape} but the header says "
                f"{info['shape']}."
            )
    return _build_loaded(factors, weights, base, revision, metadata)


def _peft_patterns(
    config: Mapping[str, Any], key: str, kind: str, path: Path
) -> list[tuple[re.Pattern[str], Any]]:
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: ``[(compiled key, value)]``, checked."""
    pattern = _field(config, key, "dict?", path, None) or {}
    out = []
    for regex, value in pattern.items():
        _field(pattern, regex, kind, path)
        try:
            out.append((re.compile(rf"(.*\.)?({regex})$"), value))
        except (re.error, RecursionError, OverflowError) as err:
            raise AdapterFileError(
                f"{path}: {key} key {regex!r:.60} is not a valid pattern ({err})."
            ) from err
    return out


def _peft_pattern_value(patterns: list[tuple[re.Pattern[str], Any]], name: str, default: Any) -> Any:
    for compiled, value in patterns:
        if compiled.match(name):
            return value
    return default


def _load_peft(folder: Path) -> ContextAdapter:
    path = folder / PEFT_CONFIG_NAME
    config = _read_json(path)
    peft_type = _field(config, "peft_type", "str?", path, "LORA")
    if peft_type not in ("LORA", None):
        raise AdapterFileError(f"{folder} is a PEFT {peft_type} adapter; only LoRA is supported.")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise AdapterFileError(
                f"{folder}: PEFT LoRA with {flag}=True is not supported (no low-rank ΔW form)."
            )
    r_default = _field(config, "r", "int", path, 8)
    if r_default < 1:
        raise AdapterFileError(f"{path}: r must be at least 1, found {r_default}.")
    alpha_default = float(_field(config, "lora_alpha", "number", path, r_default))
    rslora = _field(config, "use_rslora", "bool?", path, False) or False
    rank_patterns = _peft_patterns(config, "rank_pattern", "int", path)
    alpha_patterns = _peft_patterns(config, "alpha_pattern", "number", path)
    base = _field(config, "base_model_name_or_path", "str?", path, None)
    revision = _field(config, "revision", "str?", path, None)
    weights = folder / PEFT_WEIGHTS_NAME
    if not weights.is_file() and (folder / PEFT_PICKLE_NAME).is_file():
        raise AdapterFileError(
            f"{folder} only has {PEFT_PICKLE_NAME} (a pickle), which ctx2param never loads. Convert it "
            "once where you trust it: PeftModel.from_pretrained(...).save_pretrained(dir, "
            "safe_serialization=True)."
        )
    tensors = _read_tensors(weights)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if "lora_embedding" in key or "lora_magnitude" in key:
            raise AdapterFileError(f"{weights}: {key!r} is not a linear LoRA factor; not supported.")
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0].removeprefix(_PEFT_PREFIX)
                pairs.setdefault(module, {})[part] = tensor
    if not pairs:
        raise AdapterFileError(f"{weights} holds no LoRA factors (keys like '...q_proj.lora_A.weight').")
    factors = {}
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterFileError(f"{weights}: module {module!r} lacks lora_A or lora_B.")
        A, B = pair["lora_A"], pair["lora_B"]
        if A.dim() != 2 or B.dim() != 2:
            raise AdapterFileError(
                f"{weights}: module {module!r} has non-matrix factors (conv LoRA?); unsupported."
            )
        r = _peft_pattern_value(rank_patterns, module, r_default)
        alpha = float(_peft_pattern_value(alpha_patterns, module, alpha_default))
        if A.shape[0] != r or r < 1:
            raise AdapterFileError(
                f"{weights}: module {module!r} has rank {A.shape[0]} but the config says r={r}."
            )
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        factors[module] = LoraFactors(A, B, scale)
    return _build_loaded(factors, weights, base, revision, None)


def _download_adapter(repo_id: str, revision: str | None, **hub_kwargs: Any) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, "README.md"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, **hub_kwargs))
    except HFValidationError as err:
        raise AdapterFileError(
            f"{repo_id!r} is neither an existing folder nor a valid Hub repository id."
        ) from err
    except RepositoryNotFoundError as err:
        raise AdapterFileError(
            f"No adapter repository {repo_id!r} on the Hub (or no access to it); no folder {repo_id} here."
        ) from err
    except LocalEntryNotFoundError as err:
        raise AdapterFileError(
            f"{repo_id!r} is not in the local cache and the Hub cannot be reached (HF_HUB_OFFLINE is set or "
            f"there is no network); there is no folder {Path(repo_id).absolute()} either."
        ) from err
