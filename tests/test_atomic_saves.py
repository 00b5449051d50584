"""Folder saves are all-or-nothing: a save killed at any point (SIGKILL, in a subprocess) leaves the previous
complete version or the new complete one, never a mix; nothing of an earlier save goes stale (shards, shard
index, the other adapter format); files the save does not own stay (hard-linked, not copied); temporary
folders of killed saves are cleaned up by the next save; the non-atomic fallback recovers too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _methods
import ctx2param
import ctx2param.file_utils as file_utils
from ctx2param import AutoModelForContextAdaptation, ContextAdapter
from ctx2param.testing_utils import tiny_model

TESTS = Path(__file__).resolve().parent
SHAPES = {"model.layers.0.self_attn.q_proj": (8, 6), "model.layers.0.self_attn.v_proj": (4, 6)}
TRIALS = 25


def beside(folder: Path) -> list[str]:
    """What else lies in ``folder``'s parent (temporary folders a save forgot)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------ kill -9 trials
@pytest.fixture(scope="module")
def kill_reports(tmp_path_factory) -> dict:
    """Run ``tests/_kill_saves.py`` once: TRIALS kills of each kind of save, in forked children."""
    root = tmp_path_factory.mktemp("kills")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(ctx2param.__file__).parents[1]), str(TESTS)]),
    }
    proc = subprocess.run(
        [sys.executable, str(TESTS / "_kill_saves.py"), str(root), "--trials", str(TRIALS), "--seed", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill trials fork saving children (POSIX)")
@pytest.mark.parametrize("kind", ["adapter", "generator", "sharded"])
def test_a_save_killed_at_a_random_point_leaves_the_old_or_the_new_version(kill_reports, kind):
    report = kill_reports[kind]
    assert report["trials"] >= 20
    assert report["failures"] == []  # each folder was exactly one complete version (files, config, tensors)
    assert min(report["versions"]) >= 3, report  # both outcomes occur: kills before and after the swap
    assert report["killed_inside_a_save"] >= 0.8 * report["trials"], report  # the kills hit saves
    assert report["leftovers_after_kills"] > 0  # killed saves do leave temporary folders ...
    assert report["final_version_ok"] and report["left_beside_the_folder"] == []  # ... the next save clears


# ------------------------------------------------------------------------------------------------ stale files
@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


def test_an_unsharded_save_over_a_sharded_one_loads_the_new_weights(tmp_path, base):
    old, new = _methods.make_generator(base), _methods.make_generator(base, init_std=0.2)
    folder = tmp_path / "gen"
    old.save_pretrained(folder, max_shard_size=30_000)
    assert (folder / "model.safetensors.index.json").is_file()
    new.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]  # no index, no old shards
    loaded = AutoModelForContextAdaptation.from_pretrained(folder, base_model=base)
    for key, value in new.method_state_dict().items():
        assert torch.equal(loaded.method_state_dict()[key], value)
    # and fewer shards over more: the shards of the first save go
    old.save_pretrained(folder, max_shard_size=30_000)
    many = {p for p in os.listdir(folder) if p.startswith("model-")}
    new.save_pretrained(folder, max_shard_size=70_000)
    few = {p for p in os.listdir(folder) if p.startswith("model-")}
    assert len(few) < len(many) and all(name.endswith(f"-of-{len(few):05d}.safetensors") for name in few)
    assert beside(folder) == []


def test_files_the_save_does_not_own_stay_as_hard_links(tmp_path, base):
    folder = tmp_path / "run"
    _methods.make_generator(base).save_pretrained(folder)
    (folder / "card_data.json").write_text("{}\n")
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"x" * 1000)
    (folder / "link").symlink_to("checkpoint-2")
    inode = (folder / "checkpoint-2" / "optimizer.pt").stat().st_ino
    _methods.make_generator(base, init_std=0.2).save_pretrained(folder)
    assert (folder / "card_data.json").read_text() == "{}\n"
    assert (folder / "checkpoint-2" / "optimizer.pt").stat().st_ino == inode  # linked, not copied
    assert os.readlink(folder / "link") == "checkpoint-2"
    assert beside(folder) == []


# --------------------------------------------------------------------------------- leftovers and recovery
def test_the_next_save_removes_leftovers_of_killed_saves_only(tmp_path):
    folder = tmp_path / "a"
    ContextAdapter.random(SHAPES, seed=0).save_pretrained(folder)
    killed = tmp_path / f".a.tmp-{dead_pid()}-abcd1234"
    killed.mkdir()
    (killed / "adapter.safetensors").write_bytes(b"half")
    legacy = tmp_path / ".a.tmp-x1y2z3w4"  # an older ctx2param's name, without a process id
    legacy.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f".a.tmp-{sleeper.pid}-abcd1234"  # a save still running elsewhere
        running.mkdir()
        other = tmp_path / f".b.tmp-{dead_pid()}-abcd1234"  # a leftover of another folder
        other.mkdir()
        ContextAdapter.random(SHAPES, seed=1).save_pretrained(folder)
        assert beside(folder) == sorted([running.name, other.name])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert file_utils.cleanup_interrupted_saves(folder) == [running.name]


def test_without_an_atomic_exchange_the_two_rename_fallback_recovers(tmp_path, monkeypatch):
    monkeypatch.setattr(file_utils, "_exchange_function", lambda: None)
    folder = tmp_path / "a"
    first, second = ContextAdapter.random(SHAPES, seed=0), ContextAdapter.random(SHAPES, rank=3, seed=1)
    first.save_pretrained(folder)
    second.save_pretrained(folder)
    assert ContextAdapter.from_pretrained(folder).rank == 3 and beside(folder) == []
    # a save killed between its two renames: no folder, the complete old version under the .old name
    os.rename(folder, tmp_path / f".a.old-{dead_pid()}-abcd1234")
    assert not folder.exists()
    assert file_utils.cleanup_interrupted_saves(folder) == []
    assert ContextAdapter.from_pretrained(folder).rank == 3 and beside(folder) == []
    os.rename(folder, tmp_path / f".a.old-{dead_pid()}-abcd1234")
    first.save_pretrained(folder)  # the next save restores it first, then replaces it
    assert ContextAdapter.from_pretrained(folder).rank == first.rank and beside(folder) == []


def test_saving_into_the_working_folder_or_through_a_symlink(tmp_path, monkeypatch):
    real = tmp_path / "real"
    ContextAdapter.random(SHAPES, seed=0).save_pretrained(real)
    (tmp_path / "link").symlink_to(real)
    ContextAdapter.random(SHAPES, rank=3, seed=1).save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and ContextAdapter.from_pretrained(real).rank == 3
    monkeypatch.chdir(real)
    ContextAdapter.random(SHAPES, rank=4, seed=2).save_pretrained(".")
    assert Path.cwd() == real and ContextAdapter.from_pretrained(".").rank == 4  # the process follows
    assert beside(real) == ["link"]


def test_file_names_must_stay_inside_the_folder(tmp_path):
    for name in ("../x.json", "/tmp/x.json", "sub/x.json", ".."):
        with pytest.raises(ValueError, match="not a plain file name"):
            file_utils.write_folder_atomically(tmp_path / "a", jsons={name: {}})
    assert list(tmp_path.iterdir()) == []
