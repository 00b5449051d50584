"""``StreamAdapterConfig``: the sizes of StreamAdapter's context mapping and weight absorption."""

from __future__ import annotations

from typing import Any

from ...configuration_utils import ContextAdaptationConfig

__all__ = ["GENERATED_FACTORS", "StreamAdapterConfig"]

#: Which factor of ΔW = scale · B A is computed from the stream's state (the other one is learned per module).
GENERATED_FACTORS = ("B", "A")


class StreamAdapterConfig(ContextAdaptationConfig):
    """Configuration of a StreamAdapter generator (Muhtar et al., arXiv 2411.09289; this project's reading).

    Context mapping: for every adapted layer, ``rank`` (m) learned queries cross-attend to the key/value
    states that the frozen base computes for a chunk (its own KV cache); the m attention outputs, normalised
    and projected to ``state_dim``, are the chunk summary S_i. A gated recurrence
    ``h_i = g_i ⊙ h_{i-1} + (1 - g_i) ⊙ S_i``, ``g_i = σ(W_g [h_{i-1}; S_i] + b_g)``, folds the summaries
    into a fixed-size state ``h`` of shape ``[layers, m, state_dim]``.

    Weight absorption: every target module gets a rank-m update. With ``generated_factor="B"``,
    ``B[:, j] = head_t(h_j)`` (one small linear head per module type ``t``, shared over layers, with a layer
    embedding) and ``A`` is learned per module; with ``"A"`` it is the reverse.

    Args:
        rank: m, the number of learned queries per layer = the rank of each update.
        state_dim: width of each of the m state vectors per layer.
        generated_factor: ``"B"`` (B from the state, A learned) or ``"A"`` (A from the state, B learned).
        gate_bias_init: initial bias of the gate; σ(0) = 0.5 weighs the newest chunk as much as the past.
        query_init_std: standard deviation of the learned queries at initialisation (small: attention starts
            close to mean pooling of the values).
        kl_weight: weight of KL(teacher ‖ student) on the answer tokens in the training loss.
        ce_weight: weight of the student's cross-entropy on the answer tokens.
        temperature: softmax temperature of the KL term (the loss is multiplied by T² as usual).
        max_context_chunks: training only: at most this many chunks of context per example (earlier
            context items are dropped first).
        max_query_tokens / max_answer_tokens: training only: truncation of query (from the left, also to
            leave the teacher room for context) and answer.
        max_teacher_tokens: training only: longest teacher sequence (context + query + answer); context items
            are dropped from the front to fit.
        chunk_tokens: longest chunk that one ``stream.update`` takes, in base tokens (not counting the special
            tokens the tokenizer adds).
        bucket_max_padding / bucket_min_rows: training only: a batch's chunk, teacher and student rows are
            read in length buckets whose padded share of token slots stays within ``bucket_max_padding``,
            each of at least ``bucket_min_rows`` rows (but the last); every bucket is one more base pass
            (kernel launches) for less padding (a large ``bucket_min_rows``: one padded pass per role).
    """

    model_type = "ctx2param_stream_adapter"
    method_name = "stream_adapter"

    def __init__(
        self,
        rank: int = 16,
        state_dim: int = 64,
        generated_factor: str = "B",
        gate_bias_init: float = 0.0,
        query_init_std: float = 0.02,
        kl_weight: float = 1.0,
        ce_weight: float = 0.5,
        temperature: float = 1.0,
        max_context_chunks: int = 16,
        max_query_tokens: int = 512,
        max_answer_tokens: int = 128,
        max_teacher_tokens: int = 4096,
        chunk_tokens: int = 256,
        bucket_max_padding: float = 0.05,
        bucket_min_rows: int = 16,
        **kwargs: Any,
    ) -> None:
        if not isinstance(state_dim, int) or state_dim < 1:
            raise ValueError(f"state_dim must be a positive integer, got {state_dim!r}.")
        if generated_factor not in GENERATED_FACTORS:
            raise ValueError(
                f"generated_factor must be 'B' (B from the state, A learned) or 'A' (the reverse), "
                f"got {generated_factor!r}."
            )
        for name, value in (("kl_weight", kl_weight), ("ce_weight", ce_weight)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}.")
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}.")
        for name, value in (
            ("max_context_chunks", max_context_chunks),
            ("max_query_tokens", max_query_tokens),
            ("max_answer_tokens", max_answer_tokens),
            ("max_teacher_tokens", max_teacher_tokens),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not isinstance(bucket_max_padding, (int, float)) or not 0 <= bucket_max_padding < 1:
            raise ValueError(f"bucket_max_padding must be in [0, 1), got {bucket_max_padding!r}.")
        if isinstance(bucket_min_rows, bool) or not isinstance(bucket_min_rows, int) or bucket_min_rows < 1:
            raise ValueError(f"bucket_min_rows must be a positive integer, got {bucket_min_rows!r}.")
        self.bucket_max_padding = float(bucket_max_padding)
        self.bucket_min_rows = bucket_min_rows
        self.state_dim = state_dim
        self.generated_factor = generated_factor
        self.gate_bias_init = float(gate_bias_init)
        self.query_init_std = float(query_init_std)
        self.kl_weight = float(kl_weight)
        self.ce_weight = float(ce_weight)
        self.temperature = float(temperature)
        self.max_context_chunks = max_context_chunks
        self.max_query_tokens = max_query_tokens
        self.max_answer_tokens = max_answer_tokens
        self.max_teacher_tokens = max_teacher_tokens
        super().__init__(rank=rank, chunk_tokens=chunk_tokens, **kwargs)
