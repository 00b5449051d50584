"""Finding and describing the linear layers that adapters target. Torch modules only, no model code.

A target is any layer computing ``y = W x (+ b)``: ``torch.nn.Linear`` and its subclasses (including
bitsandbytes ``Linear4bit`` and ``Linear8bitLt``) and transformers' GPT-2 style ``Conv1D`` (weight stored
transposed, ``[d_in, d_out]``). Shapes are always reported as ``(d_out, d_in)``, the shape of ΔW.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

_QUANTIZED_LINEAR_CLASSES = {"Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4", "Linear8bit"}


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style ``Conv1D`` (weight ``[d_in, d_out]``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def module_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(d_out, d_in)`` of a linear-like module, or ``None`` when the module is not one."""
    if isinstance(module, nn.Linear):
        return int(module.out_features), int(module.in_features)
    if is_conv1d(module):
        return int(module.nf), int(module.weight.shape[0])
    return None


def is_quantized_module(module: nn.Module) -> bool:
    """True for bitsandbytes layers (or any linear whose weight is not a floating-point tensor)."""
    if any(cls.__name__ in _QUANTIZED_LINEAR_CLASSES for cls in type(module).__mro__):
        return True
    weight = getattr(module, "weight", None)
    return weight is not None and not weight.is_floating_point()


def _matches(name: str, targets: str | Iterable[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_target_modules(model: nn.Module, target_modules: str | Iterable[str]) -> dict[str, nn.Module]:
    """Linear-like submodules of ``model`` named by ``target_modules``, in model order.

    ``target_modules`` follows PEFT: a list of names matched against the full module name or its last
    components (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``), or a string taken as a regular
    expression that must match the full name.
    """
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    found = {
        name: module
        for name, module in model.named_modules()
        if name and module_shape(module) is not None and _matches(name, targets)
    }
    if not found:
        linear = [n for n, m in model.named_modules() if n and module_shape(m) is not None]
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(
            f"No linear layer of {type(model).__name__} matches target_modules={target_modules!r}. "
            f"Its linear layers end in: {suffixes}."
        )
    return found


def target_module_shapes(model: nn.Module, target_modules: str | Iterable[str]) -> dict[str, tuple[int, int]]:
    """``{name: (d_out, d_in)}`` for the modules :func:`find_target_modules` selects."""
    return {name: module_shape(m) for name, m in find_target_modules(model, target_modules).items()}
