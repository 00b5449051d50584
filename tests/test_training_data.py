"""Tests of ctx2param.training.data: the JSONL format, chunking, and the training-safe sources."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ctx2param.evaluation.datasets import heldout_split, load_classification, load_coqa, load_squad
from ctx2param.training.data import (
    Passage,
    TrainingDataError,
    TrainingExample,
    boolq_examples,
    chunk_text,
    coqa_examples,
    demonstration_examples,
    is_contaminated,
    load_jsonl,
    passage_pool,
    passage_to_example,
    passages_to_examples,
    save_jsonl,
    to_training_examples,
)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from ctx2param.testing_utils import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


@pytest.fixture(scope="module", params=["smollm2", "tiny"])
def tokenizer(request, smollm2_tokenizer):
    if request.param == "smollm2":
        return smollm2_tokenizer
    from ctx2param.testing_utils import tiny_tokenizer

    return tiny_tokenizer()


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------- JSONL


def _write(tmp_path: Path, lines: list[str], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_round_trip(tmp_path: Path) -> None:
    records = [
        TrainingExample(("first context", "second context"), "Question: who?\nAnswer:", "Ada", source="q1"),
        Passage("A plain passage with ünïcode.", source="p1"),
        TrainingExample(["only one"], "", "continuation"),
    ]
    path = save_jsonl(records, tmp_path / "sub" / "train.jsonl")
    assert load_jsonl(path) == records
    assert records[2].contexts == ("only one",)  # a list is stored as a tuple
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {
        "contexts": ["first context", "second context"],
        "query": "Question: who?\nAnswer:",
        "answer": "Ada",
        "id": "q1",
    }
    assert json.loads(lines[1]) == {"text": "A plain passage with ünïcode.", "id": "p1"}
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]  # no temporary file left behind


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path: Path) -> None:
    path = _write(tmp_path, ['{"text": "one"}', "", "   ", '{"text": 3}'])
    with pytest.raises(TrainingDataError, match=rf"{re.escape(str(path))}:4: \"text\" must be a string"):
        load_jsonl(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"contexts": ["a"], "query": "q", "answer": "x"', "not valid JSON"),
        ('["a", "b"]', "expected a JSON object, got a JSON array"),
        ('{"contexts": ["a"], "query": "q"}', r"missing key\(s\) \['answer'\]"),
        ('{"query": "q", "answer": "x"}', r"missing key\(s\) \['contexts'\]"),
        ('{"context": ["a"], "query": "q", "answer": "x"}', r"missing key\(s\) \['contexts'\]"),
        ('{"contexts": ["a"], "query": "q", "answer": "x", "extra": 1}', r"unexpected key\(s\) \['extra'\]"),
        ('{"contexts": [], "query": "q", "answer": "x"}', '"contexts" is empty'),
        ('{"contexts": ["a", "  "], "query": "q", "answer": "x"}', r'"contexts"\[1\] is an empty context'),
        (
            '{"contexts": "a", "query": "q", "answer": "x"}',
            '"contexts" must be an array of strings, got a JSON string',
        ),
        (
            '{"contexts": ["a", 2], "query": "q", "answer": "x"}',
            r'"contexts"\[1\] must be a string, got a JSON number',
        ),
        ('{"contexts": ["a"], "query": 1, "answer": "x"}', '"query" must be a string, got a JSON number'),
        ('{"contexts": ["a"], "query": "q", "answer": ["x"]}', '"answer" must be a string, got a JSON array'),
        ('{"contexts": ["a"], "query": "q", "answer": ""}', '"answer" is empty'),
        ('{"text": ""}', '"text" is empty'),
        ('{"text": null}', '"text" must be a string, got a JSON null'),
        ('{"text": "t", "contexts": ["a"]}', r"unexpected key\(s\) \['contexts'\] next to \"text\""),
        ('{"text": "t", "id": 5}', '"id" must be a string'),
    ],
)
def test_jsonl_errors_name_file_line_and_problem(tmp_path: Path, line: str, message: str) -> None:
    path = _write(tmp_path, ['{"text": "a good first line"}', line])
    with pytest.raises(TrainingDataError, match=rf"^{re.escape(str(path))}:2: .*{message}"):
        load_jsonl(path)


def test_jsonl_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(TrainingDataError, match="no records"):
        load_jsonl(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="No records to write"):
        save_jsonl([], tmp_path / "none.jsonl")
    bom = tmp_path / "bom.jsonl"
    bom.write_text('\ufeff{"text": "with a byte-order mark"}\n', encoding="utf-8")
    assert load_jsonl(bom) == [Passage("with a byte-order mark")]
    with pytest.raises(TypeError, match="not a TrainingExample or Passage"):
        save_jsonl([{"text": "x"}], tmp_path / "bad.jsonl")  # type: ignore[list-item]
    assert not (tmp_path / "bad.jsonl").exists()


def test_training_example_validation_and_target() -> None:
    with pytest.raises(TrainingDataError, match="contexts is empty"):
        TrainingExample((), "q", "a")
    with pytest.raises(TrainingDataError, match="wrap a single context"):
        TrainingExample("just a string", "q", "a")  # type: ignore[arg-type]
    with pytest.raises(TrainingDataError, match=r"contexts\[0\] is empty"):
        TrainingExample((" ",), "q", "a")
    with pytest.raises(TrainingDataError, match="answer is empty"):
        TrainingExample(("c",), "q", " ")
    assert TrainingExample(("c",), "Answer:", "yes").target() == " yes"
    assert TrainingExample(("c",), "Answer: ", "yes").target() == "yes"
    assert TrainingExample(("c",), "", "the rest").target() == " the rest"  # continues the context


# ---------------------------------------------------------------------------------------------- chunking

_TEXTS = [
    "The cat sat on the mat. It was happy! Was it? Yes.\n\nA new paragraph starts here, and it goes on.",
    " ".join(f"word{i}" for i in range(300)),  # one long sentence without punctuation
    "Mr. Smith paid 5.5 dollars (about 5 euros). Then he left.  Emoji 😀 here. 日本語の文。もう一つ！ End",
    "Short.",
]


def _assert_chunks_cover(text: str, chunks: list[str]) -> None:
    position = 0
    for chunk in chunks:
        assert chunk and chunk == chunk.strip()
        index = text.find(chunk, position)
        assert index >= 0, f"chunk {chunk!r} not found in order"
        assert not text[position:index].strip(), f"non-whitespace text skipped: {text[position:index]!r}"
        position = index + len(chunk)
    assert not text[position:].strip()
    assert re.sub(r"\s+", "", "".join(chunks)) == re.sub(r"\s+", "", text)


@pytest.mark.parametrize("max_tokens", [4, 8, 20, 64, 4096])  # 4: a 4-byte character fits
def test_chunk_text_limits_and_coverage(tokenizer, max_tokens: int) -> None:
    texts = [*_TEXTS, *passage_pool()[:3]]
    for text in texts:
        chunks = chunk_text(text, tokenizer, max_tokens)
        assert all(_n_tokens(tokenizer, c) <= max_tokens for c in chunks)
        _assert_chunks_cover(text, chunks)
        assert chunk_text(text, tokenizer, max_tokens) == chunks  # deterministic
        if _n_tokens(tokenizer, text.strip()) <= max_tokens:
            assert chunks == [text.strip()]


def test_chunk_text_packs_whole_sentences(smollm2_tokenizer) -> None:
    sentences = [f"Sentence number {i} talks about topic {i} in a few words." for i in range(12)]
    text = " ".join(sentences)
    longest = max(_n_tokens(smollm2_tokenizer, s) for s in sentences)
    max_tokens = 2 * longest + 1  # room for two sentences, not three
    chunks = chunk_text(text, smollm2_tokenizer, max_tokens)
    assert all(c.endswith(".") for c in chunks)  # every cut is at a sentence end
    assert len(chunks) == 6
    assert all(c.count("Sentence number") == 2 for c in chunks)  # greedy: two per chunk


def test_chunk_text_splits_a_long_sentence_on_token_boundaries(smollm2_tokenizer) -> None:
    words = ["house", "river", "green", "table", "music", "paper", "water", "light"]
    assert all(_n_tokens(smollm2_tokenizer, " " + w) == 1 for w in words)
    body = " ".join(words[i % len(words)] for i in range(200))
    text = "Intro sentence. " + body + ". Outro sentence."
    chunks = chunk_text(text, smollm2_tokenizer, 16)
    assert all(_n_tokens(smollm2_tokenizer, c) <= 16 for c in chunks)
    _assert_chunks_cover(text, chunks)
    assert len(chunks) >= -(-_n_tokens(smollm2_tokenizer, text) // 16)
    # every word is one token here, so token-boundary cuts never split a word
    for chunk in chunks:
        assert set(re.findall(r"\w+", chunk)) <= {*words, "Intro", "Outro", "sentence"}
    # the long sentence's pieces are full (16 tokens) except the last, which the next sentence may join
    inner = [c for c in chunks if "Intro" not in c and "Outro" not in c]
    assert inner and all(_n_tokens(smollm2_tokenizer, c) == 16 for c in inner)


def test_chunk_text_one_token_chunks(smollm2_tokenizer) -> None:
    # " biomass" is one token but "biomass" alone is not: pieces then fall back to character cuts
    text = "All biomass goes through fermentation, distillation and burning."
    chunks = chunk_text(text, smollm2_tokenizer, 1)
    assert all(_n_tokens(smollm2_tokenizer, c) == 1 for c in chunks)
    _assert_chunks_cover(text, chunks)
    assert len(chunks) >= _n_tokens(smollm2_tokenizer, text)


def test_chunk_text_errors(smollm2_tokenizer) -> None:
    with pytest.raises(TrainingDataError, match="empty or whitespace"):
        chunk_text("", smollm2_tokenizer, 8)
    with pytest.raises(TrainingDataError, match="empty or whitespace"):
        chunk_text("  \n\t ", smollm2_tokenizer, 8)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        chunk_text("text", smollm2_tokenizer, 0)
    with pytest.raises(TypeError, match="max_tokens must be an int"):
        chunk_text("text", smollm2_tokenizer, 2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="text must be a str"):
        chunk_text(None, smollm2_tokenizer, 8)  # type: ignore[arg-type]
    # the emoji alone is three byte-level tokens for SmolLM2
    assert _n_tokens(smollm2_tokenizer, "😀") == 3
    with pytest.raises(TrainingDataError, match="alone needs more"):
        chunk_text("a 😀 b", smollm2_tokenizer, 2)
    chunks = chunk_text("a 😀 b", smollm2_tokenizer, 3)
    assert all(_n_tokens(smollm2_tokenizer, c) <= 3 for c in chunks) and len(chunks) == 2
    _assert_chunks_cover("a 😀 b", chunks)


# ---------------------------------------------------------------------------------------------- passages


def test_passage_to_example_cuts_at_token_counts(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    text = passage_pool()[1]
    encoding = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [s for s, _ in encoding["offset_mapping"]]
    assert len(starts) > 96
    ex = passage_to_example(text, tok, context_tokens=64, target_tokens=32, n_chunks=3, source="p")
    assert len(ex.contexts) == 3 and ex.query == "" and ex.source == "p"
    # the contexts are the first 64 tokens cut after tokens 21 and 43, the answer the next 32 tokens
    assert ex.contexts == (
        text[: starts[21]].strip(),
        text[starts[21] : starts[43]].strip(),
        text[starts[43] : starts[64]].strip(),
    )
    assert ex.answer == text[starts[64] : starts[96]].strip()
    assert tok.decode(encoding["input_ids"][64:96]).strip() == ex.answer
    assert ex.target() == " " + ex.answer
    one = passage_to_example(text, tok, 64, 32, 1)
    assert one.contexts == (text[: starts[64]].strip(),) and one.answer == ex.answer


def test_passage_to_example_errors(smollm2_tokenizer) -> None:
    with pytest.raises(TrainingDataError, match="needs more than context_tokens=64"):
        passage_to_example("Too short a passage.", smollm2_tokenizer, 64, 8)
    with pytest.raises(ValueError, match="n_chunks=5 exceeds context_tokens=4"):
        passage_to_example("Some text here that is long enough.", smollm2_tokenizer, 4, 2, n_chunks=5)
    with pytest.raises(TrainingDataError, match="empty"):
        passage_to_example(" ", smollm2_tokenizer, 4, 2)


def test_passages_to_examples_and_records(smollm2_tokenizer) -> None:
    passages = passage_pool()[:40]
    examples = passages_to_examples(
        passages, smollm2_tokenizer, 48, 16, n_chunks=4, random_chunks=True, seed=1
    )
    counts = [len(e.contexts) for e in examples]
    assert 0 < len(examples) <= 40 and set(counts) <= {1, 2, 3, 4} and len(set(counts)) > 1
    again = passages_to_examples(passages, smollm2_tokenizer, 48, 16, n_chunks=4, random_chunks=True, seed=1)
    assert again == examples
    with pytest.raises(TrainingDataError):
        passages_to_examples(["Tiny."], smollm2_tokenizer, 48, 16, skip_short=False)
    records = [Passage(passages[0]), TrainingExample(("c",), "q", "a")]
    converted = to_training_examples(records, smollm2_tokenizer, 32, 8)
    assert len(converted) == 2 and converted[1] == records[1] and converted[0].query == ""
    with pytest.raises(ValueError, match="pass tokenizer"):
        to_training_examples(records)


# ---------------------------------------------------------------------------------------------- sources


def _13grams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + 13]) for i in range(len(words) - 12)}


def test_passage_pool_holds_no_squad_validation_passage() -> None:
    squad = {" ".join(ex.passage.split()) for ex in load_squad()}
    squad_grams = set().union(*(_13grams(ex.passage) for ex in load_squad()))
    for part in ("train", "heldout"):
        pool = passage_pool(part)
        assert pool and len(set(pool)) == len(pool)
        assert not {" ".join(p.split()) for p in pool} & squad
        assert all(squad_grams.isdisjoint(_13grams(passage)) for passage in pool)
    # the filter is not vacuous: one raw CoQA story copies SQuAD's Super Bowl 50 paragraph
    leaked = [t.story for t in load_coqa() if is_contaminated(t.story)]
    assert leaked and all("Super Bowl 50" in s for s in leaked)
    assert not set(leaked) & set(passage_pool("all"))
    assert all(not any(s in ex.contexts for s in leaked) for ex in coqa_examples("all"))


def test_passage_pool_parts() -> None:
    train, held, everything = passage_pool("train"), passage_pool("heldout"), passage_pool("all")
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(everything)
    assert len(train) > 1000 and len(held) > 1000
    coqa_only = passage_pool("all", sources=["coqa"])
    assert len(coqa_only) == 498  # 499 distinct stories, one dropped for overlapping SQuAD
    with pytest.raises(ValueError, match="Unknown passage source"):
        passage_pool(sources=["squad"])
    with pytest.raises(ValueError, match="part must be"):
        passage_pool("test")  # type: ignore[arg-type]


def test_boolq_training_data_avoid_the_heldout_evaluation_part() -> None:
    held_passages = {ex.passage for ex in heldout_split(load_classification("boolq"), "heldout")}
    examples = boolq_examples()
    assert len(examples) > 1000
    assert all(ex.contexts[0] not in held_passages for ex in examples)
    assert not held_passages & set(passage_pool("train"))
    first = examples[0]
    assert first.query.startswith("Question: ") and first.query.endswith("?\nAnswer:")
    assert first.answer in ("yes", "no")


def test_coqa_examples_format() -> None:
    examples = coqa_examples()
    assert len(examples) > 3000
    train_stories = set(passage_pool("train", sources=["coqa"]))
    assert all(ex.contexts[0] in train_stories for ex in examples)
    turn = next(ex for ex in examples if ex.source.endswith("_turn2"))
    assert turn.query.count("Question: ") == 3 and turn.query.endswith("\nAnswer:")
    no_history = coqa_examples(history=False)
    assert all(ex.query.count("Question: ") == 1 for ex in no_history)
    by_id = {t.id: t for t in load_coqa()}
    assert turn.answer == by_id[turn.source.removeprefix("coqa:")].answers[0]


def test_demonstration_examples() -> None:
    examples = demonstration_examples("cb", k=3, seed=0)
    cb = load_classification("cb")
    train = heldout_split(cb, "train")
    held_texts = {ex.text for ex in heldout_split(cb, "heldout")}
    train_demos = {ex.demonstration() for ex in train}
    assert len(examples) == len(train)
    for ex in examples:
        assert len(ex.contexts) == 3
        assert set(ex.contexts) <= train_demos
        assert ex.query not in held_texts and ex.query + " " + ex.answer not in ex.contexts
        assert ex.answer in ("True", "False", "Neither")
        assert ex.target() == " " + ex.answer
    assert demonstration_examples("cb", k=3, seed=0) == examples
    assert demonstration_examples("cb", k=3, seed=1) != examples
    with pytest.raises(ValueError, match="k must be >= 1"):
        demonstration_examples("cb", k=0)
    with pytest.raises(ValueError, match="Unknown task"):
        demonstration_examples("mnli", k=2)


def test_demonstration_mix_draws_k_per_example() -> None:
    """k drawn per example from a set (each a prefix of the largest draw), several independent draws."""
    mix = demonstration_examples("rte", k=[1, 2, 4, 8], seed=3, draws=2)
    single = demonstration_examples("rte", k=8, seed=3)
    second = demonstration_examples("rte", k=8, seed=4)
    assert len(mix) == 2 * len(single)
    assert {len(ex.contexts) for ex in mix} == {1, 2, 4, 8}
    for i, (ex, full) in enumerate(zip(mix, single + second, strict=True)):
        assert (ex.query, ex.answer) == (full.query, full.answer)
        assert ex.contexts == full.contexts[: len(ex.contexts)]  # a prefix of the draw of the largest k
        assert ex.source == f"{full.source}/draw{i // len(single)}/k{len(ex.contexts)}"
    assert demonstration_examples("rte", k=[1, 2, 4, 8], seed=3, draws=2) == mix
    with pytest.raises(ValueError, match="empty set"):
        demonstration_examples("rte", k=[])
    with pytest.raises(ValueError, match="draws must be >= 1"):
        demonstration_examples("rte", k=2, draws=0)


def test_train_command_demonstration_mix() -> None:
    from ctx2param.commands.train import load_training_examples
    from ctx2param.testing_utils import tiny_tokenizer

    datasets: list = []
    examples = load_training_examples(
        ["demos-sst2", "demos-cb"], tiny_tokenizer(), max_chunks=1, max_examples=40, demo_k=[1, 16],
        demo_draws=3, datasets=datasets,
    )  # fmt: skip
    assert len(examples) == 80 and {len(ex.contexts) for ex in examples} == {1, 16}
    assert [(d["name"], d["num_examples"]) for d in datasets] == [
        ("SST-2 demonstrations", 40),
        ("CB demonstrations", 40),
    ]
    assert {ex.source.split("/draw")[1][0] for ex in examples} == {"0", "1", "2"}
