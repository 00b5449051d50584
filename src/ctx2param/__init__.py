"""ctx2param: turn context into adapter parameters for Hugging Face causal language models."""

from .adapter import ContextAdapter, LoraFactors, compose, stack
from .auto import AutoModelForContextAdaptation
from .configuration_utils import ContextAdaptationConfig
from .injection import apply_adapter, attach_adapter, detach_adapter, merge_adapter, unmerge_adapter
from .modeling_utils import ContextAdaptationModel, register_method

__version__ = "0.1.0"

__all__ = [
    "AutoModelForContextAdaptation",
    "ContextAdaptationConfig",
    "ContextAdaptationModel",
    "ContextAdapter",
    "LoraFactors",
    "apply_adapter",
    "attach_adapter",
    "compose",
    "detach_adapter",
    "merge_adapter",
    "register_method",
    "stack",
    "unmerge_adapter",
]
