"""ctx2param: turn context into adapter parameters for Hugging Face causal language models."""

from .adapter import ContextAdapter, compose, stack
from .injection import apply_adapter, attach_adapter, detach_adapter, merge_adapter, unmerge_adapter

__version__ = "0.1.0"

__all__ = [
    "ContextAdapter",
    "apply_adapter",
    "attach_adapter",
    "compose",
    "detach_adapter",
    "merge_adapter",
    "stack",
    "unmerge_adapter",
]
