"""StreamAdapter (Muhtar et al., arXiv 2411.09289), as this project reads it: a stream of context chunks is
absorbed into one fixed-size state, and that state becomes a low-rank update of the base model's weights.

Shapes used below: ``n`` chunks in a base forward, ``N`` streams, ``L`` adapted layers, ``m`` = rank
(learned queries per layer), ``d_h`` = ``state_dim``, ``T`` tokens per chunk, ``kv`` key/value heads, ``g``
query heads per key/value head, ``hd`` head size, ``d_attn = kv · g · hd``.

1. Context mapping. The frozen base runs on a chunk with its own KV cache; for each adapted layer the keys
   and values ``[n, kv, T, hd]`` (padding masked out) are read by ``m`` learned queries per query head
   (``[L, kv, g·m, hd]``). The ``m`` outputs per layer are layer-normalised (an affine per layer) and
   projected to ``d_h``: the chunk summary ``S [n, L, m, d_h]``.
2. Gated recurrence. ``g = σ(W_g [h; S] + b_g)``, ``h ← g ⊙ h + (1 − g) ⊙ S``, starting from a learned
   ``h_0``. The state ``h [N, L, m, d_h]`` has the same size after 1 or 10 000 chunks.
3. Weight absorption. ``z = LayerNorm(h) + e_layer``; per module type (``self_attn.q_proj`` ...) one
   linear head shared by all layers maps each of the m vectors of ``z`` to a column of ``B``
   (``generated_factor="B"``) or a row of ``A`` (``"A"``); the other factor is a learned matrix per module.
   The result is a rank-m :class:`~ctx2param.adapter.ContextAdapter`, so the adapter algebra, PEFT export
   and the Hub apply unchanged.

Training (``training_losses``): teacher = the base with the whole context and the query in its prompt;
student = the base with the absorbed update and only the query; KL(teacher ‖ student) on the answer tokens
plus the student's cross-entropy on them. The fast path (the default) keeps the updates stacked per module
kind (:meth:`StreamAdapterModel.state_to_stacked`, a :class:`~ctx2param.stacked.StackedAdapter` attached with
:func:`~ctx2param.injection.attach_stacked_adapter`), reads chunk, teacher and student rows in length
buckets, folds all streams at once per step and gathers the scored positions by indices the collator made
(:mod:`.collation_stream_adapter`), so that a step never waits for the host; ``reference=True`` computes the
same numbers module by module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from ...adapter import ContextAdapter, LoraFactors
from ...errors import ContextError
from ...injection import attach_adapter, attach_stacked_adapter
from ...modeling_utils import ContextAdaptationModel
from ...modules import LayerKindLayout, target_module_shapes
from ...stacked import StackedAdapter
from .collation_stream_adapter import IGNORE_INDEX, ExampleRows, layout_batch
from .configuration_stream_adapter import StreamAdapterConfig

__all__ = ["AdapterStream", "StreamAdapterLayout", "StreamAdapterModel"]


# ------------------------------------------------------------------------------------------ base geometry
@dataclass(frozen=True)
class _AttentionGeometry:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int | None

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads


def _attention_geometry(base_model: nn.Module) -> _AttentionGeometry:
    config = getattr(base_model, "config", None)
    if config is None:
        raise TypeError(
            f"StreamAdapter needs a transformers causal LM; {type(base_model).__name__} has no config."
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    num_layers = getattr(text, "num_hidden_layers", None)
    if not num_heads or not num_layers:
        raise ValueError(
            f"Cannot read the attention layout of {type(base_model).__name__} (num_attention_heads, "
            "num_hidden_layers); StreamAdapter reads each layer's key/value cache and needs them."
        )
    num_kv = getattr(text, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text, "head_dim", None) or (hidden // num_heads if hidden else None)
    if not head_dim or num_heads % num_kv:
        raise ValueError(
            f"Unsupported attention layout in {type(base_model).__name__}: {num_heads} heads, {num_kv} "
            f"key/value heads, head size {head_dim}."
        )
    max_positions = getattr(text, "max_position_embeddings", None)
    return _AttentionGeometry(int(num_layers), int(num_heads), int(num_kv), int(head_dim), max_positions)


@dataclass(frozen=True)
class _ModuleKind:
    """All target modules of one type (e.g. ``self_attn.q_proj``): one head, one stacked learned factor."""

    key: str  # name in the ModuleDict / ParameterDict (dots replaced)
    suffix: str  # module path after the layer index
    names: tuple[str, ...]  # full module names, in layer order
    layer_positions: tuple[int, ...]  # index into the adapted layers of each name
    d_out: int
    d_in: int


class StreamAdapterLayout(LayerKindLayout):
    """StreamAdapter's :class:`~ctx2param.modules.LayerKindLayout` (one absorption head per module kind,
    shared by the layers)."""

    method = "StreamAdapter"
    sharing = "adapts modules of decoder layers and shares one head per module type across them"
    hint = " Remove it from target_modules."
    kind_sharing = "shares one head per module type across layers"


def _module_kinds(layout: LayerKindLayout) -> list[_ModuleKind]:
    """The layout's kinds as :class:`_ModuleKind` records (names and layer positions in config order)."""
    kinds = []
    for k, (kind, (d_out, d_in)) in enumerate(zip(layout.kinds, layout.kind_shapes, strict=True)):
        members = [(name, layer) for name, (layer, kk) in layout.positions.items() if kk == k]
        kinds.append(
            _ModuleKind(
                key=layout.key(kind),
                suffix=kind,
                names=tuple(name for name, _ in members),
                layer_positions=tuple(layer for _, layer in members),
                d_out=d_out,
                d_in=d_in,
            )
        )
    return kinds


def _cache_layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[n, kv, T, hd]`` of one layer from a transformers cache (``Cache`` objects of
    transformers 4.5x/5.x, or the legacy tuple of ``(key, value)`` pairs)."""
    if hasattr(cache, "layers"):  # transformers >= 4.56: Cache.layers[i].keys / .values
        entry = cache.layers[layer]
        keys, values = entry.keys, entry.values
    elif hasattr(cache, "key_cache"):  # transformers 4.4x-4.55 DynamicCache
        keys, values = cache.key_cache[layer], cache.value_cache[layer]
    else:
        keys, values = cache[layer][0], cache[layer][1]
    if keys is None or values is None or keys.dim() != 4:
        raise ValueError(
            f"The base model's cache has no key/value states for layer {layer}; StreamAdapter cannot adapt "
            "models whose layers share or skip their KV cache."
        )
    return keys, values


def _dynamic_cache() -> Any:
    """An empty cache that keeps every token of every layer (no sliding-window truncation)."""
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover - very old transformers
        return None
    return DynamicCache()


# --------------------------------------------------------------------------------------------- chunking
def _split_text(text: str, tokenizer: Any, max_tokens: int) -> list[str]:
    """Split ``text`` into pieces of at most ``max_tokens`` tokens, at sentence boundaries where possible.

    Uses ``ctx2param.training.data.chunk_text`` when it is installed, else an equivalent local rule: sentences
    (split after ``.!?`` and at blank lines) are packed greedily; a sentence longer than the limit is cut by
    tokens.
    """
    try:
        from ...training.data import chunk_text  # type: ignore[import-not-found]
    except ImportError:
        chunk_text = None
    if chunk_text is not None:
        return [c for c in chunk_text(text, tokenizer, max_tokens) if c.strip()]
    return _local_chunk_text(text, tokenizer, max_tokens)


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _cut_by_tokens(text: str, tokenizer: Any, max_tokens: int) -> list[str]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, start = [], 0
    while start < len(ids):
        step = max_tokens
        window = tokenizer.decode(ids[start : start + step])
        while step > 1 and _count(tokenizer, window) > max_tokens:
            step -= 1
            window = tokenizer.decode(ids[start : start + step])
        if window.strip():
            pieces.append(window.strip())
        start += step
    return pieces


def _pack(pieces: Sequence[str], tokenizer: Any, max_tokens: int, fallback: Any) -> list[str]:
    """Greedily join ``pieces`` with spaces into strings of at most ``max_tokens`` tokens; a piece that is
    longer on its own is split by ``fallback(piece)``."""
    out: list[str] = []
    current = ""
    for piece in pieces:
        if _count(tokenizer, piece) > max_tokens:
            if current:
                out.append(current)
                current = ""
            out.extend(fallback(piece))
            continue
        candidate = f"{current} {piece}" if current else piece
        if _count(tokenizer, candidate) <= max_tokens:
            current = candidate
        else:
            out.append(current)
            current = piece
    if current:
        out.append(current)
    return out


def _local_chunk_text(text: str, tokenizer: Any, max_tokens: int) -> list[str]:
    """Sentences (split after ``.!?`` and at blank lines) packed greedily; an over-long sentence is packed
    by words, an over-long word cut by tokens."""
    sentences = [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n\s*\n", text) if p and p.strip()]

    def by_words(sentence: str) -> list[str]:
        return _pack(
            sentence.split(), tokenizer, max_tokens, lambda w: _cut_by_tokens(w, tokenizer, max_tokens)
        )

    return _pack(sentences, tokenizer, max_tokens, by_words)


# ------------------------------------------------------------------------------------------------ model
class StreamAdapterModel(ContextAdaptationModel):
    """StreamAdapter generator: context chunks → fixed-size recurrent state → rank-m :class:`ContextAdapter`.

    Example:
        >>> model = StreamAdapterModel.from_base("HuggingFaceTB/SmolLM2-135M-Instruct", StreamAdapterConfig())
        >>> stream = model.stream()
        >>> for chunk in chunks:
        ...     stream.update(chunk)          # memory stays flat however many chunks arrive
        >>> adapter = stream.adapter()        # ContextAdapter, rank config.rank per module
        >>> same = model.generate_adapter(long_text)  # chunks (config.chunk_tokens) and streams internally
    """

    config_class = StreamAdapterConfig

    def __init__(self, config: StreamAdapterConfig, base_model: nn.Module, tokenizer: Any = None) -> None:
        super().__init__(config, base_model, tokenizer=tokenizer)
        if not config.target_shapes:
            config.target_shapes = {
                n: list(s) for n, s in target_module_shapes(base_model, config.target_modules).items()
            }
        geometry = _attention_geometry(base_model)
        if geometry.max_positions is not None and config.chunk_tokens + 2 > geometry.max_positions:
            raise ValueError(
                f"chunk_tokens={config.chunk_tokens} does not fit the base model's window of "
                f"{geometry.max_positions} positions; choose chunk_tokens <= {geometry.max_positions - 2}."
            )
        self.layout = StreamAdapterLayout.from_shapes(config.target_shapes)
        layers, kinds = list(self.layout.layers), _module_kinds(self.layout)
        bad = [layer for layer in layers if layer >= geometry.num_layers]
        if bad:
            raise ValueError(f"Target layers {bad} do not exist: the base has {geometry.num_layers} layers.")
        self.geometry = geometry
        self.adapted_layers = layers
        self.kinds = kinds
        num_layers, m, d_h = len(layers), config.rank, config.state_dim
        d_attn = geometry.num_heads * geometry.head_dim

        # context mapping: learned queries [L, kv, g·m, hd], per-layer affine layer norm, shared projection
        self.queries = nn.Parameter(
            torch.randn(num_layers, geometry.num_kv_heads, geometry.groups * m, geometry.head_dim)
            * config.query_init_std
        )
        self.summary_norm_weight = nn.Parameter(torch.ones(num_layers, d_attn))
        self.summary_norm_bias = nn.Parameter(torch.zeros(num_layers, d_attn))
        self.summary_proj = nn.Linear(d_attn, d_h)
        # gated recurrence
        self.gate = nn.Linear(2 * d_h, d_h)
        nn.init.normal_(self.gate.weight, std=1.0 / math.sqrt(2 * d_h))
        nn.init.constant_(self.gate.bias, config.gate_bias_init)
        self.initial_state = nn.Parameter(torch.zeros(num_layers, m, d_h))
        # weight absorption
        self.state_norm = nn.LayerNorm(d_h)
        self.layer_embedding = nn.Parameter(torch.zeros(num_layers, d_h))
        heads, factors = {}, {}
        for kind in kinds:
            count = len(kind.names)
            if config.generated_factor == "B":
                # B [d_out, m] from the state (zero at start: the student starts as the base), A learned
                head = nn.Linear(d_h, kind.d_out)
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
                learned = torch.randn(count, m, kind.d_in) / math.sqrt(kind.d_in)
            else:
                # A [m, d_in] from the state, B [d_out, m] learned (zero at start)
                head = nn.Linear(d_h, kind.d_in)
                nn.init.normal_(head.weight, std=1.0 / math.sqrt(d_h * kind.d_in))
                nn.init.zeros_(head.bias)
                learned = torch.zeros(count, kind.d_out, m)
            heads[kind.key] = head
            factors[kind.key] = nn.Parameter(learned)
        self.heads = nn.ModuleDict(heads)
        self.factors = nn.ParameterDict(factors)
        self.post_init()

    # ---------------------------------------------------------------------------------- tokenization
    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError(
                "This StreamAdapterModel has no tokenizer: pass tokenizer=... to from_base/from_pretrained, "
                "or feed token ids with stream.update_ids(...)."
            )
        return self.tokenizer

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for candidate in (
            getattr(tok, "pad_token_id", None),
            getattr(tok, "eos_token_id", None),
            getattr(getattr(self.base_lm, "config", None), "pad_token_id", None),
        ):
            if isinstance(candidate, int):
                return candidate
        return 0

    def chunk(self, text: str) -> list[str]:
        """Split a context into chunks of at most ``config.chunk_tokens`` tokens (sentence boundaries where
        possible), as :meth:`generate_adapter` and :meth:`AdapterStream.extend` do."""
        if not isinstance(text, str) or not text.strip():
            raise ContextError("The context is empty or only whitespace; there is nothing to adapt to.")
        chunks = _split_text(text, self._require_tokenizer(), self.config.chunk_tokens)
        if not chunks:
            raise ContextError(
                "The context produced no chunk with content (only whitespace or special tokens?)."
            )
        return chunks

    def encode_chunks(self, chunks: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize chunks for one forward pass, each checked: not blank, not only special tokens, not longer
        than ``config.chunk_tokens`` tokens (special tokens the tokenizer adds come on top).

        Returns:
            ``input_ids`` and ``attention_mask``, both ``[len(chunks), T]`` (right padded), on the CPU.
        """
        tokenizer = self._require_tokenizer()
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        rows = []
        for i, chunk in enumerate(chunks):
            if not isinstance(chunk, str):
                raise ContextError(f"Chunk {i} is a {type(chunk).__name__}, not a string.")
            if not chunk.strip():
                raise ContextError(f"Chunk {i} is empty or only whitespace; there is nothing to absorb.")
            content = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            if not [t for t in content if t not in special]:
                raise ContextError(
                    f"Chunk {i} ({chunk[:60]!r}) consists only of special tokens; it carries no context to "
                    "absorb."
                )
            if len(content) > self.config.chunk_tokens:
                raise ContextError(
                    f"Chunk {i} has {len(content)} tokens, more than chunk_tokens="
                    f"{self.config.chunk_tokens}. Give long text to stream.extend(text) or "
                    "model.generate_adapter(text), which split it at sentence boundaries, or split it "
                    "yourself with model.chunk(text)."
                )
            rows.append(tokenizer(chunk, add_special_tokens=True)["input_ids"])
        return self._pad(rows)

    def _pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask

    # ------------------------------------------------------------------------------- context mapping
    def context_key_values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the adapted layers from the frozen base's own KV cache (no gradient).

        Args:
            input_ids: ``[n, T]`` token ids of ``n`` chunks (right padded).
            attention_mask: ``[n, T]``, 1 for real tokens.

        Returns:
            ``keys`` and ``values``, each ``[n, L, kv, T, hd]``.
        """
        with torch.no_grad():
            out = self.base_lm.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=_dynamic_cache(),
                use_cache=True,
            )
        cache = out.past_key_values
        keys, values = [], []
        device = self.queries.device  # layers of a base spread over devices (device_map) meet here
        for layer in self.adapted_layers:
            k, v = _cache_layer_kv(cache, layer)
            keys.append(k.to(device))
            values.append(v.to(device))
        keys_t, values_t = torch.stack(keys, 1), torch.stack(values, 1)
        expected = (self.geometry.num_kv_heads, input_ids.shape[1], self.geometry.head_dim)
        if tuple(keys_t.shape[2:]) != expected:
            raise ValueError(
                f"The base's key cache has shape {tuple(keys_t.shape)} per chunk batch; StreamAdapter "
                f"expected [n, L, {expected[0]}, {expected[1]}, {expected[2]}] ([n, layers, kv_heads, "
                "tokens, head_dim])."
            )
        return keys_t, values_t

    def summarize(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Chunk summaries ``S [n, L, m, d_h]`` of ``n`` chunks ``input_ids [n, T]`` (differentiable in the
        method's parameters; the base runs without gradient)."""
        input_ids = input_ids.to(self.base_device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.base_device)
        if bool((attention_mask.sum(-1) == 0).any()):
            raise ContextError("A chunk has no real token (all padding); every chunk needs content.")
        return self._summaries(input_ids, attention_mask)

    def _summaries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """:meth:`summarize` of checked chunks on the base's device (no check, so no host sync)."""
        keys, values = self.context_key_values(input_ids, attention_mask)
        n, num_layers, kv, width, hd = keys.shape
        # attention in the cache's dtype (no float32 copy of a bf16 cache), the rest in the method's dtype
        keys = keys.reshape(n * num_layers, kv, width, hd)
        values = values.reshape(n * num_layers, kv, width, hd)
        queries = self.queries.to(keys.dtype).unsqueeze(0).expand(n, -1, -1, -1, -1)
        queries = queries.reshape(n * num_layers, kv, -1, hd)
        mask = attention_mask.bool()[:, None, None, None, :].expand(n, num_layers, 1, 1, width)
        mask = mask.reshape(n * num_layers, 1, 1, width)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)  # [n·L, kv, g·m, hd]
        m, g = self.config.rank, self.geometry.groups
        out = out.reshape(n, num_layers, kv, g, m, hd).permute(0, 1, 4, 2, 3, 5).reshape(n, num_layers, m, -1)
        out = F.layer_norm(out.to(self.queries.dtype), out.shape[-1:])
        out = out * self.summary_norm_weight[None, :, None, :] + self.summary_norm_bias[None, :, None, :]
        return self.summary_proj(out)

    def fold(self, state: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        """One step of the gated recurrence: ``h' = g ⊙ h + (1 − g) ⊙ S`` with ``g = σ(W_g [h; S] + b_g)``.

        Args:
            state: ``h [N, L, m, d_h]``.
            summary: ``S [N, L, m, d_h]``.
        """
        gate = torch.sigmoid(self.gate(torch.cat([state, summary.to(state.dtype)], -1)))
        return gate * state + (1.0 - gate) * summary

    def initial_states(self, batch_size: int) -> torch.Tensor:
        """The learned ``h_0`` repeated for ``batch_size`` streams: ``[batch_size, L, m, d_h]``."""
        return self.initial_state.unsqueeze(0).expand(batch_size, -1, -1, -1)

    # ------------------------------------------------------------------------------- weight absorption
    def state_to_adapter(self, state: torch.Tensor, metadata: dict[str, Any] | None = None) -> ContextAdapter:
        """The batched rank-m adapter of states ``h [N, L, m, d_h]``: ``A [N, m, d_in]``, ``B [N, d_out, m]``
        per target module (differentiable)."""
        if state.dim() != 4:
            raise ValueError(f"state must be [N, layers, m, state_dim], got shape {tuple(state.shape)}.")
        n = state.shape[0]
        z = self.state_norm(state) + self.layer_embedding[None, :, None, :]
        factors: dict[str, LoraFactors] = {}
        for kind in self.kinds:
            positions = torch.tensor(kind.layer_positions, device=z.device)
            generated = self.heads[kind.key](z.index_select(1, positions))  # [N, Lk, m, d_gen]
            learned = self.factors[kind.key]
            dtype = learned.dtype
            if self.config.generated_factor == "B":
                all_b = generated.transpose(-1, -2).to(dtype)  # [N, Lk, d_out, m]
                all_a = learned.unsqueeze(0).expand(n, -1, -1, -1)  # [N, Lk, m, d_in]
            else:
                all_a = generated.to(dtype)  # [N, Lk, m, d_in]
                all_b = learned.unsqueeze(0).expand(n, -1, -1, -1)  # [N, Lk, d_out, m]
            for j, name in enumerate(kind.names):
                factors[name] = LoraFactors(all_a[:, j], all_b[:, j], self.config.scale)
        ordered = {name: factors[name] for name in self.config.target_shapes}
        return ContextAdapter(
            ordered,
            base_model=self.config.base_model_name_or_path,
            base_revision=self.config.base_model_revision,
            metadata={"method": "stream_adapter", **(metadata or {})},
        )

    def state_to_stacked(self, state: torch.Tensor) -> StackedAdapter:
        """The same update as :meth:`state_to_adapter`, stacked per module kind (the training fast path): for
        each kind of ``self.layout``, ``A [N, L, m, d_in]`` and ``B [N, L, d_out, m]`` over all ``L`` adapted
        layers (a kind that some layer lacks gets zero factors there, marked absent), made with one head
        call per kind and no Python loop over modules.

        Args:
            state: ``h [N, L, m, d_h]`` (differentiable).
        """
        if state.dim() != 4:
            raise ValueError(f"state must be [N, layers, m, state_dim], got shape {tuple(state.shape)}.")
        n, num_layers = state.shape[0], len(self.adapted_layers)
        z = self.state_norm(state) + self.layer_embedding[None, :, None, :]
        factors = []
        for kind in self.kinds:
            everywhere = kind.layer_positions == tuple(range(num_layers))
            index = None if everywhere else self._device_index(kind.layer_positions, z.device)
            generated = self.heads[kind.key](z if index is None else z.index_select(1, index))
            learned = self.factors[kind.key]  # [Lk, m, d_in] (B generated) or [Lk, d_out, m] (A generated)
            if self.config.generated_factor == "B":
                a = learned.unsqueeze(0).expand(n, -1, -1, -1)  # [N, Lk, m, d_in]
                b = generated.transpose(-1, -2).to(learned.dtype)  # [N, Lk, d_out, m]
            else:
                a = generated.to(learned.dtype)  # [N, Lk, m, d_in]
                b = learned.unsqueeze(0).expand(n, -1, -1, -1)  # [N, Lk, d_out, m]
            if index is not None:  # scatter the kind's layers into all adapted layers (zeros elsewhere)
                a = a.new_zeros(n, num_layers, *a.shape[2:]).index_copy(1, index, a)
                b = b.new_zeros(n, num_layers, *b.shape[2:]).index_copy(1, index, b)
            factors.append((a, b))
        presence = None
        if len(self.layout.positions) != len(self.layout.layers) * len(self.layout.kinds):
            presence = self._device_tensor("presence", z.device, self.layout.presence)
        return StackedAdapter(
            self.layout,
            tuple(factors),
            self.config.scale,
            presence,
            self.config.base_model_name_or_path,
            self.config.base_model_revision,
        )

    def _device_tensor(self, key: Any, device: torch.device, make: Any) -> torch.Tensor:
        """A constant tensor made once per device by ``make()`` (no host-to-device copy in later steps)."""
        cache = self.__dict__.setdefault("_constants", {})
        found = cache.get((key, device))
        if found is None:
            found = cache[(key, device)] = make().to(device)
        return found

    def _device_index(self, positions: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return self._device_tensor(positions, device, lambda: torch.tensor(positions, dtype=torch.long))

    # ------------------------------------------------------------------------------------- streaming
    def stream(self, batch_size: int | None = None, grad: bool = False) -> AdapterStream:
        """A new stream that absorbs context chunks one at a time into a fixed-size state.

        Args:
            batch_size: ``None`` for one context; ``N`` for N contexts streamed side by side (then each
                ``update`` takes a list of N chunks, ``None`` where a context has nothing new).
            grad: keep the autograd graph (for training through the stream; memory then grows with the
                number of chunks). Default: no graph, flat memory.
        """
        return AdapterStream(self, batch_size=batch_size, grad=grad)

    def generate_adapter(self, contexts: str | Sequence[str]) -> ContextAdapter | list[ContextAdapter]:
        """Absorb each context (chunked by ``config.chunk_tokens`` at sentence boundaries) into one adapter.

        A string gives one :class:`ContextAdapter`, exactly equal to streaming the same chunks by hand
        (``s = model.stream(); [s.update(c) for c in model.chunk(text)]; s.adapter()``); a list gives a list,
        computed as one batched stream.
        """
        texts = self.validate_contexts(contexts)
        if isinstance(contexts, str):
            return self.stream().extend(texts[0]).adapter()
        stream = self.stream(batch_size=len(texts))
        stream.extend(texts)
        adapters = stream.adapter().unbind()
        for adapter, count in zip(adapters, stream.num_chunks, strict=True):
            adapter.metadata["chunks"] = count  # each adapter's own chunk count (its metadata is a copy)
        return adapters

    def _generate_batched(self, texts: Sequence[str]) -> ContextAdapter:
        stream = self.stream(batch_size=len(texts))
        stream.update(list(texts))
        return stream.adapter()

    # --------------------------------------------------------------------------------------- training
    def _example_fields(self, example: Any, index: int) -> tuple[list[str], str, str]:
        get = example.get if isinstance(example, dict) else (lambda k, d=None: getattr(example, k, d))
        contexts, query, answer = get("contexts"), get("query", ""), get("answer")
        if isinstance(contexts, str):
            contexts = [contexts]
        if not contexts or not isinstance(contexts, (list, tuple)):
            raise ContextError(
                f"Training example {index} has no contexts; StreamAdapter trains on (contexts, query, "
                "answer) examples (ctx2param.training.data.TrainingExample)."
            )
        for j, text in enumerate(contexts):
            if not isinstance(text, str) or not text.strip():
                raise ContextError(f"Training example {index}: context {j} is empty or not a string.")
        if not isinstance(answer, str) or not answer.strip():
            raise ContextError(f"Training example {index} has an empty answer; there is nothing to learn.")
        query = query or ""
        # the answer as it follows the query (TrainingExample.target()); a continuation follows the context
        if not query or not query[-1].isspace():
            answer = answer if answer[:1].isspace() else " " + answer
        return list(contexts), query, answer

    def collate_training_examples(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Examples ``(contexts, query, answer)`` → one training batch.

        The context items are joined by blank lines (by spaces for continuation examples, whose query is
        empty) and split into chunks exactly as :meth:`generate_adapter` splits text. Leading items are
        dropped when the context has more than ``config.max_context_chunks`` chunks or the teacher sequence
        exceeds ``config.max_teacher_tokens``.

        Runs on the CPU (tensors are returned on the CPU; ``training_losses`` moves them), so it can run in
        ``DataLoader`` workers. Rows are ordered by student length (``example_index`` gives each row's
        position in ``examples``) and everything the fast path needs to avoid host syncs is laid out here:
        length buckets, the recurrence's step index, gather indices of the scored positions
        (:func:`~ctx2param.models.stream_adapter.collation_stream_adapter.layout_batch`; buckets follow
        ``config.bucket_max_padding`` and ``config.bucket_min_rows``).

        Returns:
            ``chunk_ids``/``chunk_mask`` ``[C, Tc]`` (all chunks of all examples, longest first),
            ``chunk_owner`` ``[C]`` (example row), ``chunk_step`` ``[C]`` (position in its example's stream);
            ``student_ids``/``student_mask``/``student_targets`` ``[B, Ts]`` (query + answer; targets are
            the next token at positions that predict answer tokens, else -100); ``teacher_ids``/
            ``teacher_mask``/``teacher_targets`` ``[B, Tt]`` (context + query + answer, the same answer
            tokens targeted); and the fast path's ``chunk_buckets``, ``chunk_index``/``chunk_active``
            ``[S, N]``, ``num_steps``, ``student_buckets``, ``student_scored``, ``teacher_order``,
            ``teacher_buckets``, ``teacher_scored``, ``answer_targets`` ``[P]``, ``token_counts`` (plain
            numbers) and ``example_index``.
        """
        if not examples:
            raise ValueError("collate_training_examples got no examples.")
        tokenizer = self._require_tokenizer()
        cfg = self.config
        items: list[ExampleRows] = []
        for index, example in enumerate(examples):
            contexts, query, answer = self._example_fields(example, index)
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: cfg.max_answer_tokens]
            if query:
                # keep the end of a long query (the question), leaving the teacher room for some context
                reserve = min(cfg.chunk_tokens, cfg.max_teacher_tokens // 4) + 2
                limit = min(cfg.max_query_tokens, cfg.max_teacher_tokens - len(answer_ids) - reserve)
                if limit < 1:
                    raise ContextError(
                        f"Training example {index}: the answer ({len(answer_ids)} tokens) leaves no room for "
                        f"query and context within max_teacher_tokens={cfg.max_teacher_tokens}."
                    )
                student_query = tokenizer(query, add_special_tokens=True)["input_ids"][-limit:]
                teacher_query = tokenizer("\n\n" + query, add_special_tokens=False)["input_ids"][-limit:]
            else:  # continuation: the student sees only the answer (and the tokenizer's prefix, if any)
                student_query = tokenizer("", add_special_tokens=True)["input_ids"]
                teacher_query = []
            separator = "\n\n" if query else " "  # continuation contexts are consecutive spans of one text
            while True:
                context_text = separator.join(contexts)
                context_ids = tokenizer(context_text, add_special_tokens=True)["input_ids"]
                chunks = self.chunk(context_text)
                too_long = len(context_ids) + len(teacher_query) + len(answer_ids) > cfg.max_teacher_tokens
                if (len(chunks) <= cfg.max_context_chunks and not too_long) or len(contexts) == 1:
                    break
                contexts = contexts[1:]
            if too_long or len(chunks) > cfg.max_context_chunks:
                budget = min(
                    cfg.max_teacher_tokens - len(teacher_query) - len(answer_ids),
                    cfg.max_context_chunks * cfg.chunk_tokens,
                )
                if budget < 8:
                    raise ContextError(
                        f"Training example {index}: query and answer leave no room for context within "
                        f"max_teacher_tokens={cfg.max_teacher_tokens}."
                    )
                ids = tokenizer(context_text, add_special_tokens=False)["input_ids"]
                context_text = tokenizer.decode(ids[-budget + 2 :])
                context_ids = tokenizer(context_text, add_special_tokens=True)["input_ids"]
                chunks = self.chunk(context_text)[-cfg.max_context_chunks :]
            student = student_query + answer_ids
            teacher = context_ids + teacher_query + answer_ids
            first = max(len(student_query), 1)  # first answer token the student can predict
            predicted = len(student) - first
            if predicted < 1:
                raise ContextError(
                    f"Training example {index}: the answer is too short to predict (one token, no query)."
                )
            s_targets = [IGNORE_INDEX] * len(student)
            for pos in range(first - 1, len(student) - 1):
                s_targets[pos] = student[pos + 1]
            t_targets = [IGNORE_INDEX] * len(teacher)
            for pos in range(len(teacher) - 1 - predicted, len(teacher) - 1):
                t_targets[pos] = teacher[pos + 1]
            items.append(
                ExampleRows(
                    tuple(tuple(row) for row in self.encode_chunk_rows(chunks)),
                    tuple(student),
                    tuple(s_targets),
                    tuple(teacher),
                    tuple(t_targets),
                )
            )
        return layout_batch(items, self.pad_token_id, cfg.bucket_max_padding, cfg.bucket_min_rows)

    def encode_chunk_rows(self, chunks: Sequence[str]) -> list[list[int]]:
        """Token ids (with the tokenizer's special tokens) of checked chunks, unpadded."""
        self.encode_chunks(chunks)  # validates
        tokenizer = self._require_tokenizer()
        return [tokenizer(c, add_special_tokens=True)["input_ids"] for c in chunks]

    def batch_states(self, batch: dict[str, Any], reference: bool = False) -> torch.Tensor:
        """Final stream states ``h [B, L, m, d_h]`` of a training batch (differentiable; rows as the batch's).

        The fast path reads the chunks in their length buckets (``chunk_buckets``) and runs the recurrence
        as ``num_steps`` batched folds over all streams (``chunk_index`` / ``chunk_active``: a stream whose
        chunks are used up keeps its state), with no host sync. ``reference=True`` is the original loop
        (one padded pass, the streams of each step found on the host); both give the same states.
        """
        if reference:
            return self._reference_states(batch)
        ids, mask = batch["chunk_ids"], batch["chunk_mask"]
        buckets = batch.get("chunk_buckets") or [(0, ids.shape[0], ids.shape[1])]
        parts = [self._summaries(ids[s:e, :w], mask[s:e, :w]) for s, e, w in buckets]
        summaries = parts[0] if len(parts) == 1 else torch.cat(parts)  # [C, L, m, d_h]
        index, active = batch["chunk_index"], batch["chunk_active"]  # [S, N]
        steps, num_streams = int(batch["num_steps"]), batch["student_ids"].shape[0]
        if tuple(index.shape) != (steps, num_streams):
            raise ValueError(
                f"chunk_index has shape {tuple(index.shape)}, expected ({steps}, {num_streams}); the batch "
                "was not built by collate_training_examples."
            )
        per_step = summaries.index_select(0, index.reshape(-1)).view(steps, num_streams, *summaries.shape[1:])
        state = self.initial_states(num_streams)
        for step in range(steps):
            new = self.fold(state, per_step[step]).to(state.dtype)
            state = torch.where(active[step][:, None, None, None], new, state)
        return state

    def _reference_states(self, batch: dict[str, Any]) -> torch.Tensor:
        """:meth:`batch_states` module by module, as before the fast path (reads the step count back)."""
        summaries = self.summarize(batch["chunk_ids"], batch["chunk_mask"])
        owners, steps = batch["chunk_owner"], batch["chunk_step"]
        num_examples = batch["student_ids"].shape[0]
        state = self.initial_states(num_examples)
        for step in range(int(steps.max().item()) + 1):
            selected = (steps == step).nonzero(as_tuple=True)[0]
            rows = owners.index_select(0, selected)
            new = self.fold(state.index_select(0, rows), summaries.index_select(0, selected))
            state = state.index_copy(0, rows, new.to(state.dtype))
        return state

    def _lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base's output head on final hidden states ``[..., d_model]`` → logits ``[..., vocab]``."""
        logits = self.base_lm.get_output_embeddings()(hidden)
        text = (
            self.base_lm.config.get_text_config() if hasattr(self.base_lm.config, "get_text_config") else None
        )
        cap = getattr(text, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _answer_logits(self, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Logits ``[P, V]`` at the positions of ``targets`` that are not ``IGNORE_INDEX`` (the reference
        path: a boolean-mask index, which reads the count back from the device)."""
        hidden = self.base_lm.base_model(
            input_ids=ids, attention_mask=mask, use_cache=False
        ).last_hidden_state
        return self._lm_logits(hidden[targets != IGNORE_INDEX]).float()

    def _scored_logits(
        self, batch: dict[str, Any], role: str, stacked: StackedAdapter | None = None
    ) -> torch.Tensor:
        """Logits ``[P, V]`` of the ``role`` (teacher / student) rows at the scored positions only.

        The rows are read in their length buckets (``<role>_buckets`` over ``<role>_order``, the batch's
        row order when absent), each cut to its width; the student's buckets are contiguous and read with
        their slice of ``stacked`` attached. ``<role>_scored`` gathers the scored positions from the
        concatenated bucket outputs, in the order of ``answer_targets``.
        """
        ids, mask = batch[f"{role}_ids"], batch[f"{role}_mask"]
        buckets = batch.get(f"{role}_buckets") or [(0, ids.shape[0], ids.shape[1])]
        order = batch.get(f"{role}_order")
        body = self.base_lm.base_model
        parts = []
        for s, e, w in buckets:
            if order is None:
                rows_ids, rows_mask = ids[s:e, :w], mask[s:e, :w]
            else:
                rows = order[s:e]
                rows_ids, rows_mask = ids.index_select(0, rows)[:, :w], mask.index_select(0, rows)[:, :w]
            if stacked is None:
                hidden = body(input_ids=rows_ids, attention_mask=rows_mask, use_cache=False).last_hidden_state
            else:
                if order is not None:
                    raise ValueError("The student rows are read in contiguous buckets (no student_order).")
                piece = replace(stacked, factors=tuple((A[s:e], B[s:e]) for A, B in stacked.factors))
                with attach_stacked_adapter(self.base_lm, piece):
                    hidden = body(
                        input_ids=rows_ids, attention_mask=rows_mask, use_cache=False
                    ).last_hidden_state
            parts.append(hidden.reshape(-1, hidden.shape[-1]))
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self._lm_logits(flat.index_select(0, batch[f"{role}_scored"])).float()

    def training_flops(self, batch: dict[str, Any]) -> dict[str, float]:
        """Approximate FLOPs of one training step on a collated batch (for MFU), by part.

        Conventions of :mod:`ctx2param.training.flops`: a ``[n, k] x [k, m]`` product costs ``2·n·k·m``, only
        real tokens count, causal attention costs ``2·T²·w`` per layer; the frozen base's backward costs 1×
        its forward (input gradients only), trainable parts cost 3× (forward + both gradients).

        Reads the plain token counts the collator made (``batch["token_counts"]``): nothing here touches a
        device (it runs in the DataLoader workers). A batch without them is counted from its masks.

        Returns:
            ``generator`` (base forward over the chunks without logits, then the learned queries' attention,
            projection, gate and heads, forward and backward), ``teacher`` (forward, logits at the answer
            positions only), ``student`` (forward and backward through the base, plus the rank-m products),
            ``total``; ``context_tokens`` and ``tokens`` (all tokens read by any pass).
        """
        from ...training.flops import base_cost  # lazy: training sits above the models

        counts = batch.get("token_counts")
        if not isinstance(counts, dict):
            counts = {
                "chunks": batch["chunk_mask"].sum(-1).tolist(),
                "teacher": batch["teacher_mask"].sum(-1).tolist(),
                "student": batch["student_mask"].sum(-1).tolist(),
                "answers": int((batch["student_targets"] != IGNORE_INDEX).sum()),
            }
        chunk_lengths = [int(t) for t in counts["chunks"]]
        teacher_lengths = [int(t) for t in counts["teacher"]]
        student_lengths = [int(t) for t in counts["student"]]
        answers = int(counts["answers"])
        cost = base_cost(self.base_lm)
        cfg, geo = self.config, self.geometry
        num_layers, m, d_h = len(self.adapted_layers), cfg.rank, cfg.state_dim
        d_attn = geo.num_heads * geo.head_dim
        chunks = len(chunk_lengths)
        context_tokens = float(sum(chunk_lengths))
        examples = len(student_lengths)
        attention = 4.0 * num_layers * geo.num_heads * m * geo.head_dim * context_tokens
        summary = chunks * num_layers * m * (2.0 * d_attn * d_h + 2.0 * 2 * d_h * d_h)  # projection + gate
        heads = (
            examples
            * m
            * sum(
                2.0 * d_h * (k.d_out if cfg.generated_factor == "B" else k.d_in) * len(k.names)
                for k in self.kinds
            )
        )
        generator = cost.forward(chunk_lengths) + 3.0 * (attention + summary + heads)
        teacher = cost.forward(teacher_lengths, answers)
        low_rank = sum((k.d_in + k.d_out) * len(k.names) for k in self.kinds)
        lora = 2.0 * m * low_rank * float(sum(student_lengths))
        student = 2.0 * cost.forward(student_lengths, answers) + 3.0 * lora
        return {
            "generator": generator,
            "teacher": teacher,
            "student": student,
            "total": generator + teacher + student,
            "context_tokens": context_tokens,
            "tokens": context_tokens + float(sum(teacher_lengths) + sum(student_lengths)),
        }

    def training_losses(self, batch: dict[str, Any], reference: bool = False) -> dict[str, torch.Tensor]:
        """``loss = kl_weight · KL(teacher ‖ student) + ce_weight · CE(student)`` on the answer tokens.

        The fast path (default) keeps the absorbed updates stacked per module kind
        (:meth:`state_to_stacked`, :func:`~ctx2param.injection.attach_stacked_adapter`), reads chunks,
        teacher and student rows in length buckets, computes logits only at the scored positions (gathered
        by indices the collator made) and never waits for the host. ``reference=True`` computes the same
        numbers module by module (``ContextAdapter``, boolean-mask indexing), for tests of the fast path.

        Also returned (for logging, detached): ``kl``, ``ce``, ``teacher_ce`` (the teacher's own CE on the
        same tokens: the level the student aims at), ``delta_norm`` (mean Frobenius norm of the generated
        ΔW).
        """
        cfg = self.config
        device = self.base_device
        batch = {
            k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
        }
        with record_function("ctx2param.generator"):
            state = self.batch_states(batch, reference=reference)
            if reference:
                adapter = self.state_to_adapter(state)
            else:
                stacked = self.state_to_stacked(state)
        if reference:
            with torch.no_grad():
                teacher = self._answer_logits(
                    batch["teacher_ids"], batch["teacher_mask"], batch["teacher_targets"]
                )
            with attach_adapter(self.base_lm, adapter):
                student = self._answer_logits(
                    batch["student_ids"], batch["student_mask"], batch["student_targets"]
                )
            targets = batch["student_targets"][batch["student_targets"] != IGNORE_INDEX]
            teacher_targets = batch["teacher_targets"][batch["teacher_targets"] != IGNORE_INDEX]
        else:
            with torch.no_grad(), record_function("ctx2param.teacher"):
                teacher = self._scored_logits(batch, "teacher")
            with record_function("ctx2param.student"):
                student = self._scored_logits(batch, "student", stacked)
            targets = teacher_targets = batch["answer_targets"]
        if teacher.shape != student.shape:
            raise RuntimeError(
                f"Teacher and student target {teacher.shape[0]} and {student.shape[0]} answer tokens; the "
                "batch was not built by collate_training_examples."
            )
        temp = cfg.temperature
        kl = F.kl_div(
            F.log_softmax(student / temp, -1),
            F.log_softmax(teacher / temp, -1),
            log_target=True,
            reduction="batchmean",
        ) * (temp**2)
        ce = F.cross_entropy(student, targets)
        loss = cfg.kl_weight * kl + cfg.ce_weight * ce
        with torch.no_grad():
            teacher_ce = F.cross_entropy(teacher, teacher_targets)
            if reference:
                delta_norm = adapter.detach().norm().mean()
            else:
                delta_norm = stacked.detach().sq_norm().sqrt().mean()
        return {
            "loss": loss,
            "kl": kl.detach(),
            "ce": ce.detach(),
            "teacher_ce": teacher_ce,
            "delta_norm": delta_norm,
        }


# ------------------------------------------------------------------------------------------------ stream
class AdapterStream:
    """Absorbs context chunks one at a time into a fixed-size state ``h [N, L, m, d_h]``.

    Made by :meth:`StreamAdapterModel.stream`. Nothing that grows with the number of chunks is kept: the
    chunks are tokenized, summarised, folded into the state and dropped.
    """

    def __init__(self, model: StreamAdapterModel, batch_size: int | None = None, grad: bool = False) -> None:
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(
                f"batch_size must be None (one stream) or a positive integer, got {batch_size!r}."
            )
        self.model = model
        self.batch_size = batch_size
        self.grad = grad
        self._state: torch.Tensor | None = None
        self._counts = [0] * (batch_size or 1)

    # ------------------------------------------------------------------------------------- properties
    @property
    def num_chunks(self) -> int | list[int]:
        """Chunks absorbed so far (a list, one per stream, for a batched stream)."""
        return list(self._counts) if self.batch_size is not None else self._counts[0]

    @property
    def state(self) -> torch.Tensor:
        """The recurrent state: ``[L, m, d_h]`` (or ``[N, L, m, d_h]`` batched)."""
        state = self._current_state()
        return state if self.batch_size is not None else state[0]

    @property
    def state_nbytes(self) -> int:
        """Bytes held by the stream's state (the same after 1 or 1000 chunks)."""
        return 0 if self._state is None else self._state.numel() * self._state.element_size()

    def _current_state(self) -> torch.Tensor:
        if self._state is None:
            return self.model.initial_states(self.batch_size or 1).detach().clone()
        return self._state

    def reset(self) -> AdapterStream:
        """Forget everything absorbed so far."""
        self._state = None
        self._counts = [0] * (self.batch_size or 1)
        return self

    # ----------------------------------------------------------------------------------------- input
    def update(self, chunks: str | Sequence[str | None]) -> AdapterStream:
        """Absorb chunk(s) of text (each at most ``config.chunk_tokens`` tokens).

        One stream: a string is one chunk, a list is several chunks absorbed in order. Batched stream: a
        list of ``N`` entries, one chunk (or ``None``: nothing new) per stream.
        """
        if self.batch_size is None:
            items = [chunks] if isinstance(chunks, str) else chunks
            if not isinstance(items, Sequence) or not items:
                raise ContextError("update() needs a chunk of text or a non-empty list of chunks.")
            for chunk in items:
                ids, mask = self.model.encode_chunks([chunk])  # type: ignore[list-item]
                self.update_ids(ids, mask)
            return self
        if isinstance(chunks, str) or not isinstance(chunks, Sequence) or len(chunks) != self.batch_size:
            raise ContextError(
                f"This stream holds {self.batch_size} contexts: update() needs a list of {self.batch_size} "
                "chunks (None where a context has nothing new)."
            )
        active = [i for i, c in enumerate(chunks) if c is not None]
        if not active:
            raise ContextError("update() got only None: no stream has a new chunk.")
        ids, mask = self.model.encode_chunks([chunks[i] for i in active])  # type: ignore[misc]
        return self.update_ids(ids, mask, streams=active)

    def update_ids(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        streams: Sequence[int] | None = None,
    ) -> AdapterStream:
        """Absorb pre-tokenized chunks ``input_ids [k, T]`` (right padded) into streams ``streams`` (default:
        all streams, ``k = N``; a single stream takes ``k = 1``)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [chunks, tokens], got shape {tuple(input_ids.shape)}.")
        count = self.batch_size or 1
        streams = list(range(count)) if streams is None else list(streams)
        if len(streams) != input_ids.shape[0] or len(set(streams)) != len(streams):
            raise ValueError(
                f"Got {input_ids.shape[0]} chunks for streams {streams}; give one chunk per stream."
            )
        if any(not 0 <= s < count for s in streams):
            raise ValueError(f"Stream indices {streams} out of range for {count} stream(s).")
        if input_ids.shape[1] > self.model.config.chunk_tokens + 2:
            raise ContextError(
                f"Chunks of {input_ids.shape[1]} tokens exceed chunk_tokens="
                f"{self.model.config.chunk_tokens}; split them first."
            )
        input_ids = input_ids.to(self.model.base_device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.model.base_device)
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            summaries = self.model.summarize(input_ids, attention_mask)
            state = self._current_state()
            index = torch.tensor(streams, device=state.device)
            new = self.model.fold(state.index_select(0, index), summaries)
            state = state.index_copy(0, index, new.to(state.dtype))
        self._state = state if self.grad else state.detach()
        for s in streams:
            self._counts[s] += 1
        return self

    def extend(self, texts: str | Sequence[str]) -> AdapterStream:
        """Chunk long text(s) with :meth:`StreamAdapterModel.chunk` and absorb the chunks one step at a time.

        One stream: a string. Batched stream: a list of ``N`` strings (shorter ones wait with ``None``).
        """
        if self.batch_size is None:
            if not isinstance(texts, str):
                raise ContextError("extend() on a single stream takes one string of text.")
            for chunk in self.model.chunk(texts):
                self.update(chunk)
            return self
        if isinstance(texts, str) or len(texts) != self.batch_size:
            raise ContextError(
                f"extend() on a stream of {self.batch_size} contexts takes a list of that many texts."
            )
        chunked = [self.model.chunk(t) for t in texts]
        for step in range(max(len(c) for c in chunked)):
            self.update([c[step] if step < len(c) else None for c in chunked])
        return self

    # ---------------------------------------------------------------------------------------- output
    def adapter(self) -> ContextAdapter:
        """The absorbed context as a :class:`ContextAdapter` (batched for a batched stream)."""
        empty = [i for i, c in enumerate(self._counts) if c == 0]
        if empty:
            which = "This stream has" if self.batch_size is None else f"Streams {empty} have"
            raise ContextError(f"{which} absorbed no context yet; call update(chunk) before adapter().")
        metadata = {"chunks": self.num_chunks, "chunk_tokens": self.model.config.chunk_tokens}
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            adapter = self.model.state_to_adapter(self._current_state(), metadata=metadata)
        if not self.grad:
            adapter = ContextAdapter(
                {
                    n: LoraFactors(f.A.detach().clone(), f.B.detach().clone(), f.scale)
                    for n, f in adapter.items()
                },
                adapter.base_model,
                adapter.base_revision,
                adapter.metadata,
            )
        return adapter if self.batch_size is not None else adapter.unbind()[0]

    def __repr__(self) -> str:
        return (
            f"AdapterStream(batch_size={self.batch_size}, chunks={self.num_chunks}, "
            f"state_bytes={self.state_nbytes})"
        )
