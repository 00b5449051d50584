"""Student-teacher alignment training shared by the methods that generate one adapter per context chunk.

The recipe (CompAs's alignment term; DyPRAG's QA training): for an example with chunks c_1..c_n, query q
and answer y, the *teacher* is the frozen base model with all chunks then q in its prompt, the *student* is
the same base with Σ_i ΔW(c_i) attached and only q in its prompt; the loss is KL(teacher ‖ student) on y's
tokens plus the student's cross-entropy on y.

This module holds the method-agnostic parts, so that each method's folder depends on it (the shared base)
and never on another method:

- the loss functions :func:`alignment_kl` and :func:`masked_cross_entropy`;
- batch helpers (:func:`pad_token_lists`, :func:`prompt_answer_batch`) and :func:`sum_chunk_adapters`
  (per-example sums of per-chunk adapters, differentiable);
- :class:`ChunkAlignmentMixin`: prompt and answer tokenization (chat template or plain text), splitting
  contexts into chunks, chunked ``generate_adapter`` (pieces' adapters summed), collation of
  ``TrainingExample`` objects and the alignment/CE losses. A method mixes it into its
  :class:`~ctx2param.modeling_utils.ContextAdaptationModel` subclass and implements
  :meth:`ChunkAlignmentMixin.chunk_adapters`.

CompAs and DyPRAG both mix it in; CompAs adds its additivity and reconstruction batches and losses on top
(:meth:`ChunkAlignmentMixin._collate_chunks`, :meth:`ChunkAlignmentMixin.alignment_losses`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from .adapter import ContextAdapter, LoraFactors
from .adapter import stack as stack_adapters
from .errors import ContextError
from .injection import apply_adapter, attach_stacked_adapter
from .modules import LayerKindLayout, config_int, context_window, target_module_shapes
from .stacked import StackedAdapter

__all__ = [
    "ChunkAlignmentMixin",
    "alignment_kl",
    "MAX_BUCKETS",
    "length_buckets",
    "masked_cross_entropy",
    "pad_token_lists",
    "plain_start_ids",
    "position_ids_from_mask",
    "prompt_answer_batch",
    "shared_suffix_mask",
    "state_alignment",
    "sum_chunk_adapters",
]


# ---------------------------------------------------------------------------------------------- losses
def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def alignment_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher ‖ student) per answer token, averaged over the tokens of ``mask``, times ``temperature²``.

    Args:
        teacher_logits: ``[N, L, V]`` (no gradient needed).
        student_logits: ``[N, L, V]``.
        mask: ``[N, L]``, 1 on answer tokens.

    Returns:
        A 0-d float32 tensor (0 when the distributions agree).
    """
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    s = F.log_softmax(student_logits.float() / temperature, -1)
    kl = (t.exp() * (t - s)).sum(-1)  # [N, L]
    return _masked_mean(kl, mask) * temperature**2


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [N, L, V]`` against ``targets [N, L]`` where ``mask`` is 1."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return _masked_mean(ce.view_as(targets), mask)


# --------------------------------------------------------------------------------------------- batches
def pad_token_lists(
    seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to ``ids [N, T]`` and ``mask [N, T]`` (1 on real tokens)."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(length - len(s), length) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: ``cumsum(mask) - 1`` (clamped at 0)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def plain_start_ids(tokenizer: Any, fallback_id: int) -> list[int]:
    """Tokens that start a plain (non-chat) prompt: the prefix the tokenizer adds of itself (a BOS), else
    its eos token, else ``fallback_id`` (so a prompt is never empty)."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    prefix = with_special[: len(with_special) - len(without)]
    if prefix and with_special[len(prefix) :] == without:
        return prefix
    eos = getattr(tokenizer, "eos_token_id", None)
    return [eos if isinstance(eos, int) else fallback_id]


def prompt_answer_batch(
    prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Rows ``[left pad][prompt][answer][right pad]``: every prompt ends at the same column, so the logits
    that predict the answers are the last ``La + 1`` positions minus the final one."""
    p_len = max(len(p) for p in prompts)
    a_len = max(len(a) for a in answers)
    ids = torch.full((len(prompts), p_len + a_len), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        row = list(p) + list(a)
        ids[i, p_len - len(p) : p_len + len(a)] = torch.tensor(row, dtype=torch.long)
        mask[i, p_len - len(p) : p_len + len(a)] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}


#: Most length buckets a batch's rows of one pass are read in: every bucket is one more pass of the base
#: model (about 1,800 kernel launches for SmolLM2-135M). With 256 examples a step (about 1,000 chunks) six
#: buckets keep the chunks' padding near 12 % (three: 24 %); a step of 64 examples was launch-bound on an
#: H200 (28k kernels, the GPU 30 % busy), so the recipes' batches are large instead.
MAX_BUCKETS = 6


def length_buckets(
    lengths: Sequence[int],
    max_padding: float = 0.05,
    min_rows: int = 16,
    max_buckets: int | None = MAX_BUCKETS,
) -> list[tuple[int, int, int]]:
    """Row ranges ``[(start, end, width)]`` of rows sorted longest first, each read ``width`` wide (its first
    row's length): a new range starts when padding the next row would take the range's padded share of
    token slots above ``max_padding``; ranges have at least ``min_rows`` rows (but the last), and at least
    ``len(lengths) / max_buckets`` so that there are at most about ``max_buckets`` of them (None: no cap)."""
    if any(a < b for a, b in zip(lengths, lengths[1:], strict=False)):
        raise ValueError("length_buckets needs lengths sorted longest first.")
    if max_buckets is not None:
        if max_buckets < 1:
            raise ValueError(f"max_buckets must be >= 1, got {max_buckets}.")
        min_rows = max(min_rows, -(-len(lengths) // max_buckets))
    buckets: list[tuple[int, int, int]] = []
    start = 0
    while start < len(lengths):
        width = max(1, lengths[start])
        end, padding = start + 1, 0
        while end < len(lengths):
            extra = width - lengths[end]
            if end - start >= min_rows and padding + extra > max_padding * width * (end - start + 1):
                break
            padding += extra
            end += 1
        buckets.append((start, end, width))
        start = end
    return buckets


def shared_suffix_mask(
    teacher_prompts: Sequence[Sequence[int]],
    student_prompts: Sequence[Sequence[int]],
    answer_mask: torch.Tensor,
    max_shared: int = 64,
) -> torch.Tensor:
    """``[N, S + La]`` mask of the positions the state alignment compares: the last ``S`` prompt tokens
    (``S`` = the longest, at most ``max_shared``, token suffix a teacher prompt shares with its student
    prompt: the question and the generation prompt), then the answer tokens (``answer_mask [N, La]``).
    Rows that share a shorter suffix are masked on the left."""
    shared = []
    for t, s in zip(teacher_prompts, student_prompts, strict=True):
        k = 0
        while k < min(len(t), len(s), max_shared) and t[len(t) - 1 - k] == s[len(s) - 1 - k]:
            k += 1
        shared.append(k)
    span = max(shared)
    prompt_part = torch.arange(span)[None, :] >= (span - torch.tensor(shared))[:, None]
    return torch.cat([prompt_part.to(answer_mask.dtype), answer_mask], 1)


def state_alignment(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean relative squared distance ‖h_s − h_t‖² / ‖h_t‖² of hidden states ``[N, P, layers, D]`` over the
    positions of ``mask [N, P]`` and the layers (SADA-style state alignment; 0 when they agree)."""
    t, s = teacher.float(), student.float()
    per = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-6)  # [N, P, layers]
    return _masked_mean(per.mean(-1), mask)


def sum_chunk_adapters(
    chunks: ContextAdapter, example: torch.Tensor, slot: torch.Tensor, num_examples: int
) -> ContextAdapter:
    """Per-example sums Σ_i ΔW(c_i) of a batched per-chunk adapter, as one batched adapter ``[N, ...]``.

    Ranks are concatenated (exact); examples with fewer chunks get zero rank blocks. Differentiable.

    Args:
        chunks: batched adapter ``[C, ...]``, one entry per chunk.
        example, slot: ``[C]``, the example each chunk belongs to and its position there.
        num_examples: ``N``.
    """
    n_max = int(slot.max().item()) + 1
    out = {}
    for name, f in chunks.items():
        c, r, d_in = f.A.shape
        d_out = f.B.shape[1]
        a = f.A.new_zeros(num_examples, n_max, r, d_in).index_put((example, slot), f.A)
        b = f.B.new_zeros(num_examples, n_max, d_out, r).index_put((example, slot), f.B)
        out[name] = LoraFactors(
            a.reshape(num_examples, n_max * r, d_in),
            b.permute(0, 2, 1, 3).reshape(num_examples, d_out, n_max * r),
            f.scale,
        )
    return ContextAdapter(out, chunks.base_model, chunks.base_revision)


# ------------------------------------------------------------------------------------------------ mixin
class ChunkAlignmentMixin:
    """Tokenization, chunking, chunked ``generate_adapter``, collation and alignment losses for a method
    that makes one adapter per context chunk and sums the chunks' adapters.

    Mix it in before :class:`~ctx2param.modeling_utils.ContextAdaptationModel`. The method implements
    :meth:`chunk_adapters` (token ids → batched adapter, differentiable in its own parameters). Its config
    needs ``chunk_tokens``, ``context_separator``, ``max_train_chunks``, ``generation_batch_size``,
    ``alignment_weight``, ``ce_weight`` and ``kl_temperature``.
    """

    config: Any
    tokenizer: Any
    base_lm: nn.Module

    # ------------------------------------------------------------------------------ method hook
    def chunk_adapters(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ContextAdapter:
        """A batched adapter ``[C, ...]`` for ``C`` chunks (right padded ``[C, T]``), from the method's
        :meth:`generate_factors`."""
        return self.chunk_factors(input_ids, attention_mask).to_adapter()

    # ------------------------------------------------------------------------------ layout
    def _target_layout(self, layout_class: type[LayerKindLayout], base_model: nn.Module) -> LayerKindLayout:
        """The layout of ``config.target_shapes`` (filled from ``config.target_modules`` when empty)."""
        config = self.config
        if not config.target_shapes:
            config.target_shapes = {
                n: list(s) for n, s in target_module_shapes(base_model, config.target_modules).items()
            }
        return layout_class.from_shapes(config.target_shapes)

    def _check_chunk_window(self) -> None:
        """``config.chunk_tokens`` (plus two special tokens) must fit the base model's window."""
        self._check_chunk_tokens(self.config.chunk_tokens)

    def frozen_hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, all_layers: bool
    ) -> tuple[torch.Tensor, ...]:
        """Hidden states ``[C, T, D]`` of the frozen base (no gradient): every layer's, embeddings first,
        with ``all_layers``, else only the last layer's (a 1-tuple). Runs the base's body without its LM
        head where the model has one."""
        body = getattr(self.base_lm, "base_model", None)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        with torch.no_grad():
            if isinstance(body, nn.Module) and body is not self.base_lm:
                out = body(**kwargs, output_hidden_states=all_layers)
                return tuple(out.hidden_states) if all_layers else (out.last_hidden_state,)
            states = self.base_lm(**kwargs, output_hidden_states=True, logits_to_keep=1).hidden_states
        return tuple(states) if all_layers else (states[-1],)

    def stack_factors(self, factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> StackedAdapter:
        """Per-kind factors ``A [N, L, r, d_in]``, ``B [N, L, d_out, r]`` (kinds and layer positions of
        ``self.layout``, a :class:`~ctx2param.modules.LayerKindLayout`) as a :class:`StackedAdapter`."""
        presence = getattr(self, "_presence", None)
        return StackedAdapter(
            self.layout,  # type: ignore[attr-defined]
            tuple(factors),
            self.config.scale,
            presence if isinstance(presence, torch.Tensor) else None,
            self.config.base_model_name_or_path,
            self.config.base_model_revision,
        )

    def factors_to_adapter(self, factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> ContextAdapter:
        """A batched :class:`ContextAdapter` from per-kind factors (see :meth:`stack_factors`)."""
        return self.stack_factors(factors).to_adapter()

    def generate_factors(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Method-specific: per-kind factors ``A [C, L, r, d_in]``, ``B [C, L, d_out, r]`` for ``C`` chunks
        (right-padded ``[C, T]``), differentiable in the method's parameters."""
        raise NotImplementedError(f"{type(self).__name__} must implement generate_factors(ids, mask).")

    def chunk_factors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> StackedAdapter:
        """The chunks' adapters ``[C, ...]`` as a :class:`StackedAdapter` (the training fast path)."""
        return self.stack_factors(self.generate_factors(input_ids, attention_mask))

    # ------------------------------------------------------------------------------ base facts
    def _num_hidden_layers(self) -> int | None:
        """The base model's number of decoder layers, when its config says."""
        return config_int(self.base_lm, ("num_hidden_layers", "n_layer"))

    @property
    def max_positions(self) -> int | None:
        """The base model's context window in tokens, when its config says."""
        return context_window(self.base_lm)

    # ------------------------------------------------------------------------------ tokenization
    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError(
                f"This {type(self).__name__} has no tokenizer: pass tokenizer=... to from_base / "
                "from_pretrained."
            )
        return self.tokenizer

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for candidate in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
            if isinstance(candidate, int):
                return candidate
        return 0

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a generated text (the tokenizer's eos, and the base config's)."""
        ids = []
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(tok_eos, int):
            ids.append(tok_eos)
        cfg_eos = getattr(getattr(self.base_lm, "generation_config", None), "eos_token_id", None)
        for value in cfg_eos if isinstance(cfg_eos, list) else [cfg_eos]:
            if isinstance(value, int) and value not in ids:
                ids.append(value)
        return ids

    def _content_ids(self, text: str) -> list[int]:
        return list(self._require_tokenizer()(text, add_special_tokens=False)["input_ids"])

    def _encode_chunk(self, text: str) -> list[int]:
        """Token ids the generator reads for one chunk (with the tokenizer's usual special tokens)."""
        return list(self._require_tokenizer()(text, add_special_tokens=True)["input_ids"])

    def _check_content(self, text: str, index: int) -> list[int]:
        ids = self._content_ids(text)
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        if not ids or all(i in special for i in ids):
            raise ContextError(
                f"Context {index} consists only of special tokens ({text[:40]!r}); there is no content to "
                "adapt to. Pass the text itself, without chat-template markers."
            )
        return ids

    def _start_ids(self) -> list[int]:
        """Tokens that start a plain (non-chat) prompt (:func:`plain_start_ids`)."""
        return plain_start_ids(self._require_tokenizer(), self.pad_token_id)

    def _use_chat(self, query: str) -> bool:
        return bool(query) and bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_ids(self, query: str, contexts: Sequence[str] = ()) -> list[int]:
        """Token ids of a prompt with ``contexts`` (the teacher; none for the student) before ``query``.

        With a chat template and a non-empty query: one user turn, ``contexts`` and ``query`` joined by
        ``config.context_separator``, then the generation prompt. Otherwise the plain format: the start
        token(s), then the contexts (joined by a space when the query is empty: continuation) and the query.
        """
        tok = self._require_tokenizer()
        sep = self.config.context_separator
        if self._use_chat(query):
            messages = [{"role": "user", "content": sep.join([*contexts, query])}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        body = " ".join(contexts) if not query else sep.join([*contexts, query])
        return self._start_ids() + (self._content_ids(body) if body else [])

    def answer_ids(self, query: str, answer: str) -> list[int]:
        """Token ids of the answer as scored after :meth:`prompt_ids` (chat: the reply and end of turn)."""
        if self._use_chat(query):
            return self._content_ids(answer.strip()) + self._end_of_turn_ids()
        if not query:  # continuation: the text goes on after the context
            return self._content_ids(" " + answer.strip())
        target = answer if query[-1].isspace() else " " + answer
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return self._content_ids(target) + ([eos] if isinstance(eos, int) else [])

    def _end_of_turn_ids(self) -> list[int]:
        """The token that closes an assistant turn in the chat template (``<|im_end|>``, ...): the first
        special token the template writes after the reply; else the tokenizer's eos."""
        cached = self.__dict__.get("_eot_ids")
        if cached is not None:
            return list(cached)
        tok = self._require_tokenizer()
        eos = getattr(tok, "eos_token_id", None)
        ids = [eos] if isinstance(eos, int) else []
        marker = "ctx2paramreplymarker"
        try:
            text = tok.apply_chat_template(
                [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}], tokenize=False
            )
            suffix = tok(text[text.rindex(marker) + len(marker) :], add_special_tokens=False)["input_ids"]
            special = set(getattr(tok, "all_special_ids", []) or []) | set(self.eos_token_ids)
            added = getattr(tok, "added_tokens_encoder", {})
            first = next((t for t in suffix if t in special or tok.convert_ids_to_tokens(t) in added), None)
            if first is not None:
                ids = [first]
        except (ValueError, TypeError, KeyError, AttributeError):
            pass  # templates that reject this conversation: keep eos
        self.__dict__["_eot_ids"] = tuple(ids)
        return ids

    # ------------------------------------------------------------------------------------ chunking
    def _check_chunk_tokens(self, chunk_tokens: Any) -> int:
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 8:
            raise ValueError(f"chunk_tokens must be an integer >= 8, got {chunk_tokens!r}.")
        window = self.max_positions
        if window is not None and chunk_tokens + 2 > window:
            raise ValueError(
                f"chunk_tokens={chunk_tokens} exceeds the base model's window of {window} tokens; use at "
                f"most {window - 2} (longer contexts are split into chunks and their adapters summed)."
            )
        return chunk_tokens

    def split_context(self, text: str, chunk_tokens: int | None = None) -> list[tuple[str, tuple[int, int]]]:
        """``[(piece, (char start, char end))]``: the whole text if it fits in ``chunk_tokens`` tokens, else
        its pieces from ``ctx2param.training.data.chunk_text`` (sentence boundaries where possible)."""
        limit = self._check_chunk_tokens(self.config.chunk_tokens if chunk_tokens is None else chunk_tokens)
        cache = self.__dict__.setdefault("_split_cache", OrderedDict())
        key = (text, limit, id(self.tokenizer))
        if key in cache:
            cache.move_to_end(key)
            return list(cache[key])
        if len(self._content_ids(text)) <= limit:
            spans = [(text, (0, len(text)))]
        else:
            from .training.data import chunk_text  # the project's one chunking rule

            spans = []
            position = 0
            for piece in chunk_text(text, self._require_tokenizer(), limit):
                start = text.find(piece, position)
                if start < 0:  # cannot happen: chunk_text returns stripped slices of text, in order
                    raise ContextError("chunk_text returned a piece that is not a slice of the text.")
                spans.append((piece, (start, start + len(piece))))
                position = start + len(piece)
        cache[key] = tuple(spans)
        if len(cache) > 4096:
            cache.popitem(last=False)
        return spans

    # ------------------------------------------------------------------------------ adapter generation
    def _generate_batched(self, texts: Sequence[str]) -> ContextAdapter:
        """One batched adapter (batch ``len(texts)``) for texts that each fit in a chunk."""
        ids, mask = pad_token_lists([self._encode_chunk(t) for t in texts], self.pad_token_id)
        return self.chunk_adapters(ids, mask)

    @torch.no_grad()
    def generate_adapter(
        self, contexts: str | Sequence[str], chunk_tokens: int | None = None
    ) -> ContextAdapter | list[ContextAdapter]:
        """Adapters for one context (a string) or several (a list), in batched passes.

        A context longer than ``chunk_tokens`` (default ``config.chunk_tokens``) tokens is split at
        sentence boundaries where possible; each piece becomes an adapter and the pieces' adapters are
        summed. ``metadata["chunking"]`` records ``num_chunks``, ``chunk_tokens``, ``char_spans`` and
        ``token_counts``; ``metadata["method"]`` the method's name.

        Raises:
            ContextError: an empty or whitespace context, an empty list, a non-string, or a context made
                only of special tokens.
            ValueError: ``chunk_tokens`` below 8 or beyond the base model's window.
        """
        texts = self.validate_contexts(contexts)  # type: ignore[attr-defined]
        limit = self._check_chunk_tokens(self.config.chunk_tokens if chunk_tokens is None else chunk_tokens)
        pieces: list[str] = []
        owners: list[int] = []
        infos = []
        for i, text in enumerate(texts):
            self._check_content(text, i)
            usable = [(p, s) for p, s in self.split_context(text, limit) if p.strip()]
            for piece, _ in usable:
                pieces.append(piece)
                owners.append(i)
            infos.append(
                {
                    "num_chunks": len(usable),
                    "chunk_tokens": limit,
                    "char_spans": [list(s) for _, s in usable],
                    "token_counts": [len(self._content_ids(p)) for p, _ in usable],
                }
            )
        step = self.config.generation_batch_size
        singles: list[ContextAdapter] = []
        for start in range(0, len(pieces), step):
            singles.extend(self._generate_batched(pieces[start : start + step]).unbind())
        results = []
        method = getattr(self.config, "method_name", type(self).__name__)
        for i, info in enumerate(infos):
            own = [a for a, owner in zip(singles, owners, strict=True) if owner == i]
            total = own[0] if len(own) == 1 else sum(own[1:], own[0])
            results.append(
                ContextAdapter(
                    dict(total.items()),
                    total.base_model,
                    total.base_revision,
                    metadata={"method": method, "chunking": info},
                )
            )
        return results[0] if isinstance(contexts, str) else results

    # ------------------------------------------------------------------------------------------ training
    def collate_training_examples(self, examples: Sequence[Any]) -> dict[str, Any]:
        """``TrainingExample``s → one batch for :meth:`training_losses`.

        A context longer than ``config.chunk_tokens`` tokens is split as :meth:`generate_adapter` splits it;
        an example keeps at most ``config.max_train_chunks`` chunks, and fewer when the teacher's prompt
        would not fit the base model's window (the teacher reads exactly the kept ones). Examples that keep
        the same chunks (several questions about one context set) share one set of chunk adapters.

        Returns:
            ``chunk_input_ids``/``chunk_attention_mask`` ``[C, Tc]`` (right padded, longest first),
            ``chunk_example``/``chunk_slot`` ``[C]`` (the chunk's context set and its position there),
            ``chunk_buckets`` (``[(start, end, width)]``: row ranges of similar length, each read with its
            own width, so that little padding is computed), ``num_groups`` / ``num_slots`` (ints: context
            sets, most chunks in one), ``example_group`` ``[N]`` (each example's context set); ``teacher_*``
            and ``student_*`` (``input_ids``, ``attention_mask``, ``position_ids``; rows
            ``[left pad][prompt][answer][right pad]``), ``answer_ids``/``answer_mask`` ``[N, La]``, and for
            state alignment ``state_mask`` ``[N, S + La]`` (the last ``S`` prompt tokens both roles share,
            then the answer tokens).
        """
        return self._collate_chunks(examples)[0]

    def _collate_chunks(
        self, examples: Sequence[Any], with_answers: bool = True
    ) -> tuple[dict[str, Any], list[str]]:
        """The batch of :meth:`collate_training_examples` (without ``teacher_*``, ``student_*``, ``answer_*``
        and ``state_mask`` when ``with_answers`` is false) and the chunks' texts in row order, for methods
        that add to it."""
        if not examples:
            raise ValueError("collate_training_examples got an empty list of examples.")
        cfg = self.config
        group_of: dict[tuple[str, ...], int] = {}
        group_pieces: list[list[str]] = []
        example_group: list[int] = []
        teacher_prompts, student_prompts, answers = [], [], []
        window = self.max_positions or 10**9
        for e, ex in enumerate(examples):
            contexts = getattr(ex, "contexts", None)
            if not contexts or not all(isinstance(c, str) and c.strip() for c in contexts):
                raise ValueError(f"Training example {e} has no usable contexts: {contexts!r}.")
            kept: list[list[str]] = []
            room = cfg.max_train_chunks
            for context in contexts:
                pieces = [p for p, _ in self.split_context(context) if p.strip()][:room]
                if not pieces:
                    break
                kept.append(pieces)
                room -= len(pieces)
            answer = self.answer_ids(ex.query, ex.answer) if with_answers else []
            while True:  # the teacher reads exactly the kept pieces; drop trailing ones beyond the window
                seen = [c if [c] == ps else " ".join(ps) for c, ps in zip(contexts, kept, strict=False)]
                teacher = self.prompt_ids(ex.query, seen) if with_answers else []
                if len(teacher) + len(answer) <= window or sum(map(len, kept)) <= 1:
                    break
                kept[-1].pop()
                if not kept[-1]:
                    kept.pop()
            flat = tuple(p for ps in kept for p in ps)
            if flat not in group_of:
                group_of[flat] = len(group_pieces)
                group_pieces.append(list(flat))
            example_group.append(group_of[flat])
            if with_answers:
                teacher_prompts.append(teacher)
                student_prompts.append(self.prompt_ids(ex.query))
                answers.append(answer)
        rows = [
            (g, slot, piece) for g, pieces in enumerate(group_pieces) for slot, piece in enumerate(pieces)
        ]
        encoded = [self._encode_chunk(piece) for _, _, piece in rows]
        order = sorted(range(len(rows)), key=lambda i: -len(encoded[i]))  # longest first (stable)
        rows = [rows[i] for i in order]
        encoded = [encoded[i] for i in order]
        pad = self.pad_token_id
        ids, mask = pad_token_lists(encoded, pad)
        batch: dict[str, Any] = {
            "chunk_input_ids": ids,
            "chunk_attention_mask": mask,
            "chunk_example": torch.tensor([g for g, _, _ in rows]),
            "chunk_slot": torch.tensor([slot for _, slot, _ in rows]),
            "chunk_buckets": length_buckets(
                [len(x) for x in encoded], max_buckets=getattr(cfg, "max_chunk_buckets", MAX_BUCKETS)
            ),
            "num_groups": len(group_pieces),
            "num_slots": max(len(p) for p in group_pieces),
            "example_group": torch.tensor(example_group),
        }
        if with_answers:
            for role, prompts in (("teacher", teacher_prompts), ("student", student_prompts)):
                for key, value in prompt_answer_batch(prompts, answers, pad).items():
                    batch[f"{role}_{key}"] = value
            batch["answer_ids"], batch["answer_mask"] = pad_token_lists(answers, pad)
            batch["state_mask"] = shared_suffix_mask(teacher_prompts, student_prompts, batch["answer_mask"])
        return batch, [piece for _, _, piece in rows]

    def batch_chunk_factors(self, batch: dict[str, Any], reference: bool = False) -> StackedAdapter:
        """The adapters of a batch's chunks ``[C, ...]`` (row order of ``chunk_input_ids``).

        The fast path runs the generator once per length bucket (``chunk_buckets``), each cut to its own
        width; ``reference=True`` reads all chunks in one padded pass. Both give the same factors.
        """
        ids, mask = batch["chunk_input_ids"], batch["chunk_attention_mask"]
        buckets = batch.get("chunk_buckets")
        if reference or not buckets or len(buckets) == 1 and buckets[0][2] == ids.shape[1]:
            return self.chunk_factors(ids, mask)
        parts = [self.generate_factors(ids[s:e, :w], mask[s:e, :w]) for s, e, w in buckets]
        factors = [
            (torch.cat([p[k][0] for p in parts]), torch.cat([p[k][1] for p in parts]))
            for k in range(len(parts[0]))
        ]
        return self.stack_factors(factors)

    def answer_logits(
        self,
        batch: dict[str, Any],
        role: str,
        answer_len: int,
        state_layers: Sequence[int] = (),
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[N, La, V]`` that predict the answer tokens of the ``role`` (teacher/student) rows.

        With ``state_layers`` (indices into ``hidden_states``, 0 = embeddings), also those layers' hidden
        states ``[N, P, len(state_layers), D]`` at the last ``P = state_mask.shape[1]`` columns."""
        out = self.base_lm(
            input_ids=batch[f"{role}_input_ids"],
            attention_mask=batch[f"{role}_attention_mask"],
            position_ids=batch[f"{role}_position_ids"],
            use_cache=False,
            logits_to_keep=answer_len + 1,
            output_hidden_states=bool(state_layers),
        )
        logits = out.logits[:, :-1]
        if not state_layers:
            return logits
        span = batch["state_mask"].shape[1]
        hidden = torch.stack([out.hidden_states[layer][:, -span:] for layer in state_layers], 2)
        return logits, hidden

    def state_layers(self) -> list[int]:
        """Hidden-state indices aligned by the state loss: the deepest ``config.state_layer_fraction`` of the
        base's layers (``hidden_states`` indices, 1 = the first layer's output)."""
        num = self._num_hidden_layers() or 1
        fraction = float(getattr(self.config, "state_layer_fraction", 0.5))
        first = max(1, num + 1 - max(1, round(num * fraction)))
        return list(range(first, num + 1))

    def training_losses(self, batch: dict[str, Any], reference: bool = False) -> dict[str, torch.Tensor]:
        """``loss`` = alignment_weight · KL(teacher ‖ student) + ce_weight · CE(student) [+ state_weight ·
        state alignment] on the answers.

        ``reference=True`` computes the same numbers module by module (``ContextAdapter`` objects and
        :func:`~ctx2param.injection.apply_adapter`), for tests of the fast path.

        Returns ``loss`` and the unweighted terms whose weight is nonzero (``alignment``, ``ce``, ``state``).
        """
        batch = self._batch_to_device(batch)
        with record_function("ctx2param.generator"):
            chunks = self.batch_chunk_factors(batch, reference)
        total, losses = self.alignment_losses(batch, chunks, reference)
        return {"loss": total, **losses}

    def _batch_to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        device = self.base_device  # type: ignore[attr-defined]
        return {
            k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
        }

    def _student_adapter(self, batch: dict[str, Any], chunks: StackedAdapter, reference: bool) -> Any:
        """The per-example sums Σ_i ΔW(c_i), attached to the base (a context manager)."""
        n = batch["answer_ids"].shape[0]
        groups = int(batch.get("num_groups", n))
        if reference:
            per_group = sum_chunk_adapters(
                chunks.to_adapter(), batch["chunk_example"], batch["chunk_slot"], groups
            )
            if groups != n:
                singles = per_group.unbind()
                per_group = stack_adapters([singles[g] for g in batch["example_group"].tolist()])
            return apply_adapter(self.base_lm, per_group)
        slots = int(batch.get("num_slots") or int(batch["chunk_slot"].max().item()) + 1)
        summed = chunks.group_sum(batch["chunk_example"], batch["chunk_slot"], groups, slots)
        if groups != n:
            summed = summed.select(batch["example_group"])
        return attach_stacked_adapter(self.base_lm, summed)

    def alignment_losses(
        self, batch: dict[str, Any], chunks: StackedAdapter | ContextAdapter, reference: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum and the unweighted terms (``alignment``, ``ce``, ``state``; those whose weight is
        nonzero) of a batch already on the base's device, given the chunks' adapters ``[C, ...]``."""
        cfg = self.config
        state_weight = float(getattr(cfg, "state_weight", 0.0))
        if cfg.alignment_weight <= 0 and cfg.ce_weight <= 0 and state_weight <= 0:
            raise ValueError("alignment_weight, ce_weight and state_weight are all zero: nothing to train.")
        if isinstance(chunks, ContextAdapter):
            chunks = StackedAdapter.from_adapter(chunks, self.layout)  # type: ignore[attr-defined]
        n, answer_len = batch["answer_ids"].shape
        layers = self.state_layers() if state_weight > 0 else []
        losses: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=batch["answer_ids"].device)
        teacher = teacher_states = None
        if cfg.alignment_weight > 0 or layers:
            with torch.no_grad(), record_function("ctx2param.teacher"):
                teacher = self.answer_logits(batch, "teacher", answer_len, layers)
            if layers:
                teacher, teacher_states = teacher
        with record_function("ctx2param.student"), self._student_adapter(batch, chunks, reference):
            student = self.answer_logits(batch, "student", answer_len, layers)
        if layers:
            student, student_states = student
            losses["state"] = state_alignment(teacher_states, student_states, batch["state_mask"])
            total = total + state_weight * losses["state"]
        if cfg.alignment_weight > 0:
            losses["alignment"] = alignment_kl(teacher, student, batch["answer_mask"], cfg.kl_temperature)
            total = total + cfg.alignment_weight * losses["alignment"]
        if cfg.ce_weight > 0:
            losses["ce"] = masked_cross_entropy(student, batch["answer_ids"], batch["answer_mask"])
            total = total + cfg.ce_weight * losses["ce"]
        return total, losses
