"""Context-adaptation methods; importing a method package registers it."""

from . import compas, dyprag, stream_adapter

__all__ = ["compas", "dyprag", "stream_adapter"]
