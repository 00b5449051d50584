"""CompAs on the real SmolLM2-135M-Instruct (CPU): the generator's size, and a few steps that cut the
student-teacher alignment loss on a small fixed batch."""

from __future__ import annotations

import pytest
import torch

from ctx2param.models.compas import CompAsConfig, CompAsModel
from ctx2param.training.data import TrainingExample

pytestmark = pytest.mark.slow

# Facts the student cannot know without the context; short chunks keep a step around a second on 2 cores.
EXAMPLES = [
    TrainingExample(("The secret password is Marigold.",), "What is the secret password?", "Marigold"),
    TrainingExample(
        ("Tom's meeting with the dentist is on Thursday at ten.", "The shop sells red apples."),
        "When is Tom's meeting?",
        "Thursday at ten",
    ),
    TrainingExample(
        ("The capital of the island of Varnia is Oskel.",), "What is the capital of Varnia?", "Oskel"
    ),
    TrainingExample(
        ("Lena keeps her keys in the blue box.",), "Where does Lena keep her keys?", "In the blue box"
    ),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_generator_and_decoder_fit_in_15m_parameters(smollm2, tmp_path, capsys):
    base, tokenizer = smollm2
    model = CompAsModel.from_base(base, CompAsConfig(), tokenizer=tokenizer)
    cfg = base.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert len(model.config.target_shapes) == 30 * 7  # q, k, v, o, gate, up, down in every layer
    assert len(model.layout.kinds) == 7 and len(model.layout.layers) == 30
    parts = model.parameter_breakdown()
    assert model.num_method_parameters() == parts["total"] == parts["generator"] + parts["decoder"]
    assert parts["total"] <= 15_000_000, parts
    assert model.num_method_parameters(trainable_only=True) == parts["total"]
    # at initialisation ΔW is small next to the weights (a few percent in Frobenius norm), but not zero
    adapter = model.generate_adapter("The secret password is Marigold.")
    assert adapter.rank == 16
    modules = dict(base.named_modules())
    ratios = [float(adapter.delta_weight(n).norm() / modules[n].weight.norm()) for n in adapter]
    assert 0 < max(ratios) < 0.05, max(ratios)
    # `ctx2param info` on the saved generator shows the same count (and reads no base weights)
    from ctx2param.cli import main
    from ctx2param.commands.info import describe

    model.save_pretrained(tmp_path / "compas")
    assert describe(str(tmp_path / "compas"))["num_parameters"] == parts["total"]
    assert main(["info", str(tmp_path / "compas")]) == 0
    assert f"{parts['total']:,}" in capsys.readouterr().out


def test_alignment_loss_falls_on_a_fixed_batch(smollm2):
    base, tokenizer = smollm2
    torch.manual_seed(0)
    config = CompAsConfig(
        alignment_weight=1.0, ce_weight=0.0, additivity_weight=0.0, reconstruction_weight=0.0
    )
    model = CompAsModel.from_base(base, config, tokenizer=tokenizer)
    batch = model.collate_training_examples(EXAMPLES)
    # lr from a sweep on this batch (seed 0): 3e-4 takes KL from 2.93 to 0.60 in 4 steps and 0.06 in 20
    optimizer = torch.optim.Adam(model.method_parameters(), lr=3e-4)
    values = []
    for _ in range(5):
        losses = model.training_losses(batch)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        values.append(losses["alignment"].item())
    assert all(p.grad is None for p in base.parameters())
    assert min(values[-2:]) <= 0.9 * values[0], values
