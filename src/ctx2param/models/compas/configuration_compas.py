"""``CompAsConfig``: the CompAs generator, its decoder, and the weights of its training losses."""

from __future__ import annotations

from typing import Any

from ...configuration_utils import ContextAdaptationConfig

__all__ = ["CompAsConfig"]


class CompAsConfig(ContextAdaptationConfig):
    """Configuration of a CompAs generator (Jukić, Tutek, Šnajder, arXiv 2509.22158; this project's reading).

    The generator runs the frozen base model over a context chunk; for every target layer, ``rank`` learned
    latents (one per rank, started small) plus a layer embedding read that layer's hidden states in
    ``num_blocks`` small Perceiver blocks; each latent becomes a unit-normalised code ``ẑ_i`` of width
    ``head_dim``, and heads (per layer, or per module kind shared by the layers) map it to a rank-1 pair
    ``(a_i, s_i · b_i)`` with an output scale ``s`` that starts at zero: ΔW = scale · Σ_i s_i b_i a_iᵀ is 0
    for every passage at initialisation. The decoder reads ΔW back through learned probes into a soft prompt.

    Args:
        latent_dim: width of the latents and of the Perceiver blocks.
        num_attention_heads: attention heads of the blocks (``latent_dim`` must be divisible by it).
        ff_mult: the blocks' feed-forward width is ``ff_mult * latent_dim``.
        latent_self_attention: whether the latents of a layer also attend to each other after reading
            the hidden states.
        num_blocks: Perceiver blocks (each reads the hidden states again).
        hidden_state_offset: target layer ℓ reads ``hidden_states[ℓ + offset]`` of the base model
            (0: the input of layer ℓ, 1: its output).
        latent_init_std: standard deviation of the initial latents and layer embeddings (small, so that
            what a latent reads, not its initial value, makes its code).
        head_dim: width of the unit-normalised codes the heads read.
        head_sharing: ``"layer"`` (one head per layer and kind: ``L · head_dim · (d_in + d_out)`` weights
            per kind) or ``"kind"`` (one head per kind shared by the layers, told apart by the layer
            embedding).
        output_gain: ``s_i = output_gain · output_scale_i``: with Adam a parameter moves about the learning
            rate per step whatever its gradient's size, so the gain sets how fast ΔW can grow from zero
            (the other weights are unchanged by it).
        decoder_probes: ``p``, right probes per module kind (ΔW · P, P ``[d_in, p]``).
        decoder_probe_outputs: ``q``, left probes per module kind (Qᵀ ΔW P, Q ``[d_out, q]``).
        decoder_tokens_per_layer: soft-prompt tokens made from each layer's features.
        decoder_hidden: width of the decoder's feature-to-prompt MLP.
        decoder_lora_rank: rank of the decoder's own LoRA on the base model (used only while decoding).
        decoder_lora_targets: modules of that LoRA (short names); ``None``: ``target_modules``.
        decoder_max_tokens: longest text (tokens) the decoder is trained to reproduce and the default
            length of :meth:`CompAsModel.decode_context`.
        alignment_weight: weight of KL(teacher ‖ student) on the answer tokens.
        ce_weight: weight of the student's cross-entropy on the answer tokens (off by default: with the
            teacher's own responses as answers the KL already says everything; gold answers the teacher
            would not give make a passage-independent "format" adapter win).
        state_weight: weight of the state alignment (the student's hidden states at the question and answer
            positions pulled toward the teacher's, relative squared distance, in the deepest
            ``state_layer_fraction`` of the layers).
        state_layer_fraction: share of the base's layers (the deepest) the state alignment compares.
        additivity_weight: weight of the additivity term ‖ΔW(c1 ⊕ c2) − ΔW(c1) − ΔW(c2)‖² (relative; it is
            logged, without gradient, also when the weight is 0).
        reconstruction_weight: weight of the decoder's teacher-forced cross-entropy on the chunk's tokens
            (0: the decoder is trained in a second stage, on the frozen generator).
        kl_temperature: temperature of the alignment KL (the KL is multiplied by T² as usual).
        additivity_pairs: most chunk pairs per batch for the additivity term (0: none).
        reconstruction_chunks: most chunks per batch the decoder is trained on.
        max_train_chunks: most chunks per training example (contexts longer than ``chunk_tokens`` are split
            into several; chunks beyond this are dropped, from the teacher's prompt too).
        context_separator: joins contexts in the teacher's prompt and two chunks for ``c1 ⊕ c2``.
        generation_batch_size: most chunks per batched generator pass in ``generate_adapter``.
        **kwargs: :class:`~ctx2param.ContextAdaptationConfig` fields (here ``rank`` defaults to 8,
            ``chunk_tokens`` to 256 and ``target_modules`` to ``["down_proj"]``).
    """

    model_type = "ctx2param_compas"
    method_name = "compas"

    def __init__(
        self,
        latent_dim: int = 256,
        num_attention_heads: int = 8,
        ff_mult: int = 2,
        latent_self_attention: bool = True,
        num_blocks: int = 1,
        hidden_state_offset: int = 1,
        latent_init_std: float = 0.02,
        head_dim: int = 64,
        head_sharing: str = "layer",
        output_gain: float = 1.0,
        decoder_probes: int = 8,
        decoder_probe_outputs: int = 8,
        decoder_tokens_per_layer: int = 2,
        decoder_hidden: int = 1024,
        decoder_lora_rank: int = 8,
        decoder_lora_targets: list[str] | None = None,
        decoder_max_tokens: int = 128,
        alignment_weight: float = 1.0,
        ce_weight: float = 0.0,
        state_weight: float = 0.0,
        state_layer_fraction: float = 0.5,
        additivity_weight: float = 0.1,
        reconstruction_weight: float = 0.0,
        kl_temperature: float = 1.0,
        additivity_pairs: int = 4,
        reconstruction_chunks: int = 8,
        max_train_chunks: int = 8,
        context_separator: str = "\n\n",
        generation_batch_size: int = 16,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("rank", 8)
        kwargs.setdefault("chunk_tokens", 256)
        kwargs.setdefault("target_modules", ["down_proj"])
        kwargs.pop("init_b_std", None)  # configs of the first generator (ΔW started nonzero); ignored now
        positive = {
            "latent_dim": latent_dim,
            "num_attention_heads": num_attention_heads,
            "ff_mult": ff_mult,
            "num_blocks": num_blocks,
            "head_dim": head_dim,
            "decoder_probes": decoder_probes,
            "decoder_probe_outputs": decoder_probe_outputs,
            "decoder_tokens_per_layer": decoder_tokens_per_layer,
            "decoder_hidden": decoder_hidden,
            "decoder_lora_rank": decoder_lora_rank,
            "decoder_max_tokens": decoder_max_tokens,
            "reconstruction_chunks": reconstruction_chunks,
            "max_train_chunks": max_train_chunks,
            "generation_batch_size": generation_batch_size,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CompAsConfig.{name} must be a positive integer, got {value!r}.")
        if (
            isinstance(additivity_pairs, bool)
            or not isinstance(additivity_pairs, int)
            or additivity_pairs < 0
        ):
            raise ValueError(
                f"CompAsConfig.additivity_pairs must be an integer >= 0, got {additivity_pairs!r}."
            )
        if latent_dim % num_attention_heads:
            raise ValueError(
                f"CompAsConfig.latent_dim={latent_dim} must be divisible by num_attention_heads="
                f"{num_attention_heads}."
            )
        if hidden_state_offset not in (0, 1):
            raise ValueError(f"CompAsConfig.hidden_state_offset must be 0 or 1, got {hidden_state_offset!r}.")
        if head_sharing not in ("layer", "kind"):
            raise ValueError(f"CompAsConfig.head_sharing must be 'layer' or 'kind', got {head_sharing!r}.")
        weights = {
            "alignment_weight": alignment_weight,
            "ce_weight": ce_weight,
            "state_weight": state_weight,
            "additivity_weight": additivity_weight,
            "reconstruction_weight": reconstruction_weight,
        }
        for name, value in weights.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"CompAsConfig.{name} must be a number >= 0, got {value!r}.")
        if not (isinstance(output_gain, (int, float)) and output_gain > 0):
            raise ValueError(f"CompAsConfig.output_gain must be > 0, got {output_gain!r}.")
        if not (isinstance(latent_init_std, (int, float)) and latent_init_std > 0):
            raise ValueError(f"CompAsConfig.latent_init_std must be > 0, got {latent_init_std!r}.")
        if not (isinstance(state_layer_fraction, (int, float)) and 0 < state_layer_fraction <= 1):
            raise ValueError(
                f"CompAsConfig.state_layer_fraction must be in (0, 1], got {state_layer_fraction!r}."
            )
        if not (isinstance(kl_temperature, (int, float)) and kl_temperature > 0):
            raise ValueError(f"CompAsConfig.kl_temperature must be > 0, got {kl_temperature!r}.")
        if isinstance(decoder_lora_targets, str):
            decoder_lora_targets = [decoder_lora_targets]
        self.latent_dim = latent_dim
        self.num_attention_heads = num_attention_heads
        self.ff_mult = ff_mult
        self.latent_self_attention = bool(latent_self_attention)
        self.num_blocks = num_blocks
        self.hidden_state_offset = hidden_state_offset
        self.latent_init_std = float(latent_init_std)
        self.head_dim = head_dim
        self.head_sharing = head_sharing
        self.output_gain = float(output_gain)
        self.decoder_probes = decoder_probes
        self.decoder_probe_outputs = decoder_probe_outputs
        self.decoder_tokens_per_layer = decoder_tokens_per_layer
        self.decoder_hidden = decoder_hidden
        self.decoder_lora_rank = decoder_lora_rank
        self.decoder_lora_targets = list(decoder_lora_targets) if decoder_lora_targets else None
        self.decoder_max_tokens = decoder_max_tokens
        self.alignment_weight = float(alignment_weight)
        self.ce_weight = float(ce_weight)
        self.state_weight = float(state_weight)
        self.state_layer_fraction = float(state_layer_fraction)
        self.additivity_weight = float(additivity_weight)
        self.reconstruction_weight = float(reconstruction_weight)
        self.kl_temperature = float(kl_temperature)
        self.additivity_pairs = additivity_pairs
        self.reconstruction_chunks = reconstruction_chunks
        self.max_train_chunks = max_train_chunks
        self.context_separator = context_separator
        self.generation_batch_size = generation_batch_size
        super().__init__(**kwargs)
