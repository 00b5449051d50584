"""CompAs: compositional adapters from context (Jukić, Tutek, Šnajder, arXiv 2509.22158; own reading)."""

from ...modeling_utils import register_method
from .configuration_compas import CompAsConfig
from .decoder_compas import CompAsDecoder
from .losses_compas import additivity_loss, alignment_kl, masked_cross_entropy
from .modeling_compas import CompAsGenerator, CompAsModel, ModuleLayout

register_method(CompAsConfig, CompAsModel, exist_ok=True)

__all__ = [
    "CompAsConfig",
    "CompAsDecoder",
    "CompAsGenerator",
    "CompAsModel",
    "ModuleLayout",
    "additivity_loss",
    "alignment_kl",
    "masked_cross_entropy",
]
