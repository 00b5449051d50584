"""``ContextAdaptationModel``: a frozen base causal LM plus a method's own modules, saved like a Hub model.

A trained generator is published as an ordinary model repository that holds only the method's weights
(``model.safetensors``, sharded when large) and its ``config.json``; the base model it adapts is named in the
config and loaded from wherever the user keeps it, quantized if they like. Methods subclass
:class:`ContextAdaptationModel`, implement :meth:`ContextAdaptationModel._generate_batched`, and register
themselves with :func:`register_method` when their folder is imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .adapter import ContextAdapter
from .compat import dtype_kwargs
from .configuration_utils import ContextAdaptationConfig
from .errors import AdapterMismatchError, ContextError, Ctx2ParamError
from .file_utils import write_folder_atomically
from .injection import BASE_ALIASES_ATTR, apply_adapter, keep_4bit_exact
from .modules import target_module_shapes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
BASE_PREFIX = "base_lm."
#: The weight files a generator save writes (single, shards, index): an earlier save's never survive.
_WEIGHT_FILE_PATTERNS = (WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "model-*-of-*.safetensors")

__all__ = [
    "BaseModelError",
    "CheckpointError",
    "ContextAdaptationModel",
    "UnknownMethodError",
    "register_method",
    "register_publisher",
    "registered_methods",
]


class UnknownMethodError(Ctx2ParamError, ValueError):
    """A config names a method (``model_type``) that ctx2param does not know."""


class CheckpointError(Ctx2ParamError, OSError):
    """A generator checkpoint is missing files, is corrupted, or cannot be fetched."""


class BaseModelError(CheckpointError):
    """The base model a generator adapts cannot be loaded (not a folder, not cached, not reachable)."""


_METHODS: dict[str, tuple[type[ContextAdaptationConfig], type[ContextAdaptationModel]]] = {}


def register_method(
    config_class: type[ContextAdaptationConfig],
    model_class: type[ContextAdaptationModel],
    exist_ok: bool = False,
) -> None:
    """Make a method known to ``AutoModelForContextAdaptation`` and to transformers' ``AutoConfig``.

    Called by each method's package at import time (``ctx2param.models.compas`` ...), and by users who add
    a method of their own. Code from a checkpoint is never executed: only registered classes are loaded.
    """
    model_type = config_class.model_type
    if not model_type or model_type == ContextAdaptationConfig.model_type:
        raise ValueError(f"{config_class.__name__} needs its own model_type (e.g. 'ctx2param_mymethod').")
    if model_class.config_class is not config_class:
        raise ValueError(f"{model_class.__name__}.config_class must be {config_class.__name__}.")
    if model_type in _METHODS and _METHODS[model_type] != (config_class, model_class) and not exist_ok:
        raise ValueError(
            f"A method with model_type {model_type!r} is already registered: {_METHODS[model_type]}."
        )
    _METHODS[model_type] = (config_class, model_class)
    AutoConfig.register(model_type, config_class, exist_ok=True)


#: What ``ContextAdaptationModel.push_to_hub`` calls: ``ctx2param.hub.push_to_hub``, registered by
#: :func:`register_publisher` when ``ctx2param.hub`` is imported (``import ctx2param`` imports it). A hook
#: rather than an import keeps the direction of imports: hub uses the model base, never the other way round.
_PUBLISHER: Any = None


def register_publisher(publisher: Any) -> None:
    """Make ``publisher(model, repo_id, **kwargs)`` what ``model.push_to_hub(repo_id, **kwargs)`` runs."""
    global _PUBLISHER
    if not callable(publisher):
        raise TypeError(f"The publisher must be callable, got {type(publisher).__name__}.")
    _PUBLISHER = publisher


def registered_methods() -> dict[str, tuple[type[ContextAdaptationConfig], type[ContextAdaptationModel]]]:
    """``{model_type: (config class, model class)}`` of every registered method."""
    return dict(_METHODS)


def method_for_config_dict(config_dict: dict[str, Any], source: str) -> type[ContextAdaptationModel]:
    """The registered model class of a ``config.json`` (clear errors for unknown methods)."""
    model_type = config_dict.get("model_type")
    if model_type not in _METHODS and is_plain_model_type(model_type):
        raise UnknownMethodError(
            f"{source} holds a plain {model_type!r} model (a base causal LM), not a ctx2param generator. Use "
            "it as the base of a generator (base_model=..., or --base on the command line), or make a "
            f"generator for it: CompAsModel.from_base(...) or `ctx2param train compas --base {source}`."
        )
    if model_type not in _METHODS:
        known = sorted(_METHODS) or ["(none registered)"]
        raise UnknownMethodError(
            f"{source} is a {model_type!r} checkpoint, which ctx2param does not know (known: {known}). "
            "Upgrade ctx2param, or import the package that registers this method first; ctx2param never "
            "runs code from a checkpoint."
        )
    return _METHODS[model_type][1]


def is_plain_model_type(model_type: Any) -> bool:
    """True for the ``model_type`` of an ordinary transformers model (``"llama"``, ``"gpt2"``, ...), i.e.
    one transformers knows that is not a registered ctx2param method."""
    if not isinstance(model_type, str) or model_type in _METHODS or model_type.startswith("ctx2param"):
        return False
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def _check_quantization_available(quantization_config: Any) -> None:
    if quantization_config is None:
        return
    quant_method = getattr(quantization_config, "quant_method", None)
    if isinstance(quantization_config, dict):
        quant_method = quantization_config.get("quant_method", "bitsandbytes")
    if "bitsandbytes" in str(quant_method) and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "A bitsandbytes quantization_config was given but bitsandbytes is not installed. "
            "Install it with: pip install 'ctx2param[quant]' (or pip install bitsandbytes)."
        )


def _base_load_message(base: str | os.PathLike, revision: str | None, err: Exception) -> str:
    from huggingface_hub import constants

    where = f"{str(base)!r}" + (f" (revision {revision!r})" if revision else "")
    if Path(base).expanduser().exists():
        hint = "The folder exists but does not hold a loadable causal LM (config.json and weights)."
    elif constants.HF_HUB_OFFLINE:
        hint = (
            "It is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
            "downloading it: download it once while online, or pass base_model=... (a Hub id, a folder or a "
            "loaded model)."
        )
    else:
        hint = (
            "It is not a local folder, and the Hub did not serve it (check the id, the revision, your token "
            "and the network), or pass base_model=... (a Hub id, a folder or a loaded model)."
        )
    return f"Cannot load the base model {where}: {hint} ({type(err).__name__}: {err})"


def load_base_model(
    base: str | os.PathLike | nn.Module,
    *,
    revision: str | None = None,
    quantization_config: Any = None,
    device_map: Any = None,
    dtype: Any = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a base causal LM from an id or folder (or pass through a loaded one), frozen and in eval mode."""
    if isinstance(base, nn.Module):
        if quantization_config is not None:
            raise ValueError(
                "quantization_config applies when the base is loaded by name; this one is already loaded."
            )
        model = base
    else:
        _check_quantization_available(quantization_config)
        load_kwargs: dict[str, Any] = {"revision": revision, **kwargs}
        for key, value in (
            ("quantization_config", quantization_config),
            ("device_map", device_map),
            ("local_files_only", local_files_only),
            ("token", token),
        ):
            if value is not None:
                load_kwargs[key] = value
        load_kwargs.update(dtype_kwargs(dtype))  # `torch_dtype` before transformers 4.56
        try:
            model = AutoModelForCausalLM.from_pretrained(str(base), **load_kwargs)
        except OSError as err:
            raise BaseModelError(_base_load_message(base, revision, err)) from err
        except ValueError as err:  # a folder that holds no model: transformers says "Unrecognized model"
            if not Path(base).expanduser().is_dir():
                raise
            raise BaseModelError(_base_load_message(base, revision, err)) from err
    keep_4bit_exact(model)  # bitsandbytes' CPU repacking would stop gradients through 4-bit layers
    model.requires_grad_(False)
    return model.eval()


def _load_tokenizer(base: str | os.PathLike | nn.Module, revision: str | None, **kwargs: Any) -> Any:
    source = (
        getattr(getattr(base, "config", None), "_name_or_path", None) if isinstance(base, nn.Module) else base
    )
    if not source:
        return None
    try:
        return AutoTokenizer.from_pretrained(str(source), revision=revision, **kwargs)
    except (OSError, ValueError):
        return None


class ContextAdaptationModel(PreTrainedModel):
    """A frozen base causal LM (``self.base_lm``) plus a method's trainable modules.

    Subclasses define ``config_class`` and implement :meth:`_generate_batched`; ``save_pretrained`` writes
    only their own weights, ``from_pretrained`` loads the base named in the config (or the one passed).

    Args:
        config: the method's config; ``target_shapes`` must match ``base_model``.
        base_model: the causal LM to adapt (frozen here).
        tokenizer: the base model's tokenizer (needed by ``generate_adapter`` on text).
    """

    config_class: ClassVar[type[ContextAdaptationConfig]] = ContextAdaptationConfig
    base_model_prefix = "base_lm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules: ClassVar[list[str]] = []

    def __init__(self, config: ContextAdaptationConfig, base_model: nn.Module, tokenizer: Any = None) -> None:
        super().__init__(config)
        if not isinstance(base_model, nn.Module):
            raise TypeError(f"base_model must be a loaded torch model, got {type(base_model).__name__}.")
        base_model.requires_grad_(False)
        self.base_lm = base_model.eval()
        self.tokenizer = tokenizer
        self.check_base_shapes(base_model)
        # the generator's adapters name the base as its config does; the base model answers to that id too
        # (apply_adapter compares ids), also when it was loaded from elsewhere (base_model=...)
        base_id = config.base_model_name_or_path
        aliases = tuple(getattr(base_model, BASE_ALIASES_ATTR, ()))
        if base_id and base_id not in aliases:
            setattr(base_model, BASE_ALIASES_ATTR, (*aliases, base_id))

    # ------------------------------------------------------------------------------- transformers hooks
    def init_weights(self) -> None:
        """Methods initialise their own modules in ``__init__``; the base model's weights are left alone."""

    def _init_weights(self, module: nn.Module) -> None:  # noqa: D401 - transformers hook
        """No-op: see :meth:`init_weights`."""

    def get_adapter_root(self) -> nn.Module:
        """The module whose ``named_modules()`` name the adapters' targets (the base LM)."""
        return self.base_lm

    def train(self, mode: bool = True) -> ContextAdaptationModel:
        """Train the method's modules; the frozen base always stays in eval mode (no dropout)."""
        super().train(mode)
        self.base_lm.eval()
        return self

    # -------------------------------------------------------------------------------------- the base
    @property
    def base_device(self) -> torch.device:
        """Device of the base model's input embeddings (where inputs go)."""
        return self.base_lm.get_input_embeddings().weight.device

    def check_base_shapes(self, base_model: nn.Module) -> None:
        """Raise :class:`AdapterMismatchError` if ``base_model``'s target layers differ from the config's."""
        if not self.config.target_shapes:
            return
        found = target_module_shapes(base_model, self.config.target_modules)
        expected = {name: tuple(shape) for name, shape in self.config.target_shapes.items()}
        if found != expected:
            missing = sorted(set(expected) - set(found))[:2]
            differing = [
                (n, expected[n], found[n]) for n in expected if n in found and found[n] != expected[n]
            ][:2]
            base_name = getattr(
                getattr(base_model, "config", None), "_name_or_path", type(base_model).__name__
            )
            raise AdapterMismatchError(
                f"The base model {base_name!r} does not match the one this generator was made for "
                f"({self.config.base_model_name_or_path!r}): missing layers {missing}, differing "
                f"(name, expected (d_out, d_in), found) {differing}; {len(expected)} target layers expected, "
                f"{len(found)} found."
            )

    # ------------------------------------------------------------------------------ adapter generation
    def _generate_batched(self, texts: Sequence[str]) -> ContextAdapter:
        """Method-specific: one batched adapter (batch ``len(texts)``) for context pieces that fit a chunk."""
        raise NotImplementedError(f"{type(self).__name__} must implement _generate_batched(texts).")

    def validate_contexts(self, contexts: str | Sequence[str]) -> list[str]:
        """Normalise ``contexts`` to a non-empty list of non-blank strings, or raise :class:`ContextError`."""
        texts = [contexts] if isinstance(contexts, str) else contexts
        if not isinstance(texts, Sequence) or not texts:
            raise ContextError("generate_adapter needs a context string or a non-empty list of strings.")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ContextError(f"Context {i} is a {type(text).__name__}, not a string.")
            if not text.strip():
                raise ContextError(f"Context {i} is empty or only whitespace; there is nothing to adapt to.")
        return list(texts)

    def generate_adapter(self, contexts: str | Sequence[str]) -> ContextAdapter | list[ContextAdapter]:
        """Turn context into adapter(s): a string gives one :class:`ContextAdapter`, a list gives a list.

        The list is processed in one batched pass. Methods may override this to chunk long inputs.
        """
        texts = self.validate_contexts(contexts)
        batched = self._generate_batched(texts)
        adapters = batched.unbind()
        return adapters[0] if isinstance(contexts, str) else adapters

    # ------------------------------------------------------------------------------------ training contract
    def collate_training_examples(self, examples: Sequence[Any]) -> dict[str, Any]:
        """Method-specific: ``ctx2param.training.data.TrainingExample`` objects -> one training batch."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement training (collate_training_examples)."
        )

    def training_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Method-specific: the weighted loss terms of a batch; ``"loss"`` is their total (what is minimised).

        The other keys (``"alignment"``, ``"additivity"``, ...) are logged by the trainer.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement training (training_losses).")

    # ------------------------------------------------------------------------------ adapted inference
    @contextmanager
    def adapted(
        self, adapter: ContextAdapter | None, merge: bool = False
    ) -> Iterator[ContextAdaptationModel]:
        """Within the block, the base model computes with the adapter's update (restored exactly after).

        ``merge=True`` adds ΔW into the (float) weights for the block instead of hooking the target modules,
        so that decoding costs what the bare model's does; see :func:`ctx2param.apply_adapter`.
        """
        with apply_adapter(self.base_lm, adapter, merge=merge):
            yield self

    def forward(self, *args: Any, adapter: ContextAdapter | None = None, **kwargs: Any) -> Any:
        """The base model's forward, with ``adapter`` applied when given."""
        with apply_adapter(self.base_lm, adapter):
            return self.base_lm(*args, **kwargs)

    def generate(self, *args: Any, adapter: ContextAdapter | None = None, **kwargs: Any) -> Any:
        """The base model's ``generate``, with ``adapter`` applied when given."""
        with apply_adapter(self.base_lm, adapter):
            return self.base_lm.generate(*args, **kwargs)

    # ------------------------------------------------------------------------------- own parameters
    def method_state_dict(self) -> dict[str, torch.Tensor]:
        """The method's own weights (everything but the base model)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(BASE_PREFIX)}

    def method_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the method's own modules (the ones training updates)."""
        for name, param in self.named_parameters():
            if not name.startswith(BASE_PREFIX):
                yield param

    def num_method_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.method_parameters() if p.requires_grad or not trainable_only)

    def _method_modules(self) -> Iterator[nn.Module]:
        for name, child in self.named_children():
            if name != "base_lm":
                yield child

    def to_base_device(self, dtype: torch.dtype | None = None) -> ContextAdaptationModel:
        """Move the method's modules to the base model's device (and ``dtype`` if given); the base stays."""
        for module in self._method_modules():
            module.to(device=self.base_device, dtype=dtype)
        return self

    # --------------------------------------------------------------------------------------- creation
    @classmethod
    def from_base(
        cls,
        base: str | os.PathLike | nn.Module,
        config: ContextAdaptationConfig | None = None,
        tokenizer: Any = None,
        **base_kwargs: Any,
    ) -> ContextAdaptationModel:
        """A fresh, untrained generator for ``base`` (a Hub id, a folder or a loaded causal LM).

        ``base_kwargs`` (``quantization_config``, ``device_map``, ``dtype``, ``revision``, ...) go to the
        base's ``from_pretrained``. The config's base id, revision and target shapes are taken from the base.
        """
        config = config if config is not None else cls.config_class()
        if not isinstance(config, cls.config_class):
            raise TypeError(
                f"{cls.__name__}.from_base needs a {cls.config_class.__name__}, got {type(config).__name__}."
            )
        revision = base_kwargs.get("revision")
        base_model = load_base_model(base, **base_kwargs)
        if isinstance(base, nn.Module):
            base_name = getattr(base_model.config, "_name_or_path", None) or config.base_model_name_or_path
        else:
            base_name = str(base)
        config.base_model_name_or_path = base_name
        config.base_model_revision = revision or config.base_model_revision
        config.target_shapes = {
            n: list(s) for n, s in target_module_shapes(base_model, config.target_modules).items()
        }
        if tokenizer is None:
            tokenizer = _load_tokenizer(base, revision)
        model = cls(config, base_model, tokenizer=tokenizer)
        return model.to_base_device()

    # ----------------------------------------------------------------------------------------- saving
    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | os.PathLike,
        max_shard_size: int | str = "2GB",
        model_card: str | None = None,
        **_ignored: Any,
    ) -> Path:
        """Write ``config.json`` and the method's weights (safetensors, sharded above ``max_shard_size``).

        The base model's weights are never written. The folder is replaced as one version
        (:func:`~ctx2param.file_utils.write_folder_atomically`): after a crash it holds the previous save or
        this one, complete; earlier weight files (old shards, a shard index after an unsharded save) do not
        survive, other files in the folder (checkpoints, card data) stay. ``model_card`` (the text of a
        README.md) is written beside them when given.
        """
        from huggingface_hub import split_torch_state_dict_into_shards

        state = {k: v.detach().contiguous().cpu() for k, v in self.method_state_dict().items()}
        split = split_torch_state_dict_into_shards(
            state, max_shard_size=max_shard_size, filename_pattern="model{suffix}.safetensors"
        )
        tensors = {file: {k: state[k] for k in keys} for file, keys in split.filename_to_tensors.items()}
        self.config.architectures = [type(self).__name__]
        jsons: dict[str, Any] = {CONFIG_NAME: self.config.to_dict()}
        if split.is_sharded:
            jsons[WEIGHTS_INDEX_NAME] = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                "weight_map": split.tensor_to_filename,
            }
        texts = {"README.md": model_card} if model_card is not None else {}
        return write_folder_atomically(
            save_directory, tensors=tensors, jsons=jsons, texts=texts, remove=_WEIGHT_FILE_PATTERNS
        )

    def push_to_hub(  # type: ignore[override]
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        *,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str = "2GB",
        card_data: Any = None,
        base_model_id: str | None = None,
        base_revision: str | None = None,
    ) -> str:
        """Publish the generator: ``config.json``, its own weights (never the base's), ``card_data.json`` and
        a model card rendered from ``model_cards/``; the same upload as ``ctx2param.hub.push_to_hub(self,
        repo_id, ...)``, which it calls.

        Design: the model base does not import ``ctx2param.hub`` (hub sits above it); ``ctx2param.hub``
        registers itself through :func:`register_publisher` when imported, which ``import ctx2param`` does.
        Arguments are those of ``ctx2param.hub.push_to_hub`` (transformers' ``repo_id``, ``private``,
        ``token``, ``commit_message``, ``revision``, ``create_pr``, ``max_shard_size``, plus ``card_data``,
        ``base_model_id`` and ``base_revision``); others (``safe_serialization``, ``use_temp_dir``, ...) are a
        ``TypeError``. Returns the URL of the commit.
        """
        if _PUBLISHER is None:
            raise Ctx2ParamError(
                "No publisher is registered for ContextAdaptationModel.push_to_hub; `import ctx2param` "
                "(or ctx2param.hub) registers it. Or call ctx2param.hub.push_to_hub(model, repo_id)."
            )
        options: dict[str, Any] = {
            "private": private,
            "token": token,
            "revision": revision,
            "create_pr": create_pr,
            "max_shard_size": max_shard_size,
            "card_data": card_data,
            "base_model_id": base_model_id,
            "base_revision": base_revision,
        }
        if commit_message is not None:
            options["commit_message"] = commit_message
        return _PUBLISHER(self, repo_id, **options)

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        base_model: str | os.PathLike | nn.Module | None = None,
        *,
        tokenizer: Any = None,
        quantization_config: Any = None,
        device_map: Any = None,
        dtype: Any = None,
        revision: str | None = None,
        base_revision: str | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        **base_kwargs: Any,
    ) -> ContextAdaptationModel:
        """Load a generator: its config and weights from ``pretrained_model_name_or_path``, the base it adapts
        from ``base_model`` or, by default, from the id and revision its config names.

        ``quantization_config``, ``device_map``, ``dtype``, ``local_files_only`` and ``token`` go to the base
        model's ``from_pretrained``; the method's own modules follow the base's device and, for float
        ``dtype``, its dtype. ``revision`` is the generator repository's revision.
        """
        folder = resolve_checkpoint(
            pretrained_model_name_or_path,
            revision=revision,
            local_files_only=local_files_only,
            token=token,
            cache_dir=cache_dir,
        )
        config_dict = _read_config(folder)
        model_class = method_for_config_dict(config_dict, str(pretrained_model_name_or_path))
        if cls is not ContextAdaptationModel and not issubclass(model_class, cls):
            raise UnknownMethodError(
                f"{pretrained_model_name_or_path} holds a {config_dict.get('model_type')!r} generator, not a "
                f"{cls.__name__}; load it with AutoModelForContextAdaptation.from_pretrained."
            )
        config = model_class.config_class.from_dict(config_dict)
        base = base_model if base_model is not None else config.base_model_name_or_path
        if base is None:
            raise CheckpointError(
                f"{folder / CONFIG_NAME} names no base model; pass base_model=... explicitly."
            )
        base_rev = base_revision or (config.base_model_revision if base_model is None else None)
        base_lm = load_base_model(
            base,
            revision=base_rev,
            quantization_config=quantization_config,
            device_map=device_map,
            dtype=dtype,
            local_files_only=local_files_only,
            token=token,
            **base_kwargs,
        )
        if tokenizer is None:
            tokenizer = _load_tokenizer(base, base_rev, local_files_only=local_files_only or False)
        model = model_class(config, base_lm, tokenizer=tokenizer)
        model.load_method_weights(folder)
        float_dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
        return model.to_base_device(float_dtype).eval()

    def load_method_weights(self, folder: str | os.PathLike) -> None:
        """Load the method's weights from a checkpoint folder (single file or sharded), strictly."""
        folder = Path(folder)
        state = _read_weights(folder)
        expected = set(self.method_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise CheckpointError(
                f"The weights in {folder} do not fit {type(self).__name__} as configured: missing "
                f"{missing[:4]}, unexpected {unexpected[:4]}."
            )
        own = self.method_state_dict()
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(own[key].shape):
                raise CheckpointError(
                    f"{folder}: weight {key!r} has shape {tuple(tensor.shape)}, the model expects "
                    f"{tuple(own[key].shape)}."
                )
        self.load_state_dict(state, strict=False)


def resolve_checkpoint(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local folder holding the generator's files: the folder itself, or a download of the method's files
    only (config, safetensors weights and index, model card) from the Hub."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointError(f"{path} has no {CONFIG_NAME}; it is not a ctx2param generator folder.")
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the folder that holds {CONFIG_NAME}.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = [CONFIG_NAME, "*.safetensors", WEIGHTS_INDEX_NAME, "README.md"]
    try:
        folder = snapshot_download(
            str(name_or_path),
            revision=revision,
            allow_patterns=patterns,
            local_files_only=bool(local_files_only),
            token=token,
            cache_dir=cache_dir,
        )
    except HFValidationError as err:
        raise CheckpointError(
            f"{name_or_path!r} is neither a local folder nor a valid Hub repository id."
        ) from err
    except RepositoryNotFoundError as err:
        raise CheckpointError(
            f"No generator repository {name_or_path!r} on the Hub (or no access to it)."
        ) from err
    except RevisionNotFoundError as err:
        raise CheckpointError(f"{name_or_path!r} has no revision {revision!r}.") from err
    except LocalEntryNotFoundError as err:
        raise CheckpointError(
            f"{name_or_path!r} is not in the local cache and the Hub cannot be reached (offline mode or no "
            f"network). Missing: {CONFIG_NAME} and weights of {name_or_path}. Download it once online, or "
            "pass a local folder."
        ) from err
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{name_or_path!r} has no {CONFIG_NAME}; it is not a ctx2param generator repository."
        )
    return folder


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Cannot read {folder / CONFIG_NAME}: {err}.") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{folder / CONFIG_NAME} must hold a JSON object.")
    return data


def weight_file_names(folder: str | os.PathLike) -> list[str]:
    """Names of a generator folder's weight files: those the shard index lists, else ``model.safetensors``.

    The index must be a JSON object whose ``weight_map`` maps tensor names to plain file names in the
    folder itself: a name with a folder part (``../x``, ``sub/x``), an absolute path or a non-string is a
    :class:`CheckpointError`, so an index can never make the loader read a file outside the folder.
    """
    index = Path(folder) / WEIGHTS_INDEX_NAME
    if not index.is_file():
        return [WEIGHTS_NAME]
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"Cannot read the shard index {index}: {err}.") from err
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"The shard index {index} has no weight_map (tensor name -> shard file).")
    for tensor, name in weight_map.items():
        if (
            not isinstance(name, str)
            or name in ("", ".", "..")
            or Path(name).name != name
            or "\\" in name
            or os.path.isabs(name)
        ):
            raise CheckpointError(
                f"The shard index {index} maps {tensor!r} to {name!r}, which is not a file name in the "
                "folder; shard files must lie beside the index. The checkpoint is damaged or not trustworthy."
            )
    return sorted(set(weight_map.values()))


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = weight_file_names(folder)
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(
                f"Missing weight file {path}. The checkpoint is incomplete; download or save it again."
            )
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"Cannot read {path}: {err}. The file is corrupted or truncated.") from err
    return state
