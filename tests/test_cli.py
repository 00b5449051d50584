"""The ``ctx2param`` command: subcommand discovery, ``info``, ``adapt``, ``push``, ``demo``, and clear errors
with exit status 1 (no traceback) for bad input. Runs ``ctx2param.cli.main`` in-process (the tests' method is
registered here; the local Hub serves Hub ids) and the real ``python -m ctx2param`` once."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

try:
    import _methods
except ModuleNotFoundError as _err:  # tests/ imported as a package
    if _err.name != "_methods":
        raise
    from tests import _methods

from ctx2param import ContextAdapter, compose, testing_utils
from ctx2param import commands as commands_pkg
from ctx2param.cli import build_parser, command_modules, main

TEXTS = ["The secret password is Marigold.", "Paris is the capital of France; the meeting is on Thursday."]
_COUNTER = itertools.count()

_methods.register()


def _repo(name: str) -> str:
    return f"org/{name}-{next(_COUNTER)}"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _methods.save_tiny_base(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="module")
def generator(base_dir: Path) -> _methods.MeanPoolModel:
    return _methods.make_generator(str(base_dir))


@pytest.fixture(scope="module")
def gen_dir(generator, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(generator.save_pretrained(tmp_path_factory.mktemp("gen") / "generator"))


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("contexts")
    paths = []
    for i, text in enumerate(TEXTS):
        paths.append(folder / f"context{i}.txt")
        paths[-1].write_text(text, encoding="utf-8")
    return paths


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


# ----------------------------------------------------------------------------------------------- discovery
def test_command_line_entry_point_runs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ctx2param", "info", str(tmp_path / "missing-folder")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "missing-folder" in proc.stderr


def test_help_lists_the_discovered_commands(capsys) -> None:
    assert {"adapt", "demo", "info", "push"} <= set(command_modules())
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in command_modules():
        assert name in out
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2
    assert main([]) == 2  # no command: usage on stderr
    assert "usage:" in capsys.readouterr().err


def test_new_command_modules_are_discovered(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "hello.py").write_text(
        "def register(subparsers):\n"
        "    p = subparsers.add_parser('hello', help='say hello')\n"
        "    p.add_argument('name')\n"
        "    p.set_defaults(func=lambda args: print('hello ' + args.name))\n"
    )
    (tmp_path / "broken.py").write_text("import a_package_that_does_not_exist_anywhere\n")
    (tmp_path / "noregister.py").write_text("X = 1\n")
    monkeypatch.setattr(commands_pkg, "__path__", [*commands_pkg.__path__, str(tmp_path)])
    for name in ("hello", "broken", "noregister"):
        monkeypatch.delitem(sys.modules, f"ctx2param.commands.{name}", raising=False)
    assert {"hello", "broken", "noregister", "info"} <= set(command_modules())
    assert run_cli(capsys, "hello", "world") == (0, "hello world\n", "")
    code, _, err = run_cli(capsys, "broken")  # one broken module does not take the others down
    assert_user_error(code, err, "'broken' could not be loaded", "a_package_that_does_not_exist_anywhere")
    code, _, err = run_cli(capsys, "noregister")
    assert_user_error(code, err, "could not be loaded", "register")
    assert "info" in build_parser().format_help()


def test_import_option(capsys, gen_dir: Path) -> None:
    code, _, err = run_cli(capsys, "--import", "no_such_plugin_module_xyz", "info", gen_dir)
    assert_user_error(code, err, "--import no_such_plugin_module_xyz")
    code, out, _ = run_cli(capsys, "--import", "json", "info", gen_dir)
    assert code == 0 and "test_meanpool" in out


def test_debug_shows_the_traceback(capsys, tmp_path: Path) -> None:
    with pytest.raises(OSError):
        main(
            ["--debug", "adapt", "--model", str(tmp_path), "--context", str(tmp_path / "nope.txt"), "-o", "x"]
        )


# --------------------------------------------------------------------------------------------------- info
def test_info_on_a_generator_folder_and_repo(capsys, generator, gen_dir: Path, local_hub) -> None:
    code, out, _ = run_cli(capsys, "info", gen_dir)
    assert code == 0
    assert "ctx2param generator" in out and "test_meanpool [ctx2param_test_meanpool]" in out
    assert f"{generator.num_method_parameters():,}" in out and "14 layers" in out and "MB" in out
    code, out, _ = run_cli(capsys, "info", gen_dir, "--json")
    info = json.loads(out)
    assert info["num_parameters"] == generator.num_method_parameters()
    assert info["rank"] == 2 and info["base_model"] == generator.config.base_model_name_or_path
    assert info["size_bytes"] == (gen_dir / "model.safetensors").stat().st_size
    assert info["registered"] is True and info["base_weights_included"] is False
    repo = _repo("info-generator")
    local_hub.add_files(repo, {p.name: p for p in gen_dir.iterdir()})
    code, out, _ = run_cli(capsys, "info", repo, "--json")
    assert code == 0 and json.loads(out)["num_parameters"] == generator.num_method_parameters()


def test_info_on_adapter_folders(capsys, generator, base_dir: Path, tmp_path: Path) -> None:
    adapter = generator.generate_adapter(TEXTS[0]).detach()
    own = adapter.save_pretrained(tmp_path / "own")
    code, out, _ = run_cli(capsys, "info", own, "--json")
    info = json.loads(out)
    assert code == 0 and info["kind"] == "adapter" and info["format"] == "ctx2param"
    assert (
        info["num_modules"] == 14 and info["rank"] == 2 and info["num_parameters"] == adapter.num_parameters()
    )
    # a LoRA saved by PEFT itself
    model = get_peft_model(
        testing_utils.tiny_model("llama"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "peft")
    code, out, _ = run_cli(capsys, "info", tmp_path / "peft")
    assert code == 0
    assert "adapter (peft format)" in out and "4 (q_proj, v_proj)" in out and "rank:" in out
    # r (d_in + d_out) summed over 2 layers x (q: 64 -> 64, v: 64 -> 32)
    assert f"{2 * (4 * (64 + 64) + 4 * (64 + 32)):,}" in out


def test_info_errors(capsys, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "info", tmp_path / "empty")
    assert_user_error(code, err, "neither a ctx2param generator")
    (tmp_path / "file.txt").write_text("x")
    code, _, err = run_cli(capsys, "info", tmp_path / "file.txt")
    assert_user_error(code, err, "is a file")
    code, _, err = run_cli(capsys, "info", "org/no-such-repo-anywhere")
    assert_user_error(code, err, "No repository 'org/no-such-repo-anywhere'")


# -------------------------------------------------------------------------------------------------- adapt
@pytest.mark.parametrize("fmt", ["ctx2param", "peft"])
def test_adapt_composes_the_contexts(capsys, generator, gen_dir: Path, contexts, tmp_path: Path, fmt) -> None:
    out_dir = tmp_path / "adapter"
    code, out, err = run_cli(
        capsys, "adapt", "--model", gen_dir, "--context", *contexts, "--weights", "1.0", "0.5",
        "--out", out_dir, "--format", fmt, "--batch-size", "1",
    )  # fmt: skip
    assert code == 0, err
    assert f"wrote a {fmt} adapter" in out
    saved = ContextAdapter.from_pretrained(out_dir)
    expected = compose([a.detach() for a in generator.generate_adapter(TEXTS)], [1.0, 0.5])
    assert set(saved) == set(expected)
    for name in expected:
        torch.testing.assert_close(
            saved.delta_weight(name), expected.delta_weight(name), atol=1e-6, rtol=1e-5
        )
    if fmt == "ctx2param":
        assert saved.metadata["weights"] == [1.0, 0.5]
        assert saved.metadata["contexts"] == ["context0.txt", "context1.txt"]
    else:
        assert (out_dir / "adapter_config.json").is_file()


def test_adapt_compress_and_stdin(capsys, generator, gen_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(TEXTS[1]))
    code, _, err = run_cli(capsys, "adapt", "-m", gen_dir, "-c", "-", "--compress", "1", "-o", tmp_path / "a")
    assert code == 0, err
    saved = ContextAdapter.from_pretrained(tmp_path / "a")
    assert saved.rank == 1
    expected = generator.generate_adapter(TEXTS[1]).detach().compress(1)
    name = next(iter(expected))
    torch.testing.assert_close(saved.delta_weight(name), expected.delta_weight(name), atol=1e-5, rtol=1e-4)


def test_adapt_bad_input(capsys, gen_dir: Path, contexts, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    code, _, err = run_cli(capsys, "adapt", "-m", gen_dir, "-c", tmp_path / "nope.txt", "-o", out_dir)
    assert_user_error(code, err, "nope.txt does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = run_cli(capsys, "adapt", "-m", gen_dir, "-c", empty, "-o", out_dir)
    assert_user_error(code, err, "empty")
    code, _, err = run_cli(capsys, "adapt", "-m", gen_dir, "-c", *contexts, "-w", "1", "-o", out_dir)
    assert_user_error(code, err, "--weights has 1 values for 2 context files")
    code, _, err = run_cli(capsys, "adapt", "-m", tmp_path / "no-model", "-c", contexts[0], "-o", out_dir)
    assert_user_error(code, err, "no-model")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "ctx2param_nope"}))
    code, _, err = run_cli(capsys, "adapt", "-m", unknown, "-c", contexts[0], "-o", out_dir)
    assert_user_error(code, err, "ctx2param_nope")
    with _methods.bitsandbytes_missing():
        code, _, err = run_cli(
            capsys, "adapt", "-m", gen_dir, "-c", contexts[0], "-o", out_dir, "--quantize", "4bit"
        )
    assert_user_error(code, err, "bitsandbytes", "pip install")
    assert not out_dir.exists()  # nothing half-written by the failed runs
    with pytest.raises(SystemExit) as exit_info:  # a usage error: argparse, status 2
        main(["adapt", "-m", str(gen_dir), "-o", str(out_dir)])
    assert exit_info.value.code == 2


# --------------------------------------------------------------------------------------------------- push
def test_push_generator_and_adapter_folders(
    capsys, generator, gen_dir: Path, tmp_path: Path, local_hub
) -> None:
    repo = _repo("cli-generator")
    code, out, err = run_cli(capsys, "push", gen_dir, repo, "--private", "--message", "from the CLI")
    assert code == 0, err
    assert repo in out
    files = local_hub.files(repo)
    assert {"config.json", "model.safetensors", "README.md", "card_data.json"} <= set(files)
    assert local_hub.commits(repo)[0]["title"] == "from the CLI"
    adapter_dir = generator.generate_adapter(TEXTS[0]).detach().save_pretrained(tmp_path / "adapter")
    repo = _repo("cli-adapter")
    code, _, err = run_cli(capsys, "push", adapter_dir, repo, "--base-model-id", "org/some-base")
    assert code == 0, err
    files = local_hub.files(repo)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert "base_model:adapter:org/some-base" in files["README.md"].decode()
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "push", tmp_path / "empty", _repo("never"))
    assert_user_error(code, err, "neither a generator")
    code, _, err = run_cli(capsys, "push", tmp_path / "missing", _repo("never"))
    assert_user_error(code, err, "is not a folder")


# --------------------------------------------------------------------------------------------------- demo
def test_demo_runs_ctx2param_demo(capsys, monkeypatch) -> None:
    seen = []
    fake = types.ModuleType("ctx2param.demo")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "ctx2param.demo", fake)
    assert run_cli(capsys, "demo", "--fast", "--model", "x")[0] == 0
    assert seen == [["--fast", "--model", "x"]]
    fake.main = lambda argv: 3
    assert run_cli(capsys, "demo")[0] == 3
    monkeypatch.setitem(sys.modules, "ctx2param.demo", None)  # as if the module were missing
    code, _, err = run_cli(capsys, "demo")
    assert_user_error(code, err, "no demo")
