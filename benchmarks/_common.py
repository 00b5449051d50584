"""Helpers shared by the benchmark scripts: timing statistics, peak memory sampling, load average, reports.

The scripts run as ``python benchmarks/<name>.py`` (Python puts ``benchmarks/`` on ``sys.path``); each one
also adds its own folder to ``sys.path`` before ``import _common``, so that loading a script by its path
(as the tests do) finds this module too. torch is imported only where it is needed. Hardware and library
versions come from ``ctx2param.environment``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


# ------------------------------------------------------------------------------------------- timing helpers
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def p90(values: list[float]) -> float:
    """90th percentile by the nearest-rank method."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(0.9 * len(ordered)) - 1))]


def summarize(wall: list[float], cpu: list[float]) -> dict[str, Any]:
    """Median and 90th percentile of wall-clock and CPU timings, in seconds."""
    return {
        "median_s": statistics.median(wall),
        "p90_s": p90(wall),
        "cpu_median_s": statistics.median(cpu),
        "cpu_p90_s": p90(cpu),
        "repeats": len(wall),
        "all_s": [round(t, 6) for t in wall],
        "all_cpu_s": [round(t, 6) for t in cpu],
    }


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """``(wall s, CPU s, result)`` of one call, the device synchronised at the end."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, result


# ------------------------------------------------------------------------------------------------ memory
def rss_bytes() -> int:
    """This process's resident set size (``/proc/self/statm``)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler(threading.Thread):
    """Samples the process RSS every ``interval`` seconds and keeps the maximum."""

    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = rss_bytes()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        self.peak = max(self.peak, rss_bytes())
        return self.peak


# ------------------------------------------------------------------------------------------------ environment
def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def write_report(report: dict[str, Any], out: Path, started: float, load_before: list[float] | None) -> None:
    """Add ``load_average_before_after`` and ``wall_s`` (since ``started``, a ``time.perf_counter()``) to
    ``report`` and write it to ``out`` as indented JSON (atomically: it is rewritten while a run goes on)."""
    from ctx2param.file_utils import write_text_atomically

    report["load_average_before_after"] = [load_before, load_average()]
    report["wall_s"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, json.dumps(report, indent=2) + "\n")  # a reader never sees half a report
