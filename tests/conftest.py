"""Shared test setup: the local Hub server (first!), torch threads and seeds, and model fixtures.

The local Hub must be installed before anything imports ``huggingface_hub`` or ``transformers``: both read
``HF_ENDPOINT`` and ``HF_HOME`` at import time. So this file imports nothing else before it.
"""

# ruff: noqa: E402  (imports below must come after the Hub server is installed)
from hub_server import install_local_hub

_LOCAL_HUB = install_local_hub()

import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from ctx2param import testing_utils

TORCH_THREADS = 2
SEED = 0

torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(autouse=True)
def _fixed_seeds() -> Iterator[None]:
    """Every test starts from the same Python, NumPy and torch RNG state."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    yield


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the test, restored afterwards. Opt in per module with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``: tiny models gain nothing from a second
    thread, and with the cores shared by other processes two OpenMP threads can be several times slower
    than one (spinning at barriers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def local_hub():
    """The process-wide local Hub server (``tests/hub_server.py``) that ``HF_ENDPOINT`` points at."""
    return _LOCAL_HUB


@pytest.fixture
def tiny_tok():
    """A fresh tiny byte-level BPE tokenizer (512 tokens), see ``testing_utils.tiny_tokenizer``."""
    return testing_utils.tiny_tokenizer()


@pytest.fixture
def tiny_model(request):
    """A tiny random causal LM (fp32, eval mode) whose vocabulary matches ``tiny_tok``.

    Defaults to llama; choose others by indirect parametrization::

        @pytest.mark.parametrize("tiny_model", ["llama", "gpt2"], indirect=True)
        def test_x(tiny_model): ...
    """
    arch = getattr(request, "param", "llama")
    return testing_utils.tiny_model(arch, seed=SEED)


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the real SmolLM2-135M-Instruct in fp32, shared by the whole session.

    Do not modify its weights in place (use ``apply_adapter`` / ``attach_adapter`` and undo them); tests that
    use it should be marked ``slow``.
    """
    return testing_utils.load_smollm2(dtype=torch.float32)
