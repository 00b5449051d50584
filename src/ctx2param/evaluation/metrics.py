"""Text metrics for the evaluation protocol: SQuAD EM/F1, ROUGE-L and token accuracy.

Everything here is plain Python on strings or token lists; no model is involved (scoring choices
by length-normalised log-likelihood needs a model and lives in the evaluation runner).

SQuAD metrics follow the official SQuAD v1.1 evaluation script (``evaluate-v1.1.py``) exactly:

- :func:`normalize_answer`: lower-case, drop every character of ``string.punctuation``, replace the
  articles ``a``/``an``/``the`` (as whole words) by a space, collapse whitespace.
- :func:`exact_match`: 1.0 when the normalised prediction equals a normalised gold answer.
- :func:`f1`: bag-of-tokens F1 between the normalised prediction and a gold answer.
- Both take the maximum over the gold answers (``metric_max_over_ground_truths``).

Like the v1.1 script (and unlike v2.0), F1 is 0.0 when either side normalises to no tokens.
All scores are fractions in [0, 1] (the official script prints 100 x the mean).

:func:`rouge_l` is the LCS-based F-measure of Lin (2004) on token sequences; :func:`token_accuracy`
is the position-wise agreement of two token-id sequences over the reference length. Both are used to
score the context a decoder reads back out of an adapter.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

__all__ = [
    "exact_match",
    "f1",
    "normalize_answer",
    "rouge_l",
    "squad_metrics",
    "token_accuracy",
]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Normalise an answer as the official SQuAD v1.1 script does.

    Order of operations (as in ``evaluate-v1.1.py``): lower-case, remove punctuation, remove the
    articles a/an/the, then collapse runs of whitespace to single spaces and strip the ends.

    Example: ``normalize_answer("The  Cat!")`` is ``"cat"``.
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer expects a str, got {type(text).__name__}.")
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _gold_list(ground_truths: str | Sequence[str]) -> list[str]:
    golds = [ground_truths] if isinstance(ground_truths, str) else list(ground_truths)
    if not golds:
        raise ValueError("No gold answers given: pass at least one answer (a str or a list of str).")
    for gold in golds:
        if not isinstance(gold, str):
            raise TypeError(f"Gold answers must be str, got {type(gold).__name__}.")
    return golds


def _f1_single(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match(prediction: str, ground_truths: str | Sequence[str]) -> float:
    """SQuAD exact match: 1.0 if the normalised prediction equals any normalised gold answer, else 0.0.

    Args:
        prediction: the model's answer.
        ground_truths: one gold answer or a list of them (SQuAD gives up to five per question).
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}.")
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(gold) for gold in _gold_list(ground_truths)))


def f1(prediction: str, ground_truths: str | Sequence[str]) -> float:
    """SQuAD token F1, the maximum over the gold answers.

    Tokens are the whitespace-separated words of the normalised strings, counted as a multiset.
    Example: ``f1("the big red dog", "red dog")`` is 0.8 (precision 2/3, recall 1).
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}.")
    return max(_f1_single(prediction, gold) for gold in _gold_list(ground_truths))


def squad_metrics(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float | int]:
    """Mean exact match and F1 over a set of questions, as fractions in [0, 1].

    Args:
        predictions: one predicted answer per question.
        answers: for each question, its gold answers.

    Returns:
        ``{"exact_match": ..., "f1": ..., "n": number of questions}``.
    """
    if len(predictions) != len(answers):
        raise ValueError(
            f"Got {len(predictions)} predictions for {len(answers)} questions; "
            "pass one prediction per question."
        )
    if not predictions:
        raise ValueError("No predictions to score: pass at least one question.")
    em = sum(exact_match(p, a) for p, a in zip(predictions, answers, strict=True)) / len(predictions)
    f = sum(f1(p, a) for p, a in zip(predictions, answers, strict=True)) / len(predictions)
    return {"exact_match": em, "f1": f, "n": len(predictions)}


def _as_token_list(tokens: Any, name: str) -> list[Hashable]:
    """Accept a list/tuple of tokens or a 1-D tensor/array (anything with ``tolist``)."""
    if isinstance(tokens, (str, bytes)):
        raise TypeError(
            f"{name} must be a sequence of tokens, not a {type(tokens).__name__}: split the text first "
            "(e.g. text.split() or tokenizer(text).input_ids)."
        )
    if hasattr(tokens, "tolist"):
        shape = getattr(tokens, "shape", None)
        if shape is not None and len(shape) != 1:
            raise ValueError(f"{name} must be one sequence (1-D), got shape {tuple(shape)}.")
        tokens = tokens.tolist()
    if not isinstance(tokens, Iterable):
        raise TypeError(f"{name} must be a sequence of tokens, got {type(tokens).__name__}.")
    return list(tokens)


def _lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(min) memory."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: Sequence[Hashable], reference: Sequence[Hashable], beta: float = 1.0) -> float:
    """ROUGE-L F-measure between two token sequences (Lin, 2004).

    With L the length of the longest common subsequence, recall R = L / len(reference), precision
    P = L / len(prediction) and F = (1 + beta^2) R P / (R + beta^2 P). ``beta = 1`` gives the
    harmonic mean (the ``rouge-score`` package's ``fmeasure``).

    Args:
        prediction: predicted tokens (words or token ids; a list, tuple or 1-D tensor).
        reference: reference tokens, not empty.
        beta: weight of recall relative to precision, > 0.

    Returns:
        A float in [0, 1]; 0.0 for an empty prediction.
    """
    pred = _as_token_list(prediction, "prediction")
    ref = _as_token_list(reference, "reference")
    if not ref:
        raise ValueError("reference is empty: ROUGE-L needs at least one reference token.")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}.")
    if not pred:
        return 0.0
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    recall = lcs / len(ref)
    precision = lcs / len(pred)
    b2 = beta * beta
    return (1 + b2) * recall * precision / (recall + b2 * precision)


def token_accuracy(predicted_ids: Sequence[int], reference_ids: Sequence[int]) -> float:
    """Fraction of reference positions where the prediction has the same token.

    Position i counts as correct when ``predicted_ids[i] == reference_ids[i]``; positions past the end
    of a shorter prediction count as wrong, extra predicted tokens past the reference are ignored.
    The denominator is ``len(reference_ids)``.

    Args:
        predicted_ids: predicted token ids (list, tuple or 1-D tensor).
        reference_ids: reference token ids, not empty.
    """
    pred = _as_token_list(predicted_ids, "predicted_ids")
    ref = _as_token_list(reference_ids, "reference_ids")
    if not ref:
        raise ValueError("reference_ids is empty: token accuracy is measured over the reference length.")
    correct = sum(1 for p, r in zip(pred, ref, strict=False) if p == r)
    return correct / len(ref)
