"""Finding and describing the linear layers that adapters target, and reading a model's (text) config.
Torch modules only, no model code.

A target is any layer computing ``y = W x (+ b)``: ``torch.nn.Linear`` and its subclasses (including
bitsandbytes ``Linear4bit`` and ``Linear8bitLt``) and transformers' GPT-2 style ``Conv1D`` (weight stored
transposed, ``[d_in, d_out]``). Shapes are always reported as ``(d_out, d_in)``, the shape of ΔW.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
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


def text_config(model: nn.Module) -> Any:
    """The config of ``model``'s language model: ``config.get_text_config()`` for multimodal configs, else
    ``config`` itself (``None`` when the model has no config)."""
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg


def config_int(model: nn.Module, attrs: Sequence[str], positive: bool = False) -> int | None:
    """The first integer among ``attrs`` of ``model``'s text config (a positive one when ``positive``);
    ``None`` when it has none."""
    text = text_config(model)
    for attr in attrs:
        value = getattr(text, attr, None)
        if isinstance(value, int) and (value > 0 or not positive):
            return value
    return None


def context_window(model: nn.Module) -> int | None:
    """``model``'s context window in tokens (``max_position_embeddings``, GPT-2's ``n_positions``), when its
    config says."""
    return config_int(model, ("max_position_embeddings", "n_positions"), positive=True)


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


_LAYER_NAME = re.compile(r"^(?P<prefix>.*?)\.(?P<layer>\d+)\.(?P<kind>.+)$")


@dataclass(frozen=True)
class LayerKindLayout:
    """Where each target module sits: its layer and its kind (the part of the name after the layer index).

    For generators that share one head (or MLP) per module kind across layers. A method subclasses it only
    to word its errors (``method``, ``sharing``, ``example``, ``hint``).

    Attributes:
        layers: the adapted layers' indices, ascending.
        kinds: module kinds in first-appearance order (``"self_attn.q_proj"``, ``"mlp.c_proj"``, ...).
        kind_shapes: ``(d_out, d_in)`` of each kind (the same in every layer: the heads are shared).
        positions: ``{module name: (layer position, kind position)}``.
    """

    layers: tuple[int, ...]
    kinds: tuple[str, ...]
    kind_shapes: tuple[tuple[int, int], ...]
    positions: dict[str, tuple[int, int]]

    method: ClassVar[str] = "This method"
    sharing: ClassVar[str] = "shares one head per module kind across layers"
    example: ClassVar[str] = "model.layers.3.self_attn.q_proj"
    hint: ClassVar[str] = ""
    kind_sharing: ClassVar[str] = "shares one head per kind across layers"

    @classmethod
    def from_shapes(cls, shapes: dict[str, Sequence[int]]) -> LayerKindLayout:
        if not shapes:
            raise ValueError(
                f"{cls.method} needs at least one target module (config.target_shapes is empty)."
            )
        parsed: dict[str, tuple[int, str]] = {}
        for name in shapes:
            match = _LAYER_NAME.match(name)
            if match is None:
                raise ValueError(
                    f"{cls.method} {cls.sharing}, so every target module must sit in a numbered layer (like "
                    f"{cls.example!r}); {name!r} does not.{cls.hint}"
                )
            parsed[name] = (int(match["layer"]), match["kind"])
        layers = tuple(sorted({layer for layer, _ in parsed.values()}))
        kinds: list[str] = []
        kind_shapes: dict[str, tuple[int, int]] = {}
        for name, (_, kind) in parsed.items():
            shape = (int(shapes[name][0]), int(shapes[name][1]))
            if kind not in kind_shapes:
                kinds.append(kind)
                kind_shapes[kind] = shape
            elif kind_shapes[kind] != shape:
                raise ValueError(
                    f"Module kind {kind!r} has shape {kind_shapes[kind]} in one layer and {shape} in another "
                    f"({name}); {cls.method} {cls.kind_sharing} and needs equal shapes."
                )
        positions = {name: (layers.index(layer), kinds.index(kind)) for name, (layer, kind) in parsed.items()}
        return cls(layers, tuple(kinds), tuple(kind_shapes[k] for k in kinds), positions)

    @staticmethod
    def key(kind: str) -> str:
        """A module-dict key for a kind (dots are not allowed there)."""
        return kind.replace(".", "__")

    def presence(self) -> torch.Tensor:
        """``[num_layers, num_kinds]`` bool: which (layer, kind) pairs are target modules."""
        mask = torch.zeros(len(self.layers), len(self.kinds), dtype=torch.bool)
        for layer, kind in self.positions.values():
            mask[layer, kind] = True
        return mask
