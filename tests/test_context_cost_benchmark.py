"""benchmarks/context_cost.py on a tiny random model: the JSON has every field, with sane values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import _methods

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "context_cost.py"


@pytest.fixture(scope="module")
def script():
    yield from _methods.load_script(SCRIPT, "context_cost")


@pytest.fixture(autouse=True)
def _restore_threads():
    """The script sets torch's thread count (--threads 1); put it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


TIMING_KEYS = {"median_s", "p90_s", "cpu_median_s", "cpu_p90_s", "repeats", "all_s", "all_cpu_s"}
PHASES = {"icl", "adapter_generation", "adapter_answering", "prefill", "adapter_total"}


def _run(script, tmp_path, method, extra=()):
    out = tmp_path / f"{method}.json"
    argv = ["--tiny", "--method", method, "--data", "builtin", "--k", "1,3", "--questions", "3",
            "--max-new-tokens", "3", "--decode-tokens", "3", "--repeats", "2", "--threads", "1",
            "--out", str(out), *extra]  # fmt: skip
    report = script.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    return report


@pytest.mark.parametrize("method", ["compas", "stream-adapter"])
def test_tiny_run_writes_every_field(script, tmp_path, capsys, method):
    report = _run(script, tmp_path, method)
    assert report["benchmark"] == "context_cost"
    assert {
        "date",
        "hardware",
        "versions",
        "settings",
        "results",
        "load_average_before_after",
        "wall_s",
        "complete",
    } <= set(report)
    assert report["complete"] is True
    settings = report["settings"]
    assert settings["method"] == method and settings["trained"] is False
    assert settings["k"] == [1, 3] and settings["questions"] == 3 and settings["batch_size"] == 3
    assert "untrained" in settings["model"] and settings["note_on_training"]
    assert report["versions"]["torch"] and report["hardware"]["cpu_count"] >= 1
    assert set(report["results"]) == {"k_1", "k_3"}
    for key, res in report["results"].items():
        k = int(key.split("_")[1])
        assert res["k"] == k and res["questions"] == 3 and res["batch_size"] == 3
        assert res["adapter_rank"] >= 1 and res["adapter_modules"] >= 1 and res["generator_chunks"] >= k
        assert set(res["timings"]) == PHASES
        for phase, t in res["timings"].items():
            assert set(t) >= TIMING_KEYS, phase
            assert t["repeats"] == 2 and len(t["all_s"]) == 2
            assert t["median_s"] > 0 and t["p90_s"] >= t["median_s"] * 0.999 and t["cpu_median_s"] > 0
        total = res["timings"]["adapter_total"]["all_s"]
        parts = zip(
            res["timings"]["adapter_generation"]["all_s"],
            res["timings"]["adapter_answering"]["all_s"],
            strict=True,
        )
        assert total == pytest.approx([g + a for g, a in parts], abs=1e-5)
        assert set(res["memory"]) == {"icl", "adapter_generation", "adapter_answering", "prefill"}
        for mem in res["memory"].values():
            assert mem["rss_peak_bytes"] > 0 and "rss_peak_delta_bytes" in mem
        assert set(res["decode"]) == {"batch_1", "batch_3"}
        for dec in res["decode"].values():
            assert dec["base_s_per_token"] > 0 and dec["adapted_s_per_token"] > 0
            assert dec["merged_s_per_token"] > 0 and "merged_overhead_percent" in dec  # a float base
            assert dec["new_tokens"] == 3 and len(dec["all_base_s_per_token"]) == 2
            assert len(dec["all_merged_s_per_token"]) == 2
        tokens = res["tokens"]
        assert tokens["icl"]["generated"] == tokens["adapter"]["generated"] == 9
        assert tokens["icl"]["prompt_padded"] >= tokens["icl"]["prompt"] > 0
        assert tokens["adapter"]["generator"] > 0 and tokens["adapter"]["prompt"] > 0
        assert tokens["icl"]["total"] == tokens["icl"]["prompt"] + 9
        assert tokens["adapter"]["total"] == tokens["adapter"]["generator"] + tokens["adapter"]["prompt"] + 9
        if k > 1:  # every ICL prompt rereads the k passages; the adapter path reads them once
            assert tokens["icl"]["total"] > tokens["adapter"]["total"]
            assert res["derived"]["tokens_ratio_icl_over_adapter"] > 1
        assert res["icl_prompts_cut_to_window"] == 0
        for clock in ("wall", "cpu"):
            d = res["derived"][clock]
            assert d["speedup_adapter_over_icl"] > 0 and d["generation_over_prefill"] > 0
            assert d["icl_s_per_question"] > 0 and d["adapter_answer_s_per_question"] > 0
            be = d["break_even_questions"]
            assert be is None or be > 0
    printed = capsys.readouterr().out
    assert "break-even Q" in printed and "written to" in printed


def test_break_even_is_generation_over_per_question_gain(script, tmp_path):
    res = _run(script, tmp_path, "compas", ["--k", "2"])["results"]["k_2"]
    t, d = res["timings"], res["derived"]["wall"]
    gain = (t["icl"]["median_s"] - t["adapter_answering"]["median_s"]) / 3
    expected = t["adapter_generation"]["median_s"] / gain if gain > 0 else None
    assert d["break_even_questions"] == (pytest.approx(expected) if expected else None)
    assert d["speedup_adapter_over_icl"] == pytest.approx(
        t["icl"]["median_s"] / t["adapter_total"]["median_s"]
    )


def test_bad_arguments(script):
    with pytest.raises(SystemExit):
        script.parse_args(["--questions", "0"])
    with pytest.raises(SystemExit):
        script.parse_args(["--k", "0"])
    args = script.parse_args(["--device", "cuda"])
    assert args.questions == 64 and args.dtype == "bfloat16" and args.batch_size == 64
    args = script.parse_args([])
    assert args.questions == 8 and args.dtype == "float32" and args.ks == [1, 4, 16]


def test_report_keeps_finished_rows_when_a_later_k_fails(script, tmp_path, monkeypatch):
    """The JSON is rewritten after every k: a run stopped during k = 3 keeps k = 1, marked incomplete."""
    bench_k = script.bench_k

    def stop_at_k3(model, k, args, device):
        if k == 3:
            raise KeyboardInterrupt("stopped by a time limit")
        return bench_k(model, k, args, device)

    monkeypatch.setattr(script, "bench_k", stop_at_k3)
    out = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        argv = ["--tiny", "--data", "builtin", "--k", "1,3", "--questions", "2", "--max-new-tokens", "2",
                "--decode-tokens", "2", "--repeats", "1", "--threads", "1", "--out", str(out)]  # fmt: skip
        script.main(argv)
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and set(partial["results"]) == {"k_1"}
