"""DyPRAG: a single-vector parameter translator, the prior-generator baseline (Tan et al.,
"Dynamic Parametric Retrieval Augmented Generation for Test-time Knowledge Enhancement",
arXiv 2503.23895; own reading)."""

from ...modeling_utils import register_method
from .configuration_dyprag import DyPRAGConfig
from .modeling_dyprag import DyPRAGLayout, DyPRAGModel, DyPRAGTranslator

register_method(DyPRAGConfig, DyPRAGModel, exist_ok=True)

__all__ = ["DyPRAGConfig", "DyPRAGLayout", "DyPRAGModel", "DyPRAGTranslator"]
