"""Tests of ctx2param.evaluation.metrics against hand-computed values and reference implementations."""

from __future__ import annotations

import itertools
import random
import re
import string
from collections import Counter

import pytest
import torch

from ctx2param.evaluation.metrics import (
    exact_match,
    f1,
    normalize_answer,
    rouge_l,
    squad_metrics,
    token_accuracy,
)

# ---------------------------------------------------------------- the official SQuAD v1.1 script, as oracle


def _official_normalize_answer(s):
    """Verbatim logic of normalize_answer in the official evaluate-v1.1.py."""

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def _official_f1_score(prediction, ground_truth):
    prediction_tokens = _official_normalize_answer(prediction).split()
    ground_truth_tokens = _official_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def _official_exact_match_score(prediction, ground_truth):
    return _official_normalize_answer(prediction) == _official_normalize_answer(ground_truth)


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The Cat", "cat"),
        ("  An apple, a day! ", "apple day"),
        ("the theater", "theater"),  # only whole-word articles go
        ("U.S.", "us"),
        ("Saint-Bernadette", "saintbernadette"),  # hyphen is punctuation: removed, not a space
        ("THE\tEnd\n", "end"),
        ("", ""),
    ],
)
def test_normalize_answer_known_cases(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_normalize_answer_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="str"):
        normalize_answer(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------- exact match and F1 on known pairs


def test_exact_match_known_pairs() -> None:
    assert exact_match("The Cat", "cat") == 1.0
    assert exact_match("cat.", ["dog", "the cat"]) == 1.0
    assert exact_match("a cat", "cats") == 0.0
    assert exact_match("Denver Broncos", ["Broncos"]) == 0.0
    assert exact_match("U.S.", "US") == 1.0
    # v1.1 behaviour: an answer that normalises to nothing matches a gold that does too.
    assert exact_match("the", "an") == 1.0


def test_f1_known_pairs() -> None:
    # "big red dog" vs "red dog": 2 common, P = 2/3, R = 1 -> 2 * (2/3) / (5/3) = 0.8
    assert f1("the big red dog", "red dog") == pytest.approx(0.8)
    # "x y z w" vs "x y": P = 1/2, R = 1 -> 2/3
    assert f1("x y z w", "x y") == pytest.approx(2 / 3)
    # multiset counting: "dog dog dog" vs "dog": 1 common, P = 1/3, R = 1 -> 0.5
    assert f1("dog dog dog", "dog") == pytest.approx(0.5)
    # P = 1/2 (red, blue), R = 1/3 (red, car, big) -> 2 * (1/6) / (5/6) = 0.4
    assert f1("red blue", "red car big") == pytest.approx(0.4)
    assert f1("cat", "dog") == 0.0
    # v1.1: nothing in common (also when both normalise to empty) gives 0
    assert f1("the", "a") == 0.0


def test_f1_and_em_take_max_over_gold_answers() -> None:
    assert f1("red dog", ["blue cat", "the red dog"]) == 1.0
    assert f1("the big red dog", ["cat", "red dog", "dog"]) == pytest.approx(0.8)
    assert exact_match("Broncos", ["Denver Broncos", "broncos!"]) == 1.0


def test_gold_answers_validation() -> None:
    with pytest.raises(ValueError, match="gold"):
        f1("x", [])
    with pytest.raises(TypeError, match="str"):
        exact_match("x", [1])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="prediction"):
        f1(None, "x")  # type: ignore[arg-type]


def test_matches_official_script_on_random_strings() -> None:
    rng = random.Random(0)
    vocab = ["the", "a", "an", "The", "cat", "Cat,", "dog.", "red", "U.S.", "big-red", "(1984)", "an!", "x"]
    for _ in range(500):
        pred = " ".join(rng.choices(vocab, k=rng.randint(0, 6)))
        golds = [" ".join(rng.choices(vocab, k=rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        assert normalize_answer(pred) == _official_normalize_answer(pred)
        assert f1(pred, golds) == pytest.approx(max(_official_f1_score(pred, g) for g in golds))
        assert exact_match(pred, golds) == float(max(_official_exact_match_score(pred, g) for g in golds))


def test_squad_metrics_means() -> None:
    scores = squad_metrics(["The Cat", "the big red dog"], [["cat"], ["red dog", "blue"]])
    assert scores["exact_match"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx((1.0 + 0.8) / 2)
    assert scores["n"] == 2
    with pytest.raises(ValueError, match="one prediction per question"):
        squad_metrics(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="at least one"):
        squad_metrics([], [])


# ---------------------------------------------------------------- ROUGE-L


def _brute_force_lcs(a: list, b: list) -> int:
    for size in range(min(len(a), len(b)), 0, -1):
        subs = set(itertools.combinations(a, size))
        if any(c in subs for c in itertools.combinations(b, size)):
            return size
    return 0


def test_rouge_l_known_values() -> None:
    # LCS "the cat on the mat" = 5 of 6 on both sides
    pred, ref = ["the", "cat", "sat", "on", "the", "mat"], ["the", "cat", "is", "on", "the", "mat"]
    assert rouge_l(pred, ref) == pytest.approx(5 / 6)
    # LCS = 3, P = 3/5, R = 1 -> F1 = 0.75; beta = 2 -> 5 * 0.6 / (1 + 4 * 0.6)
    pred, ref = list("abcde"), list("ace")
    assert rouge_l(pred, ref) == pytest.approx(0.75)
    assert rouge_l(pred, ref, beta=2.0) == pytest.approx(3.0 / 3.4)
    # order matters: reversed sequence shares only one token in order
    assert rouge_l([1, 2, 3], [3, 2, 1]) == pytest.approx(1 / 3)
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l([4, 5], [1, 2, 3]) == 0.0
    assert rouge_l([], [1, 2]) == 0.0
    assert rouge_l(torch.tensor([1, 2, 3]), torch.tensor([1, 3])) == pytest.approx(0.8)


def test_rouge_l_matches_brute_force_lcs() -> None:
    rng = random.Random(1)
    for _ in range(200):
        a = [rng.randint(0, 4) for _ in range(rng.randint(1, 7))]
        b = [rng.randint(0, 4) for _ in range(rng.randint(1, 7))]
        lcs = _brute_force_lcs(a, b)
        expected = 0.0 if lcs == 0 else 2 * (lcs / len(a)) * (lcs / len(b)) / (lcs / len(a) + lcs / len(b))
        assert rouge_l(a, b) == pytest.approx(expected)


def test_rouge_l_bad_input() -> None:
    with pytest.raises(ValueError, match="reference is empty"):
        rouge_l([1], [])
    with pytest.raises(TypeError, match="split the text"):
        rouge_l("the cat", "the cat")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        rouge_l([1], [1], beta=0.0)
    with pytest.raises(ValueError, match="1-D"):
        rouge_l(torch.zeros(2, 2), [1])


# ---------------------------------------------------------------- token accuracy


def test_token_accuracy_known_values() -> None:
    assert token_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == pytest.approx(0.75)
    assert token_accuracy([1, 2], [1, 2, 3, 4]) == pytest.approx(0.5)  # missing positions are wrong
    assert token_accuracy([1, 2, 3, 9, 9], [1, 2, 3]) == 1.0  # extra predictions are ignored
    assert token_accuracy([2, 3, 4], [1, 2, 3]) == 0.0  # position-wise, not a subsequence match
    assert token_accuracy([], [5]) == 0.0
    assert token_accuracy(torch.tensor([7, 8, 9]), (7, 0, 9)) == pytest.approx(2 / 3)


def test_token_accuracy_bad_input() -> None:
    with pytest.raises(ValueError, match="reference"):
        token_accuracy([1], [])
    with pytest.raises(ValueError, match="1-D"):
        token_accuracy(torch.zeros(1, 3, dtype=torch.long), [1, 2, 3])
