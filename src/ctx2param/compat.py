"""Small shims over the transformers versions ctx2param supports (4.51 and newer, 5.x)."""

from __future__ import annotations

from typing import Any

__all__ = ["dtype_kwargs"]


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """``{"dtype": dtype}`` for transformers >= 4.56, ``{"torch_dtype": dtype}`` before (same meaning);
    ``{}`` for ``None``."""
    if dtype is None:
        return {}
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"
    return {key: dtype}
