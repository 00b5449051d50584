"""Context-adaptation methods; importing a method package registers it."""

from . import stream_adapter

__all__ = ["stream_adapter"]
