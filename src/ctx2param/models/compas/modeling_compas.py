"""CompAs: context → compositional LoRA-style adapters, with a decoder that reads the context back.

Generator (per context chunk, one batched pass): the frozen base model reads the chunk
(``output_hidden_states``); for each target layer ℓ, ``m = config.rank`` learned latents (one per rank,
started small) plus a layer embedding cross-attend to that layer's hidden states (padding masked out) in
Perceiver-style blocks shared by all layers; each latent's output becomes a unit-normalised code ẑ_i, and
heads (per layer by default, see ``CompAsConfig.head_sharing``) map it to a rank-1 pair ``a_i = W_a ẑ_i``,
``b_i = s_i · W_b ẑ_i`` with an output scale s that starts at zero: ΔW = scale · Σ_i b_i a_iᵀ (rank m) is 0
for every passage at initialisation, and what the generator learns first is passage-specific.

Training (:meth:`CompAsModel.training_losses`) on examples with chunks c_1..c_n, query q and answer y (by
default the teacher's own greedy response, precomputed: ``ctx2param data responses``):

- alignment: KL(teacher ‖ student) on y's tokens, teacher = the frozen base with all chunks then q in its
  prompt (no gradient), student = the base with Σ_i ΔW(c_i) and only q; optionally cross-entropy of the
  student on y and state alignment of the deeper layers' hidden states;
- additivity: ‖ΔW(c_i ⊕ c_j) − ΔW(c_i) − ΔW(c_j)‖² / (‖ΔW(c_i)‖² + ‖ΔW(c_j)‖²) from the factors;
- reconstruction: the decoder (:mod:`.decoder_compas`) reproduces each chunk's tokens (teacher forced).

The fast path (the default) keeps the adapters as per-kind stacked factors
(:class:`~ctx2param.stacked.StackedAdapter`): sums, additivity and injection are a few batched ops per module
kind; ``training_losses(batch, reference=True)`` computes the same numbers module by module.

Prompts go through the tokenizer's chat template when it has one and the query is not empty; continuation
examples (empty query) use the plain text format (context, then the continuation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from ...adapter import ContextAdapter
from ...alignment import ChunkAlignmentMixin, pad_token_lists
from ...injection import apply_adapter
from ...modeling_utils import ContextAdaptationModel
from ...modules import LayerKindLayout, target_module_shapes
from ...stacked import StackedAdapter
from .configuration_compas import CompAsConfig
from .decoder_compas import CompAsDecoder
from .losses_compas import additivity_loss, masked_cross_entropy, stacked_additivity_loss

__all__ = ["CompAsGenerator", "CompAsModel", "ModuleLayout", "PerceiverBlock"]


# ------------------------------------------------------------------------------------------------ layout
class ModuleLayout(LayerKindLayout):
    """CompAs's :class:`~ctx2param.modules.LayerKindLayout` (the target modules' layers and kinds)."""

    method = "CompAs"
    sharing = "shares its heads across layers"
    hint = " Choose target_modules inside the decoder layers."
    kind_sharing = "shares one head per kind across layers"


# --------------------------------------------------------------------------------------------- generator
class PerceiverBlock(nn.Module):
    """Latents read tokens (cross-attention, padding masked), optionally attend to each other, then an MLP.

    Pre-norm residual block; shapes: latents ``[B, m, d]``, tokens ``[B, T, d]``, key mask ``[B, T]`` (True =
    a real token) → ``[B, m, d]``.
    """

    def __init__(self, dim: int, num_heads: int, ff_mult: int, self_attention: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_latents = nn.LayerNorm(dim)
        self.norm_tokens = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.o = nn.Linear(dim, dim)
        self.self_attention = self_attention
        if self_attention:
            self.norm_self = nn.LayerNorm(dim)
            self.qkv_self = nn.Linear(dim, 3 * dim, bias=False)
            self.o_self = nn.Linear(dim, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))
        for out in (self.o, self.ff[2], *((self.o_self,) if self_attention else ())):
            nn.init.normal_(out.weight, std=0.02)
            nn.init.zeros_(out.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, n, dh = x.shape
        return x.transpose(1, 2).reshape(b, n, h * dh)

    def forward(self, latents: torch.Tensor, tokens: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.q(self.norm_latents(latents)))
        k, v = self.kv(self.norm_tokens(tokens)).chunk(2, -1)
        attn = F.scaled_dot_product_attention(
            q, self._heads(k), self._heads(v), attn_mask=key_mask[:, None, None, :]
        )
        x = latents + self.o(self._merge(attn))
        if self.self_attention:
            qs, ks, vs = self.qkv_self(self.norm_self(x)).chunk(3, -1)
            x = x + self.o_self(
                self._merge(F.scaled_dot_product_attention(self._heads(qs), self._heads(ks), self._heads(vs)))
            )
        return x + self.ff(self.norm_ff(x))


class CompAsGenerator(nn.Module):
    """Hidden states of the target layers → per-kind rank-``m`` factors for every layer.

    Per target layer ℓ, ``m`` learned latents (one per rank; small initial values) plus a layer embedding read
    that layer's hidden states in ``config.num_blocks`` Perceiver blocks; each latent's output is projected to
    ``head_dim`` and unit-normalised, ``ẑ``. Heads (per layer, or per kind and shared by the layers:
    ``config.head_sharing``) map ``ẑ_i`` to a rank-1 pair: ``a_i = W_a ẑ_i``, ``b_i = s_i · W_b ẑ_i`` with a
    learned output scale ``s`` per (kind, layer, rank) that starts at zero, so ΔW = scale · Σ_i b_i a_iᵀ = 0
    for every passage at initialisation and whatever a passage-independent part the heads hold cannot
    dominate the first steps.

    Args:
        config: the :class:`CompAsConfig`.
        layout: the target modules' layers and kinds.
        hidden_size: the base model's hidden width ``D``.
    """

    def __init__(self, config: CompAsConfig, layout: ModuleLayout, hidden_size: int) -> None:
        super().__init__()
        d, m, h = config.latent_dim, config.rank, config.head_dim
        n_layers = len(layout.layers)
        self.rank = m
        self.head_dim = h
        self.input_norm = nn.LayerNorm(hidden_size)
        self.input_proj = nn.Linear(hidden_size, d)
        self.latents = nn.Parameter(torch.randn(m, d) * config.latent_init_std)
        self.layer_embedding = nn.Parameter(torch.randn(n_layers, d) * config.latent_init_std)
        self.blocks = nn.ModuleList(
            PerceiverBlock(d, config.num_attention_heads, config.ff_mult, config.latent_self_attention)
            for _ in range(config.num_blocks)
        )
        self.output_norm = nn.LayerNorm(d)
        self.head_proj = nn.Linear(d, h)
        copies = n_layers if config.head_sharing == "layer" else 1
        self.heads = nn.ParameterList()
        for d_out, d_in in layout.kind_shapes:
            weight = torch.cat(
                [
                    torch.randn(copies, h, d_in) / math.sqrt(d_in),
                    torch.randn(copies, h, d_out) / math.sqrt(d_out),
                ],
                -1,
            )  # [copies, h, d_in + d_out]: |a_i| ≈ |b_i| / s_i ≈ 1 for a unit ẑ_i
            self.heads.append(nn.Parameter(weight))
        self.output_scale = nn.Parameter(torch.zeros(len(layout.kinds), n_layers, m))
        self.output_gain = float(config.output_gain)  # s_i = gain · output_scale: the scale's own step size
        self.kinds = list(layout.kinds)
        self.kind_shapes = list(layout.kind_shapes)

    def latent_codes(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ẑ [C, L, m, head_dim]``: the unit-normalised latent codes of every chunk and layer.

        Args:
            hidden: ``[C, L, T, D]``, hidden states of the ``L`` adapted layers for ``C`` chunks.
            mask: ``[C, T]`` bool, True on real tokens (padding does not contribute).
        """
        c, n_layers, t, _ = hidden.shape
        if not torch.is_autocast_enabled(hidden.device.type):  # under autocast the norm upcasts by itself
            hidden = hidden.to(self.input_proj.weight.dtype)
        tokens = self.input_proj(self.input_norm(hidden)).reshape(c * n_layers, t, -1)
        latents = (self.latents[None] + self.layer_embedding[:, None]).expand(c, -1, -1, -1)
        x = latents.reshape(c * n_layers, self.rank, -1)
        key_mask = mask.bool().repeat_interleave(n_layers, 0)
        for block in self.blocks:
            x = block(x, tokens, key_mask)
        z = self.head_proj(self.output_norm(x)).view(c, n_layers, self.rank, self.head_dim)
        return F.normalize(z.float(), dim=-1).to(z.dtype)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Factors of every (layer, kind).

        Args:
            hidden: ``[C, L, T, D]``; mask: ``[C, T]`` (see :meth:`latent_codes`).

        Returns:
            Per kind (layout order): ``A [C, L, m, d_in]`` and ``B [C, L, d_out, m]``; ΔW of chunk c at layer
            position j is ``scale · B[c, j] @ A[c, j]``.
        """
        z = self.latent_codes(hidden, mask)
        c, n_layers, m, h = z.shape
        by_layer = z.permute(1, 0, 2, 3).reshape(n_layers, c * m, h)  # [L, C·m, h]
        out = []
        for kind, (_, d_in) in enumerate(self.kind_shapes):
            weight = self.heads[kind]
            rows = by_layer @ weight if weight.shape[0] == n_layers else by_layer @ weight[0]  # [L, C·m, e]
            rows = rows.view(n_layers, c, m, -1).permute(1, 0, 2, 3)  # [C, L, m, d_in + d_out]
            A = rows[..., :d_in]
            scale = (self.output_scale[kind] * self.output_gain)[None, :, :, None].to(rows.dtype)
            B = (rows[..., d_in:] * scale).transpose(-1, -2)
            out.append((A, B))
        return out


# ----------------------------------------------------------------------------------------------- the model
class CompAsModel(ChunkAlignmentMixin, ContextAdaptationModel):
    """CompAs: a frozen base causal LM, a generator of compositional adapters, and a context decoder.

    Build a fresh one with ``CompAsModel.from_base(base, CompAsConfig(...))``; load a trained one with
    ``AutoModelForContextAdaptation.from_pretrained(...)``.

    Example:
        >>> a = model.generate_adapter("The secret password is Marigold.")
        >>> b, c = model.generate_adapter(["Passage two ...", "Passage three ..."])
        >>> with model.adapted(a + b + c):
        ...     out = model.generate(**tok("What is the password?", return_tensors="pt"), max_new_tokens=8)
        >>> model.decode_context(a)    # the context, read back out of ΔW (after training)
    """

    config_class = CompAsConfig

    def __init__(self, config: CompAsConfig, base_model: nn.Module, tokenizer: Any = None) -> None:
        super().__init__(config, base_model, tokenizer=tokenizer)
        self.layout = self._target_layout(ModuleLayout, base_model)
        num_layers = self._num_hidden_layers()
        if num_layers is not None:
            too_deep = [
                layer for layer in self.layout.layers if layer + config.hidden_state_offset > num_layers
            ]
            if too_deep:
                raise ValueError(
                    f"Target layers {too_deep} with hidden_state_offset={config.hidden_state_offset} need "
                    f"hidden states the base (with {num_layers} layers) does not have."
                )
        self._check_chunk_window()
        embeddings = base_model.get_input_embeddings()
        hidden_size = int(embeddings.embedding_dim)
        self.generator = CompAsGenerator(config, self.layout, hidden_size)
        decoder_targets = config.decoder_lora_targets or config.target_modules
        lora_shapes = target_module_shapes(base_model, decoder_targets)
        self.decoder = CompAsDecoder(
            kinds=self.layout.kind_shapes,
            positions=self.layout.positions,
            num_layers=len(self.layout.layers),
            hidden_size=hidden_size,
            embed_rms=self._embedding_rms(embeddings),
            lora_shapes=lora_shapes,
            probes=config.decoder_probes,
            probe_outputs=config.decoder_probe_outputs,
            tokens_per_layer=config.decoder_tokens_per_layer,
            mlp_hidden=config.decoder_hidden,
            lora_rank=config.decoder_lora_rank,
        )
        self.register_buffer("_presence", self.layout.presence(), persistent=False)
        self.post_init()

    # ------------------------------------------------------------------------------------- base facts
    @staticmethod
    def _embedding_rms(embeddings: nn.Module) -> float:
        weight = getattr(embeddings, "weight", None)
        if weight is None or not weight.is_floating_point():
            return 1.0
        with torch.no_grad():
            ids = torch.arange(min(int(weight.shape[0]), 4096), device=weight.device)
            vectors = embeddings(ids).float()  # through the module: Gemma scales its embeddings
            rms = vectors.pow(2).mean(-1).sqrt().median().item()
        return rms if math.isfinite(rms) and rms > 0 else 1.0

    def parameter_breakdown(self) -> dict[str, int]:
        """Trainable parameters of the generator and of the decoder (probes, prompt MLP, LoRA)."""
        decoder_lora = sum(p.numel() for p in [*self.decoder.lora_A, *self.decoder.lora_B])
        decoder = sum(p.numel() for p in self.decoder.parameters())
        return {
            "generator": sum(p.numel() for p in self.generator.parameters()),
            "decoder": decoder,
            "decoder_lora": decoder_lora,
            "total": self.num_method_parameters(),
        }

    # ------------------------------------------------------------------------------ adapter generation
    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[C, L, T, D]`` hidden states of the adapted layers (frozen base, no gradient)."""
        states = self.frozen_hidden_states(input_ids, attention_mask, all_layers=True)
        offset = self.config.hidden_state_offset
        return torch.stack([states[layer + offset] for layer in self.layout.layers], 1)

    def generate_factors(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-kind factors for a batch of chunks (differentiable in the generator's parameters).

        Args:
            input_ids, attention_mask: ``[C, T]``, right or left padded.

        Returns:
            Per kind: ``A [C, L, m, d_in]``, ``B [C, L, d_out, m]`` (see :class:`CompAsGenerator`).
        """
        device = self.base_device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        hidden = self._hidden_states(input_ids, attention_mask)
        return self.generator(hidden, attention_mask.bool())

    # ------------------------------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode_context(self, adapter: ContextAdapter, max_new_tokens: int | None = None) -> str | list[str]:
        """Read the context back out of an adapter: soft prompt from ΔW's probe features, greedy decoding.

        ``adapter`` is one adapter (→ a string) or a batched one (→ a list). A *sum* of adapters is decoded
        too: the features are linear in ΔW, so the decoder sees the sum of the pieces' features. The decoder
        is trained on single chunks, so for a sum it returns what its prompt map makes of superposed
        features: typically text mixing the pieces' content (dominated by the one with the largest ΔW), not
        a faithful concatenation; an untrained decoder returns noise.

        Args:
            adapter: made by this generator (same target modules), or a sum / scaling of such adapters.
            max_new_tokens: most tokens to write; default ``config.decoder_max_tokens``.
        """
        if max_new_tokens is None:
            max_new_tokens = self.config.decoder_max_tokens
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        self.decoder.check_adapter(adapter)
        window = self.max_positions
        if window is not None and self.decoder.prompt_length + max_new_tokens > window:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} plus the decoder's {self.decoder.prompt_length}-vector "
                f"prompt exceeds the base model's window of {window} tokens."
            )
        tok = self._require_tokenizer()
        device = self.base_device
        embed = self.base_lm.get_input_embeddings()
        soft = self.decoder.soft_prompt(adapter.to(device=device))
        soft = soft.to(embed.weight.dtype if embed.weight.is_floating_point() else soft.dtype)
        n = soft.shape[0]
        eos = torch.tensor(self.eos_token_ids or [-1], device=device)
        mask = torch.ones(n, soft.shape[1], dtype=torch.long, device=device)
        tokens = []
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        with apply_adapter(self.base_lm, self.decoder.lora_adapter()):
            out = self.base_lm(inputs_embeds=soft, attention_mask=mask, use_cache=True)
            for _ in range(max_new_tokens):
                nxt = out.logits[:, -1].argmax(-1)
                nxt = torch.where(finished, torch.full_like(nxt, self.pad_token_id), nxt)
                tokens.append(nxt)
                finished |= torch.isin(nxt, eos)
                if bool(finished.all()):
                    break
                mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=device)], 1)
                out = self.base_lm(
                    input_ids=nxt[:, None],
                    attention_mask=mask,
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
        generated = torch.stack(tokens, 1).tolist()
        texts = []
        stop = set(eos.tolist())
        for row in generated:
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            texts.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
        return texts[0] if adapter.batch_size is None else texts

    # ------------------------------------------------------------------------------------------ training
    def collate_training_examples(self, examples: Sequence[Any]) -> dict[str, Any]:
        """``TrainingExample``s → one batch for :meth:`training_losses`.

        The chunks, teacher and student rows of
        :meth:`~ctx2param.alignment.ChunkAlignmentMixin.collate_training_examples` (only when the alignment,
        CE or state weights are nonzero), plus: for the additivity term ``pair_input_ids``/
        ``pair_attention_mask`` ``[P, Tp]`` (chunk i ⊕ chunk j) and ``pair_left``/``pair_right`` ``[P]`` (rows
        of the chunks; computed without gradient, for the log, when its weight is zero); for reconstruction
        ``recon_ids``/``recon_mask`` ``[R, Lr]`` and ``recon_chunks`` ``[R]``; ``specificity_rows`` (up to 16
        rows of distinct chunk texts, for the passage-specificity diagnostic).
        """
        cfg = self.config
        batch, chunk_texts = self._collate_chunks(
            examples,
            with_answers=cfg.alignment_weight > 0 or cfg.ce_weight > 0 or cfg.state_weight > 0,
        )
        pad = self.pad_token_id
        if len(chunk_texts) >= 2 and cfg.additivity_pairs > 0:
            pairs = self._additivity_pairs(batch["chunk_example"].tolist(), batch["chunk_slot"].tolist())
            sep = cfg.context_separator
            window = self.max_positions or 10**9
            joint = [self._encode_chunk(chunk_texts[i] + sep + chunk_texts[j])[:window] for i, j in pairs]
            batch["pair_input_ids"], batch["pair_attention_mask"] = pad_token_lists(joint, pad)
            batch["pair_left"] = torch.tensor([i for i, _ in pairs])
            batch["pair_right"] = torch.tensor([j for _, j in pairs])
        if cfg.reconstruction_weight > 0:
            chosen = list(range(min(len(chunk_texts), cfg.reconstruction_chunks)))
            eos = getattr(self.tokenizer, "eos_token_id", None)
            targets = []
            for i in chosen:
                content = self._content_ids(chunk_texts[i])
                if len(content) >= cfg.decoder_max_tokens or not isinstance(eos, int):
                    targets.append(content[: cfg.decoder_max_tokens])
                else:
                    targets.append([*content, eos])
            batch["recon_ids"], batch["recon_mask"] = pad_token_lists(targets, pad)
            batch["recon_chunks"] = torch.tensor(chosen)
        distinct = list({text: i for i, text in reversed(list(enumerate(chunk_texts)))}.values())
        batch["specificity_rows"] = torch.tensor(sorted(distinct)[:16])
        return batch

    def _additivity_pairs(
        self, chunk_group: Sequence[int], chunk_slot: Sequence[int]
    ) -> list[tuple[int, int]]:
        """Row pairs for the additivity term: two chunks of one context set first (slots 0 and 1, in group
        order), then chunks of different sets; at most ``config.additivity_pairs``."""
        limit = self.config.additivity_pairs
        rows = {(g, s): i for i, (g, s) in enumerate(zip(chunk_group, chunk_slot, strict=True))}
        within = [(rows[(g, 0)], rows[(g, 1)]) for g in sorted(set(chunk_group)) if (g, 1) in rows]
        firsts = [rows[(g, 0)] for g in sorted(set(chunk_group))]
        across = list(zip(firsts[0::2], firsts[1::2], strict=False))
        return (within + across)[:limit]

    _answer_logits = ChunkAlignmentMixin.answer_logits  # the name the tests and older callers use

    def reconstruction_logits(
        self,
        factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
        target_ids: torch.Tensor,
        target_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Decoder logits ``[R, Lr, V]`` predicting ``target_ids [R, Lr]`` from per-kind factors (teacher
        forced)."""
        features = self.features_from_factors(factors)
        soft = self.decoder.prompt_from_features(features)
        embed = self.base_lm.get_input_embeddings()
        targets = embed(target_ids)
        inputs = torch.cat([soft.to(targets.dtype), targets], 1)
        mask = torch.cat(
            [torch.ones(soft.shape[:2], dtype=target_mask.dtype, device=target_mask.device), target_mask], 1
        )
        with apply_adapter(self.base_lm, self.decoder.lora_adapter()):
            out = self.base_lm(
                inputs_embeds=inputs,
                attention_mask=mask,
                use_cache=False,
                logits_to_keep=target_ids.shape[1] + 1,
            )
        return out.logits[:, :-1]

    def features_from_factors(self, factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Decoder features ``[N, L, K·q·p]`` straight from per-kind factors (same as ``decoder.features`` of
        :meth:`factors_to_adapter`; modules that are not targets contribute zeros)."""
        per_kind = []
        for kind, (A, B) in enumerate(factors):
            phi = self.decoder.kind_features(kind, A, B, self.config.scale)  # [N, L, q, p]
            present = self._presence[:, kind].to(phi.dtype)[None, :, None, None]
            per_kind.append((phi * present).flatten(-2))
        return torch.cat(per_kind, -1)

    @torch.no_grad()
    def passage_specificity(self, chunks: StackedAdapter) -> torch.Tensor:
        """Mean pairwise cosine of ΔW over the (distinct) adapters of ``chunks`` (0-d float32; 1 = the same
        update for every passage, ~0 = unrelated updates; a pair with a zero ΔW counts 0, so an untrained
        generator, whose every ΔW is zero, gives 0; NaN for fewer than two adapters)."""
        n = chunks.batch_size
        if n < 2:
            return torch.tensor(float("nan"), device=chunks.device)
        i, j = torch.triu_indices(n, n, 1, device=chunks.device)
        norms = chunks.sq_norm().sqrt()
        cos = chunks.select(i).dot(chunks.select(j)) / (norms[i] * norms[j]).clamp_min(1e-30)
        return cos.mean()

    def training_losses(self, batch: dict[str, Any], reference: bool = False) -> dict[str, torch.Tensor]:
        """The CompAs losses of a batch from :meth:`collate_training_examples`.

        ``reference=True`` computes the same numbers module by module (``ContextAdapter`` objects,
        :func:`~ctx2param.injection.apply_adapter` and the adapter algebra), for tests of the fast path.

        Returns:
            ``loss`` (the weighted total) and the unweighted terms whose weight is nonzero: ``alignment``
            (KL teacher ‖ student on the answer tokens), ``ce`` (student cross-entropy on the answer),
            ``state`` (state alignment), ``additivity`` (relative, see
            :func:`~.losses_compas.additivity_loss`; also logged, without gradient, when its weight is
            zero), ``reconstruction`` (decoder cross-entropy on chunk tokens); and the diagnostic
            ``specificity`` (mean pairwise cosine of ΔW over the batch's distinct passages, no gradient).
        """
        cfg = self.config
        batch = self._batch_to_device(batch)
        with record_function("ctx2param.generator"):
            chunks = self.batch_chunk_factors(batch, reference)
        losses: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.base_device)
        if "answer_ids" in batch:
            total, losses = self.alignment_losses(batch, chunks, reference)
        if "pair_input_ids" in batch:
            with (
                torch.set_grad_enabled(torch.is_grad_enabled() and cfg.additivity_weight > 0),
                record_function("ctx2param.additivity"),
            ):
                joint = self.chunk_factors(batch["pair_input_ids"], batch["pair_attention_mask"])
                first, second = chunks.select(batch["pair_left"]), chunks.select(batch["pair_right"])
                if reference:
                    value = additivity_loss(joint.to_adapter(), first.to_adapter(), second.to_adapter())
                else:
                    value = stacked_additivity_loss(joint, first, second)
            losses["additivity"] = value
            if cfg.additivity_weight > 0:
                total = total + cfg.additivity_weight * value
        if "recon_ids" in batch:
            chosen = chunks.select(batch["recon_chunks"]).factors
            with record_function("ctx2param.decoder"):
                logits = self.reconstruction_logits(chosen, batch["recon_ids"], batch["recon_mask"])
            losses["reconstruction"] = masked_cross_entropy(logits, batch["recon_ids"], batch["recon_mask"])
            total = total + cfg.reconstruction_weight * losses["reconstruction"]
        if not any(k in losses for k in ("alignment", "ce", "state", "reconstruction")) and not (
            cfg.additivity_weight > 0 and "additivity" in losses
        ):
            raise ValueError(
                "Every CompAs loss weight is zero (or the batch has nothing to compute them on): nothing "
                "to train."
            )
        if "specificity_rows" in batch:
            losses["specificity"] = self.passage_specificity(
                chunks.select(batch["specificity_rows"]).detach()
            )
        return {"loss": total, **losses}
