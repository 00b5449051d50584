"""Kill saves with SIGKILL at random points and report what each folder holds afterwards.

Run by ``tests/test_atomic_saves.py`` as a script in its own process (one interpreter start for all trials):
``python tests/_kill_saves.py ROOT --trials N --seed S`` prints one JSON object, ``{kind: report}``, for
the kinds ``adapter`` (ctx2param format and PEFT format, alternately: every save switches format),
``generator`` and ``sharded`` (a generator in 4 shards and in 2 shards, alternately).

Each trial forks a child that saves the two versions of its kind into one folder in turn, without end; after
a random delay (0 to 2.5 times a measured save) the parent kills it with SIGKILL and checks that the folder
is exactly one of the two versions: the right set of files, the config of that version, its tensors bit for
bit, and loadable through the public ``from_pretrained``. A shared counter tells whether the kill landed
inside a save. The folder then carries on into the next trial. At the end one more save (in the parent)
must leave nothing but the folder in its parent directory (the killed saves' temporary folders cleaned up).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import signal
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _methods  # noqa: E402
from ctx2param import AutoModelForContextAdaptation, ContextAdapter  # noqa: E402
from ctx2param.modeling_utils import _read_weights  # noqa: E402
from ctx2param.testing_utils import tiny_model  # noqa: E402

SHAPES = {f"model.layers.{i}.self_attn.{p}": (48, 64) for i in range(4) for p in ("q_proj", "v_proj")}


class Kind:
    """Two versions of one kind of save and a check of which one a folder holds."""

    def __init__(self, name: str, save: Callable[[int, Path], None], identify: Callable[[Path], int]):
        self.name, self.save, self.identify = name, save, identify


def adapter_kind() -> Kind:
    versions = [
        (ContextAdapter.random(SHAPES, rank=2, seed=0, base_model="org/base"), "ctx2param"),
        (ContextAdapter.random(SHAPES, rank=3, seed=1, scale=0.5, base_model="org/base"), "peft"),
    ]
    files = [
        {"ctx2param_adapter.json", "adapter.safetensors"},
        {"adapter_config.json", "adapter_model.safetensors"},
    ]

    def save(i: int, folder: Path) -> None:
        adapter, fmt = versions[i]
        adapter.save_pretrained(folder, format=fmt)

    def identify(folder: Path) -> int:
        present = set(os.listdir(folder))
        if present not in files:
            raise AssertionError(f"files {sorted(present)} are neither version's")
        i = files.index(present)
        loaded, (want, _) = ContextAdapter.from_pretrained(folder), versions[i]
        if set(loaded) != set(want):
            raise AssertionError(f"version {i}: other modules")
        for name in want:  # PEFT folds the scale (0.5, exact) into B
            got_b, want_b = loaded[name].B * loaded[name].scale, want[name].B * want[name].scale
            if not (torch.equal(loaded[name].A, want[name].A) and torch.equal(got_b, want_b)):
                raise AssertionError(f"version {i}'s files hold other factors for {name}")
        return i

    return Kind("adapter", save, identify)


def generator_kind(sharded: bool) -> Kind:
    base = tiny_model("llama")
    versions = []
    for seed, init_std in ((0, 0.05), (1, 0.08)):
        torch.manual_seed(seed)
        generator = _methods.make_generator(base, init_std=init_std)
        with torch.no_grad():
            for p in generator.method_parameters():
                p.normal_(0.0, init_std)
        versions.append(generator)
    states = [{k: v.detach().clone() for k, v in g.method_state_dict().items()} for g in versions]
    shard_sizes = [30_000, 70_000] if sharded else [None, None]

    def save(i: int, folder: Path) -> None:
        size = shard_sizes[i]
        versions[i].save_pretrained(folder, **({"max_shard_size": size} if size else {}))

    expected_files = []
    for i in range(2):  # the exact file set of each version, from a save into a fresh folder
        probe = Path(os.environ["KILL_SAVES_ROOT"]) / f"probe-{'sharded' if sharded else 'single'}-{i}"
        save(i, probe)
        expected_files.append(set(os.listdir(probe)))
    if sharded and (min(len(f) for f in expected_files) < 4 or expected_files[0] == expected_files[1]):
        raise RuntimeError(f"the sharded versions must have different shards: {expected_files}")

    def identify(folder: Path) -> int:
        present = set(os.listdir(folder))
        config = json.loads((folder / "config.json").read_text())
        i = [0.05, 0.08].index(config["init_std"])  # which version the config is
        if present != expected_files[i]:
            raise AssertionError(f"config of version {i} but files {sorted(present)}")
        weights = _read_weights(folder)
        if set(weights) != set(states[i]) or not all(torch.equal(weights[k], states[i][k]) for k in weights):
            raise AssertionError(f"config of version {i} with other weights")
        loaded = AutoModelForContextAdaptation.from_pretrained(folder, base_model=base)
        if not all(torch.equal(v, states[i][k]) for k, v in loaded.method_state_dict().items()):
            raise AssertionError(f"version {i} does not load as itself")
        return i

    return Kind("sharded" if sharded else "generator", save, identify)


def _counts(counters: mmap.mmap) -> tuple[int, int]:
    return struct.unpack("qq", counters[:16])


def _fork_saver(kind: Kind, folder: Path, first: int, counters: mmap.mmap) -> int:
    """Fork a child that saves version ``first``, then the other, ... until killed; returns its pid."""
    counters[:16] = struct.pack("qq", 0, 0)
    pid = os.fork()
    if pid:
        return pid
    try:  # the child
        i = first
        while True:
            started, finished = _counts(counters)
            counters[:16] = struct.pack("qq", started + 1, finished)
            kind.save(i, folder)
            counters[:16] = struct.pack("qq", started + 1, finished + 1)
            i = 1 - i
    finally:
        os._exit(1)


def _wait_for(counters: mmap.mmap, index: int, value: int, pid: int, timeout: float = 30.0) -> float:
    """Wait until counter ``index`` (0 started, 1 finished) reaches ``value``; returns that moment."""
    deadline = time.perf_counter() + timeout
    while _counts(counters)[index] < value:
        if time.perf_counter() > deadline or os.waitpid(pid, os.WNOHANG) != (0, 0):
            raise RuntimeError(f"the saving child {pid} stopped before save {value}")
        time.sleep(0.0001)
    return time.perf_counter()


def run_trials(kind: Kind, root: Path, trials: int, rng: random.Random) -> dict[str, Any]:
    folder = root / kind.name / "saved"
    folder.parent.mkdir(parents=True)
    kind.save(0, folder)
    counters = mmap.mmap(-1, 16)  # shared with the children: saves started, saves finished
    # how long one save takes in a forked child
    pid = _fork_saver(kind, folder, 1, counters)
    begin = _wait_for(counters, 0, 2, pid)
    save_time = (_wait_for(counters, 1, 7, pid) - begin) / 6
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    report: dict[str, Any] = {"trials": 0, "versions": [0, 0], "failures": [], "killed_inside_a_save": 0}
    report["save_ms"] = round(save_time * 1e3, 2)
    report["leftovers_after_kills"] = 0
    try:
        current = kind.identify(folder)
    except Exception as err:  # noqa: BLE001
        report["failures"].append(f"after the timing run: {type(err).__name__}: {err}")
        shutil.rmtree(folder)
        kind.save(0, folder)
        current = 0
    for trial in range(trials):
        pid = _fork_saver(kind, folder, 1 - current, counters)
        # kill during the first or the second save of the child (at a random point of it), or between
        _wait_for(counters, 0, rng.choice((1, 2)), pid)
        time.sleep(rng.uniform(0.0, 1.2 * save_time))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        started, finished = _counts(counters)
        report["trials"] += 1
        report["killed_inside_a_save"] += int(started > finished)
        report["leftovers_after_kills"] += int(any(p.name != "saved" for p in folder.parent.iterdir()))
        try:
            current = kind.identify(folder)
            report["versions"][current] += 1
        except Exception as err:  # noqa: BLE001 - every way the folder can be broken is a failure
            report["failures"].append(f"trial {trial}: {type(err).__name__}: {err}")
            if folder.exists():
                shutil.rmtree(folder)
            kind.save(0, folder)  # carry on from a known state
            current = 0
    kind.save(1 - current, folder)
    try:
        report["final_version_ok"] = kind.identify(folder) == 1 - current
    except Exception as err:  # noqa: BLE001
        report["final_version_ok"] = False
        report["failures"].append(f"after the final save: {type(err).__name__}: {err}")
    report["left_beside_the_folder"] = sorted(p.name for p in folder.parent.iterdir() if p.name != "saved")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--trials", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", nargs="+", default=["adapter", "generator", "sharded"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # no thread pool: the process forks
    root = Path(args.root)
    os.environ["KILL_SAVES_ROOT"] = str(root)
    rng = random.Random(args.seed)
    makers = {
        "adapter": adapter_kind,
        "generator": lambda: generator_kind(False),
        "sharded": lambda: generator_kind(True),
    }
    results = {name: run_trials(makers[name](), root, args.trials, rng) for name in args.kinds}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
