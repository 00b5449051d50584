"""CompAs: context → compositional LoRA-style adapters, with a decoder that reads the context back.

Generator (per context chunk, one batched pass): the frozen base model reads the chunk
(``output_hidden_states``); for each target layer ℓ, ``m = config.rank`` learned latent queries plus a layer
embedding cross-attend to that layer's hidden states (padding masked out) in one Perceiver-style block
shared by all layers; heads shared across layers, one per module kind (``self_attn.q_proj``, ``mlp.up_proj``,
...), map latent i to a rank-1 pair: ``a_i = H_a(z_i[:d/2]) / √d_in``, ``b_i = H_b(z_i[d/2:]) / √m``, and
ΔW = scale · Σ_i b_i a_iᵀ (rank m). Reading a and b from different halves of the latent keeps ΔW from being
a (PSD) quadratic form of the latents.

Training (:meth:`CompAsModel.training_losses`) on examples with chunks c_1..c_n, query q and answer y:

- alignment: KL(teacher ‖ student) on y's tokens, teacher = the frozen base with all chunks then q in its
  prompt (no gradient), student = the base with Σ_i ΔW(c_i) and only q; plus cross-entropy of the student
  on y;
- additivity: ‖ΔW(c_i ⊕ c_j) − ΔW(c_i) − ΔW(c_j)‖² / (‖ΔW(c_i)‖² + ‖ΔW(c_j)‖²) from the factors;
- reconstruction: the decoder (:mod:`.decoder_compas`) reproduces each chunk's tokens (teacher forced).

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

from ...adapter import ContextAdapter
from ...alignment import ChunkAlignmentMixin, pad_token_lists
from ...injection import apply_adapter
from ...modeling_utils import ContextAdaptationModel
from ...modules import LayerKindLayout, target_module_shapes
from .configuration_compas import CompAsConfig
from .decoder_compas import CompAsDecoder
from .losses_compas import additivity_loss, masked_cross_entropy

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
    """Hidden states of the target layers → per-kind rank-1 pairs for every layer.

    Args:
        config: the :class:`CompAsConfig`.
        layout: the target modules' layers and kinds.
        hidden_size: the base model's hidden width ``D``.
    """

    def __init__(self, config: CompAsConfig, layout: ModuleLayout, hidden_size: int) -> None:
        super().__init__()
        d, m = config.latent_dim, config.rank
        self.rank = m
        self.input_norm = nn.LayerNorm(hidden_size)
        self.input_proj = nn.Linear(hidden_size, d)
        self.latents = nn.Parameter(torch.randn(m, d) * 0.5)
        self.layer_embedding = nn.Parameter(torch.randn(len(layout.layers), d) * 0.5)
        self.block = PerceiverBlock(
            d, config.num_attention_heads, config.ff_mult, config.latent_self_attention
        )
        self.output_norm = nn.LayerNorm(d)
        half = d // 2
        self.a_heads = nn.ModuleDict()
        self.b_heads = nn.ModuleDict()
        for kind, (d_out, d_in) in zip(layout.kinds, layout.kind_shapes, strict=True):
            a_head, b_head = nn.Linear(half, d_in), nn.Linear(half, d_out)
            nn.init.normal_(a_head.weight, std=1.0 / math.sqrt(half))
            nn.init.normal_(b_head.weight, std=config.init_b_std / math.sqrt(half))
            nn.init.zeros_(a_head.bias)
            nn.init.zeros_(b_head.bias)
            self.a_heads[ModuleLayout.key(kind)] = a_head
            self.b_heads[ModuleLayout.key(kind)] = b_head
        self.kinds = list(layout.kinds)
        self.kind_shapes = list(layout.kind_shapes)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Factors of every (layer, kind).

        Args:
            hidden: ``[C, L, T, D]``, hidden states of the ``L`` adapted layers for ``C`` chunks.
            mask: ``[C, T]`` bool, True on real tokens (padding does not contribute).

        Returns:
            Per kind (layout order): ``A [C, L, m, d_in]`` and ``B [C, L, d_out, m]``; ΔW of chunk c at layer
            position j is ``scale · B[c, j] @ A[c, j]``.
        """
        c, n_layers, t, _ = hidden.shape
        dtype = self.input_proj.weight.dtype
        tokens = self.input_proj(self.input_norm(hidden.to(dtype))).reshape(c * n_layers, t, -1)
        latents = (self.latents[None] + self.layer_embedding[:, None]).expand(c, -1, -1, -1)
        latents = latents.reshape(c * n_layers, self.rank, -1)
        key_mask = mask.bool().repeat_interleave(n_layers, 0)
        z = self.output_norm(self.block(latents, tokens, key_mask)).view(c, n_layers, self.rank, -1)
        z_a, z_b = z.chunk(2, -1)
        out = []
        for kind, (_, d_in) in zip(self.kinds, self.kind_shapes, strict=True):
            key = ModuleLayout.key(kind)
            A = self.a_heads[key](z_a) / math.sqrt(d_in)  # [C, L, m, d_in]
            B = (self.b_heads[key](z_b) / math.sqrt(self.rank)).transpose(-1, -2)  # [C, L, d_out, m]
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

    def chunk_adapters(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ContextAdapter:
        """A batched adapter ``[C, ...]``, one per chunk (right-padded ids ``[C, T]``); ``generate_adapter``
        (from :class:`~ctx2param.alignment.ChunkAlignmentMixin`) sums the pieces' adapters of a long context
        (rank = pieces × m)."""
        return self.factors_to_adapter(self.generate_factors(input_ids, attention_mask))

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
    def collate_training_examples(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """``TrainingExample``s → one batch of tensors for :meth:`training_losses`.

        A context longer than ``config.chunk_tokens`` tokens is split as :meth:`generate_adapter` splits it
        (each piece one chunk, whose adapters the student sums); an example keeps at most
        ``config.max_train_chunks`` chunks, and fewer when the teacher's prompt would not fit the base
        model's window (the teacher reads exactly the kept ones). Only the parts the nonzero loss weights need
        are built.

        Returns:
            ``chunk_input_ids``/``chunk_attention_mask`` ``[C, Tc]`` (generator input, right padded),
            ``chunk_example``/``chunk_slot`` ``[C]`` (owning example, position in it); for alignment/CE
            ``teacher_*`` and ``student_*`` (``input_ids``, ``attention_mask``, ``position_ids``; rows laid
            out ``[left pad][prompt][answer][right pad]``) and ``answer_ids``/``answer_mask`` ``[N, La]``;
            for additivity ``pair_input_ids``/``pair_attention_mask`` ``[P, Tp]`` (chunk i ⊕ chunk j) and
            ``pair_left``/``pair_right`` ``[P]``; for reconstruction ``recon_ids``/``recon_mask`` ``[R, Lr]``
            and ``recon_chunks`` ``[R]``.
        """
        cfg = self.config
        batch, chunk_texts = self._collate_chunks(
            examples, with_answers=cfg.alignment_weight > 0 or cfg.ce_weight > 0
        )
        pad = self.pad_token_id
        chunk_example = batch["chunk_example"].tolist()
        if cfg.additivity_weight > 0 and len(chunk_texts) >= 2:
            pairs = self._additivity_pairs(chunk_example)
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
        return batch

    def _additivity_pairs(self, chunk_example: Sequence[int]) -> list[tuple[int, int]]:
        """Chunk pairs for the additivity term: neighbours within an example first, then across examples."""
        limit = self.config.additivity_pairs
        pairs = [
            (i, i + 1) for i in range(len(chunk_example) - 1) if chunk_example[i] == chunk_example[i + 1]
        ]
        pairs += [
            (i, i + 1) for i in range(len(chunk_example) - 1) if chunk_example[i] != chunk_example[i + 1]
        ]
        return pairs[:limit]

    _answer_logits = ChunkAlignmentMixin.answer_logits  # the name the tests and older callers use

    def _select(
        self, factors: list[tuple[torch.Tensor, torch.Tensor]], index: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(A[index], B[index]) for A, B in factors]

    def reconstruction_logits(
        self,
        factors: list[tuple[torch.Tensor, torch.Tensor]],
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

    def features_from_factors(self, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Decoder features ``[N, L, K·q·p]`` straight from per-kind factors (same as ``decoder.features`` of
        :meth:`factors_to_adapter`; modules that are not targets contribute zeros)."""
        per_kind = []
        for kind, (A, B) in enumerate(factors):
            phi = self.decoder.kind_features(kind, A, B, self.config.scale)  # [N, L, q, p]
            present = self._presence[:, kind].to(phi.dtype)[None, :, None, None]
            per_kind.append((phi * present).flatten(-2))
        return torch.cat(per_kind, -1)

    def training_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The CompAs losses of a batch from :meth:`collate_training_examples`.

        Returns:
            ``loss`` (the weighted total) and the unweighted terms whose weight is nonzero: ``alignment``
            (KL teacher ‖ student on answer tokens), ``ce`` (student cross-entropy on the answer),
            ``additivity`` (relative, see :func:`~.losses_compas.additivity_loss`), ``reconstruction``
            (decoder cross-entropy on chunk tokens).
        """
        cfg = self.config
        device = self.base_device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        factors = self.generate_factors(batch["chunk_input_ids"], batch["chunk_attention_mask"])
        losses: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=device)
        if "answer_ids" in batch:
            total, losses = self.alignment_losses(batch, self.factors_to_adapter(factors))
        if "pair_input_ids" in batch:
            joint = self.factors_to_adapter(
                self.generate_factors(batch["pair_input_ids"], batch["pair_attention_mask"])
            )
            first = self.factors_to_adapter(self._select(factors, batch["pair_left"]))
            second = self.factors_to_adapter(self._select(factors, batch["pair_right"]))
            losses["additivity"] = additivity_loss(joint, first, second)
            total = total + cfg.additivity_weight * losses["additivity"]
        if "recon_ids" in batch:
            chosen = self._select(factors, batch["recon_chunks"])
            logits = self.reconstruction_logits(chosen, batch["recon_ids"], batch["recon_mask"])
            losses["reconstruction"] = masked_cross_entropy(logits, batch["recon_ids"], batch["recon_mask"])
            total = total + cfg.reconstruction_weight * losses["reconstruction"]
        if not losses:
            raise ValueError(
                "Every CompAs loss weight is zero (or the batch has nothing to compute them on): nothing "
                "to train."
            )
        return {"loss": total, **losses}
