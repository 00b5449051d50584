"""Exceptions raised by ctx2param. Each says what is wrong and what to do about it."""

from __future__ import annotations


class Ctx2ParamError(Exception):
    """Base class of every error ctx2param raises on purpose."""


class AdapterMismatchError(Ctx2ParamError, ValueError):
    """Two adapters, or an adapter and a model, do not fit each other (base, modules, shapes, dtype)."""


class AdapterFileError(Ctx2ParamError, ValueError):
    """An adapter folder or file is missing, truncated, corrupted or of an unknown version."""


class QuantizedMergeError(Ctx2ParamError, TypeError):
    """A merge into a quantized (bitsandbytes) layer was asked for; those take adapters unmerged only."""


class ContextError(Ctx2ParamError, ValueError):
    """A context given to a generator is empty, malformed or cannot be chunked."""


class TiedWeightMergeError(Ctx2ParamError, ValueError):
    """A merge for good into a weight that another part of the model shares (tied embeddings)."""


class PublishError(Ctx2ParamError, OSError):
    """Something cannot be published: offline mode, no network, a bad folder, or the Hub refused it."""
