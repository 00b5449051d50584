"""``ctx2param.environment``: the one reader of library versions and hardware (reports, benchmarks, cards)."""

from __future__ import annotations

import types
from importlib import metadata

import torch

import ctx2param
from ctx2param import environment
from ctx2param.cards import framework_versions
from ctx2param.environment import hardware_info, library_versions


def test_library_versions_name_each_package_and_none_for_a_missing_one():
    versions = library_versions(("torch", "no-such-distribution-c2p"))
    assert versions["python"].count(".") == 2
    assert versions["torch"] == metadata.version("torch")
    assert versions["no-such-distribution-c2p"] is None


def test_ctx2param_from_a_source_tree_reports_its_version(monkeypatch):
    real = metadata.version

    def not_installed(name: str) -> str:
        if name == "ctx2param":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(environment.metadata, "version", not_installed)
    assert library_versions(("ctx2param",))["ctx2param"] == ctx2param.__version__
    assert framework_versions()["ctx2param"] == ctx2param.__version__  # the card's record, too


def test_cards_record_only_installed_packages(monkeypatch):
    monkeypatch.setattr("ctx2param.cards.DEFAULT_PACKAGES", ("torch", "no-such-distribution-c2p"))
    assert set(framework_versions()) == {"python", "torch"}


def test_hardware_on_the_cpu():
    info = hardware_info("cpu")
    assert info["cpu_model"] and info["cpu_count"] >= 1 and info["torch_threads"] == torch.get_num_threads()
    assert not {"gpu", "gpu_count", "gpu_memory_gb", "cuda"} & set(info)


def test_hardware_on_a_gpu(monkeypatch):
    """A CUDA device adds the GPU's name and count, and with details its memory and the CUDA version."""
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "device_count", lambda: 2)
    monkeypatch.setattr(cuda, "get_device_name", lambda index=None: f"Fake GPU {index}")
    monkeypatch.setattr(
        cuda, "get_device_properties", lambda index=None: types.SimpleNamespace(total_memory=80 * 1024**3)
    )
    info = hardware_info("cuda:1")
    assert (info["gpu"], info["gpu_count"], info["gpu_memory_gb"]) == ("Fake GPU cuda:1", 2, 80.0)
    assert "cuda" in info
    brief = hardware_info(gpu_details=False)  # no device: CUDA when available
    assert brief["gpu"] == "Fake GPU 0" and "gpu_memory_gb" not in brief
    assert "gpu" not in hardware_info("cpu")
