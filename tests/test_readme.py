"""The README runs as written: every ```python block executes (each on its own, imports included, in an
empty folder, offline, on the CPU, with the bundled SmolLM2), every ``ctx2param`` command of its ```bash
blocks parses and names only models and files that exist offline (``smollm2``, a folder an earlier command
writes, a file an earlier line creates), and no user-facing file cites a document the repository lacks."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import ctx2param
from ctx2param.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Runs each block file given on the command line in a fresh namespace; prints one JSON line per block.
DRIVER = """
import json, runpy, sys, time, traceback
for path in sys.argv[1:]:
    start = time.perf_counter()
    try:
        runpy.run_path(path, run_name="__main__")
        error = None
    except BaseException:
        error = traceback.format_exc()
    print(json.dumps({"block": path, "seconds": round(time.perf_counter() - start, 2), "error": error}))
"""


def blocks(language: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced block of ``language`` in the README."""
    found, lines = [], README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == f"```{language}":
            start, body = i + 1, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            found.append((start + 1, "\n".join(body) + "\n"))
        i += 1
    return found


def test_the_readme_has_python_and_bash_blocks():
    assert len(blocks("python")) >= 2 and len(blocks("bash")) >= 3


@pytest.mark.slow
def test_every_python_block_of_the_readme_runs_offline(tmp_path):
    pytest.importorskip("bitsandbytes")
    paths = []
    for line, code in blocks("python"):
        path = tmp_path / f"readme_line_{line}.py"
        path.write_text(code, encoding="utf-8")
        paths.append(str(path))
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(ctx2param.__file__).parents[1]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there: any download attempt fails
        "OMP_NUM_THREADS": "2",
    }
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, *paths], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(paths)
    failures = [f"{r['block']}:\n{r['error']}" for r in results if r["error"]]
    assert not failures, "\n\n".join(failures)


def commands() -> list[tuple[int, list[str]]]:
    """``(line, argv)`` of every ``ctx2param`` command and every other shell line (as ``["sh", line]``)
    in the README's bash blocks, in order (continuation lines joined, comments dropped)."""
    out = []
    for start, code in blocks("bash"):
        joined = code.replace("\\\n", " ")
        for offset, line in enumerate(joined.splitlines()):
            words = shlex.split(line, comments=True)
            if words:
                out.append((start + offset, words))
    return out


def test_every_readme_command_parses_and_runs_offline_as_written():
    parser = build_parser()
    written: set[str] = set()  # folders and files that earlier lines create
    checked = 0
    for line, words in commands():
        if words[0] == "echo" and ">" in words:
            written.add(words[words.index(">") + 1])
            continue
        if words[0] != "ctx2param":
            continue
        try:
            args, extra = parser.parse_known_args(words[1:])
        except SystemExit as exit_info:
            raise AssertionError(f"README line {line}: {' '.join(words)} does not parse") from exit_info
        assert not extra or getattr(args, "pass_extra_args", False), (line, extra)
        for option in ("base", "model", "init_from"):
            value = getattr(args, option, None)
            if value is not None:
                assert value == "smollm2" or value in written, (
                    f"README line {line}: --{option.replace('_', '-')} {value} is neither smollm2 nor "
                    "written by an earlier command: it would need the Hub"
                )
        for source in getattr(args, "data", None) or []:
            assert source in {"coqa", "boolq", "passages"} or source.startswith("demos-") or source in written
        for name in ("context",):
            for path in getattr(args, name, None) or []:
                assert path in written, (line, path)
        if getattr(args, "adapter", None):
            assert args.adapter in written, (line, args.adapter)
        if getattr(args, "out", None):
            written.add(str(args.out))
        checked += 1
    assert checked >= 6


USER_FACING = [
    "README.md",
    "constraints.txt",
    "pyproject.toml",
    "scripts",
    "src",
    "model_cards",
    "hub_scripts",
]


def test_user_facing_files_cite_only_documents_the_repository_has():
    present = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    missing = []
    for entry in USER_FACING:
        for path in [ROOT / entry] if (ROOT / entry).is_file() else sorted((ROOT / entry).rglob("*")):
            if not path.is_file() or path.suffix in (".pyc", ".png") or "__pycache__" in path.parts:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for name in re.findall(r"\b([A-Z][A-Z0-9_]+\.md)\b", text):
                if name not in present:
                    missing.append(f"{path.relative_to(ROOT)} cites {name}")
    assert not missing, missing
