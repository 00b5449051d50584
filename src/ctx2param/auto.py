"""``AutoModelForContextAdaptation``: load any registered context-adaptation method from its config."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .configuration_utils import ContextAdaptationConfig
from .modeling_utils import (
    ContextAdaptationModel,
    UnknownMethodError,
    register_method,
    registered_methods,
)

__all__ = ["AutoModelForContextAdaptation"]


class AutoModelForContextAdaptation:
    """Picks the method class from the checkpoint's ``model_type`` in ctx2param's own registry.

    Code from a checkpoint is never executed (there is no ``trust_remote_code``): a checkpoint of a method
    that is not registered raises :class:`~ctx2param.modeling_utils.UnknownMethodError`.

    Example:
        >>> model = AutoModelForContextAdaptation.from_pretrained(
        ...     "ctx2param/compas-smollm2-135m-instruct",
        ...     quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    """

    def __init__(self) -> None:
        raise OSError("Use AutoModelForContextAdaptation.from_pretrained(...) or .from_base(...).")

    @staticmethod
    def from_pretrained(
        pretrained_model_name_or_path: str | os.PathLike,
        base_model: str | os.PathLike | nn.Module | None = None,
        **kwargs: Any,
    ) -> ContextAdaptationModel:
        """Load a generator and the base it adapts; see :meth:`ContextAdaptationModel.from_pretrained`."""
        return ContextAdaptationModel.from_pretrained(pretrained_model_name_or_path, base_model, **kwargs)

    @staticmethod
    def from_base(
        base: str | os.PathLike | nn.Module, config: ContextAdaptationConfig, **kwargs: Any
    ) -> ContextAdaptationModel:
        """A fresh, untrained generator of the method ``config`` belongs to, for ``base``."""
        methods = registered_methods()
        if config.model_type not in methods:
            raise UnknownMethodError(f"No method registered for model_type {config.model_type!r}.")
        return methods[config.model_type][1].from_base(base, config, **kwargs)

    register = staticmethod(register_method)
