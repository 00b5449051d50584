"""The command line for a newcomer offline: one-line errors that say what to do (no network for ``push``,
``HF_HUB_OFFLINE=1`` for ``eval``, a base model given as a generator, a text file given as an adapter, bad
``--data`` / ``--systems`` / ``--out`` before any model loads), progress on long steps, the ``smollm2`` name
for the bundled model wherever a model goes; bitsandbytes' ``kernels`` line kept from users; ``adapter.py``
and ``cards.py`` do not import each other."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _methods
import ctx2param
from ctx2param.cli import main
from ctx2param.testing_utils import TARGET_MODULES

_methods.register()
SRC = Path(ctx2param.__file__).parent


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return _methods.save_tiny_base(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="module")
def gen_dir(base_dir, tmp_path_factory) -> Path:
    return Path(_methods.make_generator(str(base_dir)).save_pretrained(tmp_path_factory.mktemp("gen") / "g"))


@pytest.fixture(scope="module")
def compas_dir(base_dir, tmp_path_factory) -> Path:
    from ctx2param.models.compas import CompAsConfig, CompAsModel

    torch.manual_seed(0)
    config = CompAsConfig(
        target_modules=TARGET_MODULES["llama"], latent_dim=32, num_attention_heads=2, rank=4,
        decoder_hidden=32, chunk_tokens=24, decoder_max_tokens=6,
    )  # fmt: skip
    model = CompAsModel.from_base(str(base_dir), config)
    return Path(model.save_pretrained(tmp_path_factory.mktemp("compas") / "c"))


def one_line_error(capsys, argv, *fragments) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.strip().splitlines()  # (a library's progress bars may come before it)
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err  # the error: the last line, whole
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[-1], err
    return lines[-1]


# -------------------------------------------------------------------------------------------- offline
@pytest.fixture
def no_network(monkeypatch):
    """The Hub endpoint is a port nobody listens on: every request is refused at once."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


def test_push_without_a_network_is_one_line(capsys, gen_dir, tmp_path, no_network):
    one_line_error(
        capsys, ["push", gen_dir, "org/x"], "Cannot publish 'org/x'", "cannot be reached", "127.0.0.1:9"
    )
    adapter = ctx2param.ContextAdapter.random({"model.layers.0.mlp.down_proj": (64, 128)}, base_model="org/b")
    one_line_error(capsys, ["push", adapter.save_pretrained(tmp_path / "a"), "org/y"], "cannot be reached")


def test_any_unreachable_hub_is_one_line(capsys, tmp_path, no_network, monkeypatch):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        from httpx2 import ConnectError

        raise ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    one_line_error(
        capsys, ["info", "org/some-repo"], "Hub at http://127.0.0.1:9 cannot be reached", "HF_HUB_OFFLINE"
    )


def test_eval_offline_says_what_to_do(capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    line = one_line_error(
        capsys,
        ["eval", "--model", "org/not-cached-anywhere", "--task", "squad-k", "--out", tmp_path / "o"],
        "'org/not-cached-anywhere'", "HF_HUB_OFFLINE=1", "smollm2",
    )  # fmt: skip
    assert "couldn't connect" not in line


# ---------------------------------------------------------------------------------- what a folder is
def test_info_and_adapt_say_a_base_model_is_not_a_generator(capsys, base_dir, tmp_path):
    assert main(["info", str(base_dir)]) == 0
    out = capsys.readouterr().out
    assert (
        "base model (a plain causal LM, not a ctx2param generator)" in out
        and "llama (LlamaForCausalLM)" in out
    )
    assert main(["info", str(base_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "base model"
    context = tmp_path / "c.txt"
    context.write_text("The secret password is Marigold.")
    one_line_error(
        capsys, ["adapt", "--model", base_dir, "-c", context, "-o", tmp_path / "a"],
        "holds a plain 'llama' model (a base causal LM), not a ctx2param generator", "--base",
    )  # fmt: skip


def test_decode_says_a_text_file_is_not_an_adapter_folder(capsys, gen_dir, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    one_line_error(
        capsys, ["decode", text, "--model", tmp_path / "no-model"], "is a file, not an adapter folder"
    )
    saved = ctx2param.ContextAdapter.random({"model.layers.0.mlp.down_proj": (64, 128)}).save_pretrained(
        tmp_path / "adapter"
    )
    one_line_error(
        capsys, ["decode", saved / "adapter.safetensors", "--model", gen_dir], f"pass its folder, {saved}"
    )


# --------------------------------------------------------------------- arguments checked before loading
def test_data_and_out_are_checked_before_any_model_loads(capsys, tmp_path):
    missing_base = tmp_path / "no-such-base"  # loading it would fail: the errors below come first
    train = ["train", "compas", "--base", missing_base, "--out", tmp_path / "run"]
    one_line_error(capsys, [*train, "--data", tmp_path / "missing.jsonl"], "missing.jsonl' is neither a file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"contexts": ["a"], "query": "q", "answer": "a"}\n{"unknown": 1}\n')
    one_line_error(capsys, [*train, "--data", bad], "bad.jsonl:2: missing key(s)")
    one_line_error(capsys, [*train, "--data", "coqa", "--eval-data", tmp_path], "is a folder")
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("x")
    one_line_error(
        capsys,
        ["eval", "--model", missing_base, "--task", "squad-k", "--out", tmp_path / "file"],
        "is a file",
    )
    one_line_error(
        capsys,
        [
            "eval",
            "--model",
            missing_base,
            "--task",
            "squad-k",
            "--systems",
            "closed,oracle",
            "--out",
            tmp_path,
        ],
        "Unknown system(s) ['oracle']",
    )


# ------------------------------------------------------------------------------------------- progress
def test_loading_and_decoding_show_progress(capsys, compas_dir, tmp_path, monkeypatch):
    from ctx2param import AutoModelForContextAdaptation

    model = AutoModelForContextAdaptation.from_pretrained(compas_dir)
    folder = (
        model.generate_adapter("The secret password is Marigold.").detach().save_pretrained(tmp_path / "a")
    )
    monkeypatch.setenv("CTX2PARAM_PROGRESS", "1")  # as on a terminal
    assert main(["decode", str(folder), "--model", str(compas_dir), "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert f"loading the generator {compas_dir}" in err and "loaded in" in err
    assert "decoding" in err and "5/5" in err  # a bar over the generated tokens
    assert out.strip() == model.decode_context(
        ctx2param.ContextAdapter.from_pretrained(folder), max_new_tokens=5
    )
    monkeypatch.setenv("CTX2PARAM_PROGRESS", "0")  # as when piped: no progress of ours
    assert main(["decode", str(folder), "--model", str(compas_dir), "--max-new-tokens", "5"]) == 0
    err = capsys.readouterr().err
    assert "loading the generator" not in err and "decoding" not in err


# ------------------------------------------------------------------------------------ the smollm2 name
def test_resolve_model_name_leaves_other_names_alone(tmp_path, monkeypatch):
    from ctx2param.testing_utils import resolve_model_name

    assert resolve_model_name(None) is None
    assert resolve_model_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()  # a folder of that name wins
    assert resolve_model_name("smollm2") == "smollm2"


@pytest.mark.slow
def test_smollm2_is_accepted_wherever_a_model_goes(capsys, gen_dir, tmp_path):
    from ctx2param.testing_utils import resolve_model_name, smollm2_path

    path = str(smollm2_path())
    assert resolve_model_name("smollm2") == resolve_model_name("SmolLM2") == path
    assert main(["info", "smollm2"]) == 0
    assert "base model" in capsys.readouterr().out
    # --model of eval: the bundled model evaluated as a plain causal LM
    assert main(["eval", "--model", "smollm2", "--task", "squad-k", "--n", "1", "--systems", "closed",
                 "--max-new-tokens", "4", "--no-progress", "--out", str(tmp_path / "e")]) == 0  # fmt: skip
    capsys.readouterr()
    assert json.loads((tmp_path / "e" / "results.json").read_text())["model"]["name"] == path
    context = tmp_path / "c.txt"
    context.write_text("The secret password is Marigold.")
    # --base of adapt / decode (the tiny generator does not fit it: the error shows SmolLM2 was loaded)
    adapt = ["adapt", "-c", context, "-o", tmp_path / "a"]
    one_line_error(
        capsys, [*adapt, "--model", gen_dir, "--base", "smollm2"], f"The base model {path!r} does not"
    )
    # --model of adapt, and --init-from of train: a base model, not a generator
    one_line_error(capsys, [*adapt, "--model", "smollm2"], "plain 'llama'")
    train = ["train", "compas", "--init-from", "smollm2", "--data", "coqa", "--out", tmp_path / "t"]
    one_line_error(capsys, train, "plain 'llama'")
    # --model of `ctx2param data questions / responses` (here the tokenizer-only path of --answers gold)
    import argparse

    from ctx2param.commands import data

    assert data._tokenizer_only(argparse.Namespace(model="smollm2", revision=None)).name == path


# ---------------------------------------------------------------------------------- point 7: imports
def test_the_bitsandbytes_kernels_line_is_not_shown(caplog):
    pytest.importorskip("bitsandbytes")
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(  # the record bitsandbytes' CPU backend logs at import without `kernels`
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1",
            ModuleNotFoundError("No module named 'kernels'"),
        )
        logger.warning("a real bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes warning"]
    # and a fresh process that imports ctx2param, then bitsandbytes, prints nothing about it
    proc = subprocess.run(
        [sys.executable, "-c", "import ctx2param, bitsandbytes"], capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(SRC.parent), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "kernels" not in proc.stderr, proc.stderr


def _imports(path: Path) -> set[str]:
    """Every module an ``import`` in ``path`` names, at any level (functions included), made absolute."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ("ctx2param." if node.level else "") + (node.module or "")
            names.add(base.rstrip("."))
            names |= {f"{base}.{alias.name}".replace("..", ".") for alias in node.names if not node.module}
    return names


def test_adapter_and_cards_do_not_import_each_other():
    adapter_imports = _imports(SRC / "adapter.py")
    assert not any(name.endswith("cards") for name in adapter_imports), adapter_imports
    assert "ctx2param.adapter" in _imports(SRC / "cards.py")  # the one direction: cards reads adapters
    # and the adapter still publishes its card (rendered through the hook cards.py registers)
    from ctx2param import adapter as adapter_module
    from ctx2param.cards import render_adapter_card

    assert adapter_module._CARD_RENDERER is render_adapter_card
