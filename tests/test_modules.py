"""ctx2param.modules' config readers on the tiny architectures: the text config, integer fields and the
context window (``max_position_embeddings``, or GPT-2's ``n_positions``)."""

from __future__ import annotations

import pytest
from torch import nn

from ctx2param.modules import config_int, context_window, text_config
from ctx2param.testing_utils import tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2"])
def test_context_window_and_layers_come_from_the_config(arch):
    model = tiny_model(arch)
    cfg = model.config
    expected = cfg.n_positions if arch == "gpt2" else cfg.max_position_embeddings
    assert text_config(model) is cfg.get_text_config()
    assert context_window(model) == expected > 0
    assert config_int(model, ("num_hidden_layers", "n_layer")) == cfg.num_hidden_layers


def test_missing_or_non_positive_values_are_none():
    assert text_config(nn.Linear(2, 2)) is None and context_window(nn.Linear(2, 2)) is None
    model = tiny_model("llama")
    model.config.max_position_embeddings = 0
    assert context_window(model) is None  # a window must be positive
    assert config_int(model, ("max_position_embeddings",)) == 0  # unless positive=True is asked for
    assert config_int(model, ("no_such_field",)) is None
