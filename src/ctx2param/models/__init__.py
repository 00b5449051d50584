"""Context-adaptation methods; importing a method package registers it."""

from . import compas, stream_adapter

__all__ = ["compas", "stream_adapter"]
