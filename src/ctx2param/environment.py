"""Where code ran: library versions and hardware, as recorded by evaluation reports, benchmarks and cards.

One reader for every record, so that a results file, a benchmark JSON and a model card describe a machine the
same way. torch is imported only by :func:`hardware_info`.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_PACKAGES", "hardware_info", "library_versions"]

#: The distributions a generator depends on.
DEFAULT_PACKAGES: tuple[str, ...] = (
    "ctx2param",
    "torch",
    "transformers",
    "peft",
    "huggingface-hub",
    "safetensors",
)

#: CPU flags that decide how fast bf16 / fp32 kernels run.
_CPU_FLAGS_OF_NOTE = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"})


def library_versions(packages: Iterable[str] = DEFAULT_PACKAGES) -> dict[str, str | None]:
    """``{"python": ..., package: version}`` for the given distributions; ``None`` for one not installed.

    ``ctx2param`` run from a source tree (``PYTHONPATH=src``, not installed) reports its ``__version__``.
    """
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if "ctx2param" in out and out["ctx2param"] is None:
        from . import __version__

        out["ctx2param"] = __version__
    return out


def hardware_info(device: torch.device | str | None = None, gpu_details: bool = True) -> dict[str, Any]:
    """The machine: platform, CPU model, core count, CPU flags of note, memory, torch threads; on a CUDA
    ``device`` (default: CUDA when available) also the GPU's name and count and, with ``gpu_details``, its
    memory and the CUDA version. Fields that cannot be read are left out."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)
        info["cpu_model"] = model or info["cpu_model"]
        flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
        info["cpu_flags_of_note"] = sorted(f for f in flags if f in _CPU_FLAGS_OF_NOTE)
    except OSError:
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            kb = int(next(ln for ln in fh if ln.startswith("MemTotal")).split()[1])
        info["memory_gb"] = round(kb / 1024**2, 1)
    except (OSError, StopIteration, ValueError):
        pass
    device = torch.device(device) if device is not None else None
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if on_cuda and torch.cuda.is_available():
        index = device if device is not None and device.index is not None else torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(index)
        info["gpu_count"] = torch.cuda.device_count()
        if gpu_details:
            memory = torch.cuda.get_device_properties(index).total_memory
            info["gpu_memory_gb"] = round(memory / 1024**3, 1)
            info["cuda"] = torch.version.cuda
    return info
