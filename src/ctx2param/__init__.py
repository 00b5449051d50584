"""ctx2param: turn context into adapter parameters for Hugging Face causal language models."""

# First: importing compat filters bitsandbytes' line about installing `kernels` (which ctx2param's users must
# not install) out of whatever imports bitsandbytes later (transformers, for a quantized base).
from . import compat as _compat  # noqa: F401

# Importing hub registers ctx2param.hub.push_to_hub as what model.push_to_hub(repo_id) runs.
from . import hub as _hub  # noqa: F401
from .adapter import ContextAdapter, LoraFactors, compose, stack
from .auto import AutoModelForContextAdaptation
from .configuration_utils import ContextAdaptationConfig
from .injection import apply_adapter, attach_adapter, detach_adapter, merge_adapter, unmerge_adapter
from .modeling_utils import ContextAdaptationModel, register_method

# Importing the method packages registers them with AutoModelForContextAdaptation and transformers' Auto
# classes (the methods depend on the shared base above, never the other way round).
from .models.compas import CompAsConfig, CompAsModel  # noqa: E402
from .models.dyprag import DyPRAGConfig, DyPRAGModel  # noqa: E402
from .models.stream_adapter import AdapterStream, StreamAdapterConfig, StreamAdapterModel  # noqa: E402
from .store import AdapterStore

__version__ = "0.1.0"

__all__ = [
    "AdapterStore",
    "AdapterStream",
    "AutoModelForContextAdaptation",
    "CompAsConfig",
    "CompAsModel",
    "ContextAdaptationConfig",
    "ContextAdaptationModel",
    "ContextAdapter",
    "DyPRAGConfig",
    "DyPRAGModel",
    "LoraFactors",
    "StreamAdapterConfig",
    "StreamAdapterModel",
    "apply_adapter",
    "attach_adapter",
    "compose",
    "detach_adapter",
    "merge_adapter",
    "register_method",
    "stack",
    "unmerge_adapter",
]
