"""DyPRAG: a single-vector parameter translator (Tan et al., "Dynamic and Parametric Retrieval-Augmented
Generation", arXiv 2503.23895; own reading), the prior-generator baseline."""

from ...modeling_utils import register_method
from .configuration_dyprag import DyPRAGConfig
from .modeling_dyprag import DyPRAGLayout, DyPRAGModel, DyPRAGTranslator

register_method(DyPRAGConfig, DyPRAGModel, exist_ok=True)

__all__ = ["DyPRAGConfig", "DyPRAGLayout", "DyPRAGModel", "DyPRAGTranslator"]
