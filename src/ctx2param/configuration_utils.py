"""``ContextAdaptationConfig``: what a generator adapts and which base model it was made for."""

from __future__ import annotations

from typing import Any

try:  # transformers >= 5 spells it PreTrainedConfig; 4.x only has PretrainedConfig
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover - depends on the installed transformers
    from transformers import PretrainedConfig as PreTrainedConfig

from .errors import Ctx2ParamError

CONFIG_SCHEMA_VERSION = 1
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

__all__ = ["CONFIG_SCHEMA_VERSION", "ContextAdaptationConfig", "UnknownConfigVersionError"]


class UnknownConfigVersionError(Ctx2ParamError, ValueError):
    """A checkpoint was written by a newer ctx2param (a newer config schema) than the one installed."""


class ContextAdaptationConfig(PreTrainedConfig):
    """Configuration shared by every context-adaptation method.

    Each method subclasses it with its own ``model_type`` (``"ctx2param_compas"``, ...) and its own fields.

    Args:
        base_model_name_or_path: Hub id or folder of the base causal LM the generator adapts.
        base_model_revision: revision of that base model (``None``: the default branch).
        target_modules: names of the base's linear layers that receive updates (PEFT-style suffixes).
        target_shapes: ``{full module name: [d_out, d_in]}`` of those layers, filled by ``from_base``
            and checked against the base model at load time.
        rank: rank of each generated update (per target module).
        scale: ΔW = scale · B A.
        chunk_tokens: longest context piece (in base tokens) made into one adapter; longer inputs are
            split and the pieces' adapters summed.
        schema_version: version of this config's layout; a newer one than the library knows is refused.
    """

    model_type = "ctx2param"
    method_name = "base"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # transformers 5 turns config subclasses into dataclasses and, for a subclass without an __init__
        # of its own, generates one that skips ours; give such subclasses an __init__ deferring to the parent.
        if "__init__" not in cls.__dict__:
            parent_init = cls.__mro__[1].__init__

            def __init__(self: ContextAdaptationConfig, **init_kwargs: Any) -> None:
                parent_init(self, **init_kwargs)

            cls.__init__ = __init__  # type: ignore[method-assign]
        super().__init_subclass__(**kwargs)

    def __init__(
        self,
        base_model_name_or_path: str | None = None,
        base_model_revision: str | None = None,
        target_modules: list[str] | tuple[str, ...] = DEFAULT_TARGET_MODULES,
        target_shapes: dict[str, list[int]] | None = None,
        rank: int = 8,
        scale: float = 1.0,
        chunk_tokens: int = 512,
        schema_version: int = CONFIG_SCHEMA_VERSION,
        **kwargs: Any,
    ) -> None:
        if not isinstance(schema_version, int) or schema_version > CONFIG_SCHEMA_VERSION:
            raise UnknownConfigVersionError(
                f"This checkpoint's config has schema_version={schema_version!r}, newer than the "
                f"{CONFIG_SCHEMA_VERSION} this ctx2param understands. Upgrade: pip install -U ctx2param."
            )
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}.")
        if not isinstance(chunk_tokens, int) or chunk_tokens < 8:
            raise ValueError(f"chunk_tokens must be an integer >= 8, got {chunk_tokens!r}.")
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        self.base_model_name_or_path = base_model_name_or_path
        self.base_model_revision = base_model_revision
        self.target_modules = list(target_modules)
        self.target_shapes = {k: [int(d) for d in v] for k, v in (target_shapes or {}).items()}
        self.rank = rank
        self.scale = float(scale)
        self.chunk_tokens = chunk_tokens
        self.schema_version = schema_version
        self.method = self.method_name
        kwargs.pop("method", None)
        super().__init__(**kwargs)
