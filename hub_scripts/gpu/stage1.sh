#!/usr/bin/env bash
# GPU call 1 of a lease: stage the first half of the SmolLM2 GGUF and install the carried wheels.
#   carry: .gguf/smollm2.gguf.part-aa, .whl
set -euo pipefail
source hub_scripts/gpu/env.sh
cp .gguf/smollm2.gguf.part-aa "$STAGE/"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "accelerate", "huggingface_hub", "safetensors", "gguf", "datasets"):
    try:
        print(f"{name:16s} {importlib.import_module(name).__version__}")
    except Exception as err:  # noqa: BLE001
        print(f"{name:16s} FAILED: {err!r}")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
ls -la "$STAGE"
