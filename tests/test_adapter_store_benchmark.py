"""benchmarks/adapter_store.py on a tiny random model: the JSON has every field, with sane values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import _methods

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "adapter_store.py"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # also restores the threads the script sets
TIMING_KEYS = {"median_s", "p90_s", "cpu_median_s", "cpu_p90_s", "repeats", "all_s", "all_cpu_s"}


@pytest.fixture(scope="module")
def script():
    yield from _methods.load_script(SCRIPT, "adapter_store_benchmark")


def test_adapter_store_benchmark_writes_every_number(script, tmp_path: Path) -> None:
    out = tmp_path / "store.json"
    argv = ["--tiny", "--data", "builtin", "--n", "6", "--batch-size", "4", "--sum-k", "1,6",
            "--repeats", "2", "--threads", "1", "--out", str(out)]  # fmt: skip
    report = script.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    settings = report["settings"]
    assert settings["generator_trained"] is False and "untrained" in settings["note"]
    assert settings["adapter"]["modules"] == 14 and settings["n"] == 6
    assert {"versions", "hardware", "load_average_before_after", "wall_s"} <= set(report)
    generation, store, read = report["generation"], report["adapt_corpus"], report["read"]
    for timing in (generation, store, read["open"], read["get_one"], read["k_1"]["sum"], read["k_6"]["sum"]):
        assert set(timing) >= TIMING_KEYS and timing["repeats"] == 2 and timing["median_s"] > 0
    assert generation["adapters_per_s"] == pytest.approx(6 / generation["median_s"])
    assert generation["passage_tokens"] > 6
    assert store["adapters_per_s"] == pytest.approx(6 / store["median_s"])
    assert 0 < store["write_s_median"] < store["median_s"] and store["shard_files"] >= 1
    assert store["bytes_per_adapter"] > 4 * 14 * 4 * (64 + 64)  # at least the factors: 14 modules of rank 4
    with pytest.raises(SystemExit):
        script.main(["--tiny", "--n", "2", "--sum-k", "3", "--out", str(tmp_path / "x.json")])
