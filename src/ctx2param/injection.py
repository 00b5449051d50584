"""Attach :class:`ContextAdapter` updates to a model's linear layers, or merge them into float weights.

Attaching registers a forward hook on each target module that adds ``scale · (x Aᵀ) Bᵀ`` to its output, so
the base weights are never touched: this works the same for ``torch.nn.Linear``, bitsandbytes
``Linear4bit`` / ``Linear8bitLt`` (the update stays unmerged, in the activation dtype) and GPT-2 style
``Conv1D``; gradients flow into the adapter's factors; detaching removes the hooks, which restores the
model exactly. A batched adapter (``A [N, r, d_in]``) adapts each example of a batch with its own update;
a batch of ``N·m`` rows (beam search, ``num_return_sequences``) repeats each adapter ``m`` times.

bitsandbytes ``Linear4bit`` on CPUs with AVX512-BF16 repacks its weight for a bfloat16 kernel the first time
it runs in eval mode on an input that needs no gradient, and from then on passes no gradient to its input
(a bitsandbytes trap): adapter factors of earlier layers then get silently wrong gradients. Attaching an
adapter therefore turns that repacking off on every ``Linear4bit`` of the model (and warns about layers
already repacked, which it leaves as they are so that detaching restores the model exactly); the base model
loader calls :func:`keep_4bit_exact` right after loading, before any forward pass.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .adapter import ContextAdapter, LoraFactors, bases_differ, normalize_base_id
from .errors import AdapterMismatchError, QuantizedMergeError, TiedWeightMergeError
from .modules import is_conv1d, is_quantized_module, module_shape

logger = logging.getLogger(__name__)

#: Attribute of a model holding further ids it answers to as a base (set by ``ContextAdaptationModel`` when
#: a generator's config names its base by an id other than the one the loaded model records).
BASE_ALIASES_ATTR = "_ctx2param_base_aliases"

__all__ = [
    "AdapterHandle",
    "apply_adapter",
    "attach_adapter",
    "detach_adapter",
    "keep_4bit_exact",
    "lora_delta",
    "merge_adapter",
    "resolve_adapter_modules",
    "unmerge_adapter",
    "attach_stacked_adapter",
    "StackedAdapterHandle",
]


def _adapter_root(model: nn.Module) -> nn.Module:
    """The causal LM whose ``named_modules()`` names the adapter's targets.

    Wrappers (ctx2param models, PEFT models) expose it through ``get_adapter_root()``.
    """
    getter = getattr(model, "get_adapter_root", None)
    return getter() if callable(getter) else model


def resolve_adapter_modules(model: nn.Module, adapter: ContextAdapter) -> dict[str, nn.Module]:
    """``{name: module}`` for every target of ``adapter`` in ``model``, checking that the adapter was made for
    this base model and that shapes agree.

    Base ids are compared normalised (:func:`ctx2param.adapter.normalize_base_id`): a folder, a relative
    path to it and its absolute path are one base, and so are a Hub id and its folder in the Hugging Face
    cache. The model's ids are its ``name_or_path`` (what it was loaded from) and any alias in
    :data:`BASE_ALIASES_ATTR`. An adapter that names no base, a model that records none, and a Hub id
    against an unrelated local folder (which may hold a copy of it) are accepted; otherwise a different
    base is an :class:`AdapterMismatchError`.
    """
    root = _adapter_root(model)
    if adapter.base_model:
        config = getattr(root, "config", None)
        own = [getattr(root, "name_or_path", None), getattr(config, "_name_or_path", None)]
        own += list(getattr(root, BASE_ALIASES_ATTR, ()))
        own = [str(i) for i in dict.fromkeys(own) if i]
        wanted = normalize_base_id(adapter.base_model)
        same = any(normalize_base_id(i) == wanted for i in own)
        if not same and any(bases_differ(i, adapter.base_model) for i in own):
            raise AdapterMismatchError(
                f"The adapter was made for another base model, {adapter.base_model!r}: this "
                f"{type(root).__name__} is {own[0]!r}. Apply it to the model it was made for. If it does fit "
                f"this one (the same weights in another place), say so by re-tagging it: "
                f"ContextAdapter(dict(adapter), base_model={own[0]!r})."
            )
    modules = dict(root.named_modules())
    resolved = {}
    for name, factors in adapter.items():
        module = modules.get(name)
        if module is None:
            linear = [n for n, m in modules.items() if n and module_shape(m) is not None][:3]
            raise AdapterMismatchError(
                f"The adapter targets {name!r}, which {type(root).__name__} does not have (its linear "
                f"layers are named like {linear}). Was the adapter made for another base model "
                f"({adapter.base_model!r})?"
            )
        shape = module_shape(module)
        if shape is None:
            raise AdapterMismatchError(
                f"{name!r} in {type(root).__name__} is a {type(module).__name__}, not linear."
            )
        if shape != factors.shape:
            raise AdapterMismatchError(
                f"Module {name!r}: the model's layer maps {shape[1]} -> {shape[0]} features but the "
                f"adapter's ΔW is {factors.shape[0]} x {factors.shape[1]}. The adapter was made for another "
                f"base model ({adapter.base_model!r})."
            )
        resolved[name] = module
    return resolved


def lora_delta(x: torch.Tensor, factors: LoraFactors) -> torch.Tensor:
    """``scale · x Aᵀ Bᵀ`` in ``x``'s dtype.

    Args:
        x: ``[..., d_in]``; with batched factors, ``[N·m, T, d_in]``.
        factors: ``A [r, d_in]``, ``B [d_out, r]`` or batched ``A [N, r, d_in]``, ``B [N, d_out, r]``.

    Returns:
        ``[..., d_out]``.
    """
    A, B = factors.A.to(x.dtype), factors.B.to(x.dtype)
    if A.dim() == 2:
        return torch.nn.functional.linear(torch.nn.functional.linear(x, A) * factors.scale, B)
    n = A.shape[0]
    if x.dim() != 3 or x.shape[0] % n:
        raise AdapterMismatchError(
            f"A batched adapter of {n} examples needs inputs [batch, tokens, features] with batch a "
            f"multiple of {n}; got input of shape {tuple(x.shape)}."
        )
    if x.shape[0] != n:
        repeat = x.shape[0] // n
        A, B = A.repeat_interleave(repeat, 0), B.repeat_interleave(repeat, 0)
    return torch.bmm(torch.bmm(x, A.mT) * factors.scale, B.mT)


class AdapterHandle:
    """An adapter attached to a model; :meth:`detach` (or leaving the ``with`` block) removes it exactly."""

    def __init__(self, model: nn.Module, adapter: ContextAdapter, modules: dict[str, nn.Module]) -> None:
        self.model = model
        self.adapter = adapter
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        cache: dict[tuple[str, torch.device], LoraFactors] = {}

        for name, module in modules.items():
            factors = adapter[name]

            def hook(
                mod: nn.Module,
                args: tuple[Any, ...],
                output: torch.Tensor,
                _name: str = name,
                _factors: LoraFactors = factors,
            ) -> torch.Tensor:
                x = args[0]
                if _factors.A.device != x.device:  # a model spread over devices (device_map="auto")
                    key = (_name, x.device)
                    if key not in cache:
                        cache[key] = LoraFactors(
                            _factors.A.to(x.device), _factors.B.to(x.device), _factors.scale
                        )
                    use = cache[key]
                else:
                    use = _factors
                delta = lora_delta(x, use).to(output.dtype)
                if torch.is_grad_enabled() and (output.requires_grad or delta.requires_grad):
                    return output + delta
                return output.add_(delta)

            self._hooks.append(module.register_forward_hook(hook))

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def detach(self) -> None:
        """Remove the adapter; the model computes exactly as before it was attached."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def __enter__(self) -> AdapterHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def keep_4bit_exact(model: nn.Module, unpack: bool = True) -> int:
    """Stop bitsandbytes' CPU repacking of ``Linear4bit`` weights; optionally undo it where it happened.

    Sets ``support_avx512bf16_for_cpu = False`` on every layer that has the attribute, so 4-bit layers keep
    computing exactly (dequantize, then multiply in the compute dtype) and keep passing gradients to their
    inputs. With ``unpack``, a layer whose weight was already repacked is converted back by bitsandbytes'
    inverse (its absmax stays rounded to bfloat16, as that inverse leaves it). Layers and models without
    the attribute are left alone.

    Returns:
        the number of layers still repacked afterwards (0 with ``unpack=True``).
    """
    packed = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None or not getattr(state, "packing_format_for_cpu", False):
            continue
        if not unpack:
            packed += 1
            continue
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    return packed


def attach_adapter(model: nn.Module, adapter: ContextAdapter) -> AdapterHandle:
    """Attach ``adapter`` to ``model`` (unmerged) and return a handle; ``handle.detach()`` removes it.

    Several adapters may be attached at once: their updates add up, as ``a + b`` does.
    """
    if not isinstance(adapter, ContextAdapter):
        raise TypeError(f"attach_adapter needs a ContextAdapter, got {type(adapter).__name__}.")
    modules = resolve_adapter_modules(model, adapter)
    # Unpacking would change how the base computes, so an attach that must restore the model exactly only
    # stops further repacking and says where it already happened.
    packed = keep_4bit_exact(model, unpack=False)
    if packed:
        logger.warning(
            "%d bitsandbytes 4-bit layers of this model were repacked for the AVX512-BF16 CPU kernel "
            "before the adapter was attached; no gradient flows through them. To train through them, call "
            "ctx2param.injection.keep_4bit_exact(model), which unpacks them (ctx2param's own loaders guard "
            "against the repacking before the first forward pass).",
            packed,
        )
    return AdapterHandle(model, adapter, modules)


def detach_adapter(handle: AdapterHandle) -> None:
    """Remove an adapter attached with :func:`attach_adapter`."""
    handle.detach()


@contextmanager
def apply_adapter(
    model: nn.Module, adapter: ContextAdapter | None, merge: bool = False
) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes with W + ΔW on every target module of ``adapter``.

    The model is restored exactly on exit, also when the block raises. ``adapter=None`` is a no-op.

    Args:
        model: the base model (or a model holding it).
        adapter: the update; a batched (per-example) adapter needs ``merge=False``.
        merge: ``False`` (default): forward hooks add ``x Aᵀ Bᵀ`` to each target module's output, the weights
            are never written. ``True``: ΔW is added into the float weights for the block (no per-token
            cost: decoding runs at the bare model's speed), and the original weights, kept as a copy of the
            target modules' weights meanwhile (extra memory of their size), are copied back on exit, bit
            for bit. A target whose weight another part of the model shares (SmolLM2's ``lm_head`` and
            its input embeddings) gets its own merged copy for the block instead, so the other part keeps
            computing with W: the result is the hooked one, and on exit the shared tensor is put back, tie
            included. Quantized target modules raise :class:`~ctx2param.errors.QuantizedMergeError` before
            anything changes.

    Example:
        >>> with apply_adapter(model, a + b):
        ...     out = model.generate(**inputs, max_new_tokens=32)
        >>> with apply_adapter(model, a + b, merge=True):  # one shared adapter, many decoded tokens
        ...     out = model.generate(**inputs, max_new_tokens=512)
    """
    if adapter is None:
        yield model
        return
    if merge:
        modules = _mergeable_modules(model, adapter)  # batched or quantized: an error, nothing changed
        tied = _tied_weights(model, modules)
        originals = {name: m.weight.detach().clone() for name, m in modules.items() if name not in tied}
        untied: dict[str, nn.Parameter] = {}
        try:
            for name in tied:  # a weight shared with another part (tied embeddings): a copy for the block
                weight = modules[name].weight
                untied[name] = weight
                modules[name].weight = nn.Parameter(weight.detach().clone(), weight.requires_grad)
            _add_delta(modules, adapter, 1.0)
            yield model
        finally:
            with torch.no_grad():
                for name, weight in originals.items():
                    modules[name].weight.copy_(weight)
            for name, weight in untied.items():  # the shared tensor itself: the tie is as before
                modules[name].weight = weight
        return
    handle = attach_adapter(model, adapter)
    try:
        yield model
    finally:
        handle.detach()


def _mergeable_modules(model: nn.Module, adapter: ContextAdapter) -> dict[str, nn.Module]:
    """The target modules of ``adapter`` in ``model``, checked to take a merge (one shared, float ΔW)."""
    if adapter.batch_size is not None:
        raise ValueError("A batched (per-example) adapter cannot be merged into shared weights; unbind() it.")
    modules = resolve_adapter_modules(model, adapter)
    for name, module in modules.items():
        if is_quantized_module(module):
            raise QuantizedMergeError(
                f"Cannot merge into {name!r}, a quantized {type(module).__name__}: its weights are not "
                "floats. Use apply_adapter()/attach_adapter() (unmerged), or load the base in float to merge."
            )
    return modules


def _tied_weights(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, list[str]]:
    """``{target: [other parameters sharing its weight's storage]}`` for the targets whose weight is tied.

    Two targets that share one weight (one module under two names) cannot take two merges: an error.
    """
    root = _adapter_root(model)
    by_storage: dict[int, list[str]] = {}
    for pname, param in root.named_parameters(remove_duplicate=False):
        if param.numel() and param.device.type != "meta":
            by_storage.setdefault(param.untyped_storage().data_ptr(), []).append(pname)
    tied: dict[str, list[str]] = {}
    claimed: dict[int, str] = {}
    for name, module in modules.items():
        weight = module.weight
        if not weight.numel() or weight.device.type == "meta":
            continue
        ptr = weight.untyped_storage().data_ptr()
        if ptr in claimed:
            raise AdapterMismatchError(
                f"Targets {claimed[ptr]!r} and {name!r} share one weight; a merge would add both updates "
                "to it. Use apply_adapter(model, adapter) without merge."
            )
        claimed[ptr] = name
        others = [n for n in by_storage.get(ptr, []) if n != f"{name}.weight"]
        if others:
            tied[name] = others
    return tied


def _refuse_tied(model: nn.Module, modules: dict[str, nn.Module], what: str) -> None:
    tied = _tied_weights(model, modules)
    if tied:
        name, others = next(iter(tied.items()))
        raise TiedWeightMergeError(
            f"Cannot {what} into {name!r}: its weight is shared with {others[:3]} (tied weights, such as "
            "an LM head tied to the input embeddings), so they would change too. Use apply_adapter(model, "
            "adapter, merge=True), which merges into a copy for the block, or attach it unmerged."
        )


def _add_delta(modules: dict[str, nn.Module], adapter: ContextAdapter, sign: float) -> None:
    """W ← W + sign · ΔW on each module (ΔW computed in float32, rounded once to the weight's dtype)."""
    with torch.no_grad():
        for name, module in modules.items():
            weight = module.weight
            factors = adapter[name]
            delta = (
                factors.B.to(weight.device, torch.float32) @ factors.A.to(weight.device, torch.float32)
            ) * (factors.scale * sign)
            if is_conv1d(module):
                delta = delta.T
            weight.copy_((weight.to(torch.float32) + delta).to(weight.dtype))


def merge_adapter(model: nn.Module, adapter: ContextAdapter) -> None:
    """Add ΔW into the float weights of ``model`` (W ← W + ΔW, computed in float32).

    Quantized layers raise :class:`~ctx2param.errors.QuantizedMergeError`; nothing is changed then. For a
    merge undone exactly at the end of a block, use ``apply_adapter(model, adapter, merge=True)``. A target
    whose weight is tied to another part of the model raises :class:`~ctx2param.errors.TiedWeightMergeError`
    (that part would change too).
    """
    modules = _mergeable_modules(model, adapter)
    _refuse_tied(model, modules, "merge")
    _add_delta(modules, adapter, 1.0)


def unmerge_adapter(model: nn.Module, adapter: ContextAdapter) -> None:
    """Subtract a merged ΔW again (exact up to the rounding of the weight dtype)."""
    modules = _mergeable_modules(model, adapter)
    _refuse_tied(model, modules, "unmerge")
    _add_delta(modules, adapter, -1.0)


# ------------------------------------------------------------------------------------ stacked adapters
class StackedAdapterHandle:
    """A :class:`~ctx2param.stacked.StackedAdapter` attached to a model (per-example updates, one hook per
    target module reading its layer's slice); :meth:`detach` or leaving the ``with`` block removes it.

    Per module kind the factors are cast once to the activations' dtype (and moved once to their device),
    not once per module; each hook then does two batched matrix products on views.
    """

    def __init__(self, model: nn.Module, stacked: Any, modules: dict[str, nn.Module]) -> None:
        self.model = model
        self.stacked = stacked
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._cast: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        scale = float(stacked.scale)
        for name, module in modules.items():
            layer, kind = stacked.layout.positions[name]

            def hook(
                mod: nn.Module,
                args: tuple[Any, ...],
                output: torch.Tensor,
                _layer: int = layer,
                _kind: int = kind,
            ) -> torch.Tensor:
                x = args[0]
                A, B = self._factors(_kind, x.dtype, x.device)
                A, B = A[:, _layer], B[:, _layer]  # [N, r, d_in], [N, d_out, r] (views)
                n = A.shape[0]
                if x.dim() != 3 or x.shape[0] % n:
                    raise AdapterMismatchError(
                        f"A stacked adapter of {n} examples needs inputs [batch, tokens, features] with "
                        f"batch a multiple of {n}; got input of shape {tuple(x.shape)}."
                    )
                if x.shape[0] != n:
                    repeat = x.shape[0] // n
                    A, B = A.repeat_interleave(repeat, 0), B.repeat_interleave(repeat, 0)
                hidden = torch.bmm(x, A.mT)
                if scale != 1.0:
                    hidden = hidden * scale
                delta = torch.bmm(hidden, B.mT).to(output.dtype)
                if torch.is_grad_enabled() and (output.requires_grad or delta.requires_grad):
                    return output + delta
                return output.add_(delta)

            self._hooks.append(module.register_forward_hook(hook))

    def _factors(
        self, kind: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (kind, dtype, device)
        found = self._cast.get(key)
        if found is None:
            A, B = self.stacked.factors[kind]
            found = (A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype))
            self._cast[key] = found
        return found

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def detach(self) -> None:
        """Remove the adapter; the model computes exactly as before it was attached."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._cast.clear()

    def __enter__(self) -> StackedAdapterHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


#: Resolved target modules per model (weakly held) and layout: attaching happens every training step.
_STACKED_MODULES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, ...], dict[str, nn.Module]]] = (
    weakref.WeakKeyDictionary()
)


def _stacked_modules(model: nn.Module, layout: Any) -> dict[str, nn.Module]:
    """``{name: module}`` of the layout's target modules in ``model`` (resolved once per model and layout)."""
    root = _adapter_root(model)
    names = tuple(layout.positions)
    per_model = _STACKED_MODULES.setdefault(root, {})
    found = per_model.get(names)
    if found is not None:
        return found
    modules = dict(root.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise AdapterMismatchError(
            f"The stacked adapter targets {missing[:3]}, which {type(root).__name__} does not have; it was "
            "made for another base model."
        )
    found = {n: modules[n] for n in names}
    for name, module in found.items():
        shape = module_shape(module)
        layer, kind = layout.positions[name]
        if shape != tuple(layout.kind_shapes[kind]):
            raise AdapterMismatchError(
                f"Module {name!r}: the model's layer is {shape} (d_out, d_in) but the stacked adapter's kind "
                f"{layout.kinds[kind]!r} is {tuple(layout.kind_shapes[kind])}."
            )
    per_model[names] = found
    return found


def attach_stacked_adapter(model: nn.Module, stacked: Any) -> StackedAdapterHandle:
    """Attach a :class:`~ctx2param.stacked.StackedAdapter` (``N`` per-example updates) to ``model``.

    Computes what :func:`attach_adapter` computes for ``stacked.to_adapter()`` (the same products in the
    same order), without building ``ContextAdapter`` objects: the training fast path.
    """
    modules = _stacked_modules(model, stacked.layout)
    return StackedAdapterHandle(model, stacked, modules)
