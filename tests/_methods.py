"""The tests' own small context-adaptation method, and helpers to make base-model folders for it.

``MeanPool``: the frozen base model's last hidden state, mean-pooled over the context's tokens, goes through
a shared bottleneck (``Linear(d_model, bottleneck)`` + tanh) and then one linear head per target module that
emits that module's rank-r factors. A few lines, but a real method: different contexts give different
adapters, it has its own weights to save and load, and it runs on any causal LM (quantized ones too).
Register it with :func:`register` (idempotent).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ctx2param import (
    ContextAdaptationConfig,
    ContextAdaptationModel,
    ContextAdapter,
    LoraFactors,
    register_method,
    testing_utils,
)


class MeanPoolConfig(ContextAdaptationConfig):
    """Config of the test method: ``bottleneck`` width and the ``init_std`` of the heads."""

    model_type = "ctx2param_test_meanpool"
    method_name = "test_meanpool"

    def __init__(self, bottleneck: int = 8, init_std: float = 0.05, **kwargs: Any) -> None:
        self.bottleneck = bottleneck
        self.init_std = init_std
        super().__init__(**kwargs)


class MeanPoolModel(ContextAdaptationModel):
    """Mean-pooled last hidden state [N, d] -> tanh(Linear) [N, b] -> per-module Linear -> A [N, r, d_in],
    B [N, d_out, r]."""

    config_class = MeanPoolConfig

    def __init__(self, config: MeanPoolConfig, base_model: nn.Module, tokenizer: Any = None) -> None:
        super().__init__(config, base_model, tokenizer)
        hidden = base_model.get_input_embeddings().weight.shape[1]
        self.module_names = list(config.target_shapes)
        self.down = nn.Linear(hidden, config.bottleneck)
        self.heads = nn.ModuleList(
            nn.Linear(config.bottleneck, config.rank * (d_out + d_in))
            for d_out, d_in in config.target_shapes.values()
        )
        with torch.no_grad():
            for layer in [self.down, *self.heads]:
                layer.weight.normal_(0.0, config.init_std)
                layer.bias.normal_(0.0, config.init_std)

    def _generate_batched(self, texts: Sequence[str]) -> ContextAdapter:
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=64)
        enc = {k: v.to(self.base_device) for k, v in enc.items()}
        with torch.no_grad():
            hidden = self.base_lm(**enc, output_hidden_states=True).hidden_states[-1]  # [N, T, d]
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [N, T, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # [N, d]
        z = torch.tanh(self.down(pooled.to(self.down.weight.dtype)))  # [N, b]
        n, r = z.shape[0], self.config.rank
        factors = {}
        for name, head in zip(self.module_names, self.heads, strict=True):
            d_out, d_in = self.config.target_shapes[name]
            flat = head(z)  # [N, r (d_in + d_out)]
            A = flat[:, : r * d_in].reshape(n, r, d_in)
            B = flat[:, r * d_in :].reshape(n, d_out, r)
            factors[name] = LoraFactors(A, B, self.config.scale)
        return ContextAdapter(
            factors, self.config.base_model_name_or_path, self.config.base_model_revision, {"method": "test"}
        )


def register() -> None:
    """Make the test method known to ctx2param and to transformers' AutoConfig (idempotent)."""
    register_method(MeanPoolConfig, MeanPoolModel, exist_ok=True)


def save_tiny_base(folder: str | os.PathLike, arch: str = "llama", seed: int = 0) -> Path:
    """Save a tiny random causal LM and the tiny tokenizer into ``folder``; returns the folder."""
    folder = Path(folder)
    testing_utils.tiny_model(arch, seed=seed).save_pretrained(folder)
    testing_utils.tiny_tokenizer().save_pretrained(folder)
    return folder


def make_generator(base: Any, arch: str = "llama", rank: int = 2, **config_kwargs: Any) -> MeanPoolModel:
    """A fresh test generator for ``base`` (folder, id or loaded model) targeting ``arch``'s layers."""
    register()
    config = MeanPoolConfig(target_modules=testing_utils.TARGET_MODULES[arch], rank=rank, **config_kwargs)
    tokenizer = testing_utils.tiny_tokenizer() if isinstance(base, nn.Module) else None
    torch.manual_seed(0)
    return MeanPoolModel.from_base(base, config, tokenizer=tokenizer)


def _clear_transformers_bitsandbytes_caches() -> None:
    from transformers.utils import import_utils

    for name, fn in vars(import_utils).items():
        if "bitsandbytes" in name and hasattr(fn, "cache_clear"):
            fn.cache_clear()


@contextlib.contextmanager
def bitsandbytes_missing() -> Iterator[None]:
    """Within the block, ``importlib.util.find_spec`` does not find bitsandbytes, as if it were not installed.

    transformers caches its ``is_bitsandbytes_available()`` answer, so the cache is cleared on entry (an
    earlier True would hide the simulation) and on exit (a False would leak into later tests).
    """
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            return None
        return real_find_spec(name, package)

    _clear_transformers_bitsandbytes_caches()
    importlib.util.find_spec = find_spec
    try:
        yield
    finally:
        importlib.util.find_spec = real_find_spec
        _clear_transformers_bitsandbytes_caches()


def load_script(path: str | os.PathLike, name: str) -> Iterator[ModuleType]:
    """Import the script at ``path`` as module ``name``, registered in ``sys.modules`` while in use (so that
    dataclasses and pickling find it) and removed afterwards; for ``yield from`` in a fixture."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
