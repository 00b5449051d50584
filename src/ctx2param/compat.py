"""Small shims over the library versions ctx2param supports (transformers 4.51 and newer, 5.x;
huggingface-hub 0.30 and newer, whose HTTP client changed from requests to httpx to httpx2)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from typing import Any

__all__ = ["dtype_kwargs", "hub_unreachable_message", "network_errors", "silence_bitsandbytes_kernels_notice"]

#: The logger bitsandbytes' CPU backend warns on, at import time, when the ``kernels`` package is missing.
BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


class _KernelsNotice(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community ... pip install
    kernels" warning (ctx2param's users must not install ``kernels``: with it, transformers and bitsandbytes
    fetch code from the Hub; bitsandbytes then falls back to its own kernels, which is what it should do).
    Every other record of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is not ours to judge
            return True
        return not ("kernels-community" in message and "pip install kernels" in message)


def silence_bitsandbytes_kernels_notice() -> None:
    """Install the filter on bitsandbytes' CPU logger (idempotent; bitsandbytes need not be imported yet:
    the logger it will use is created now and keeps the filter)."""
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if not any(isinstance(f, _KernelsNotice) for f in logger.filters):
        logger.addFilter(_KernelsNotice())


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """``{"dtype": dtype}`` for transformers >= 4.56, ``{"torch_dtype": dtype}`` before (same meaning);
    ``{}`` for ``None``."""
    if dtype is None:
        return {}
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"
    return {key: dtype}


@functools.lru_cache(maxsize=1)
def network_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that mean "the Hub could not be reached" (no network, refused, timed out),
    whichever HTTP client the installed huggingface-hub uses: Python's ``ConnectionError`` and
    ``TimeoutError`` plus the transport errors of httpx2, httpx and requests where installed."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests.exceptions", ("ConnectionError", "Timeout")),
    ):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            continue
        try:
            loaded = importlib.import_module(module)
        except ImportError:
            continue
        errors += [getattr(loaded, name) for name in names if isinstance(getattr(loaded, name, None), type)]
    return tuple(dict.fromkeys(errors))


def hub_unreachable_message(err: BaseException, doing: str = "reach it", offline_hint: bool = True) -> str:
    """One line for a :func:`network_errors` error: which endpoint, what failed, what to do."""
    from huggingface_hub import constants

    hint = " (or set HF_HUB_OFFLINE=1 to use local folders and cached files only)" if offline_hint else ""
    return (
        f"Cannot {doing}: the Hugging Face Hub at {constants.ENDPOINT} cannot be reached "
        f"({type(err).__name__}: {str(err).strip() or 'no answer'}). Check the network connection and "
        f"HF_ENDPOINT, then try again{hint}."
    )


silence_bitsandbytes_kernels_notice()  # at import: before anything imports bitsandbytes
