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
    assert len(model.config.target_shapes) == 30  # the recipe's choice: down_proj of every layer
    assert model.layout.kinds == ("mlp.down_proj",) and len(model.layout.layers) == 30
    parts = model.parameter_breakdown()
    assert model.num_method_parameters() == parts["total"] == parts["generator"] + parts["decoder"]
    assert parts["total"] <= 15_000_000, parts
    assert model.num_method_parameters(trainable_only=True) == parts["total"]
    # at initialisation ΔW is zero for every passage (the output scale starts at zero) ...
    adapter = model.generate_adapter("The secret password is Marigold.")
    assert adapter.rank == 8 and all(torch.count_nonzero(adapter.delta_weight(n)) == 0 for n in adapter)
    # ... and once the scale moves, small next to the weights (a few percent in Frobenius norm)
    with torch.no_grad():
        model.generator.output_scale.fill_(0.01)
    adapter = model.generate_adapter("The secret password is Marigold.")
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
        alignment_weight=1.0,
        ce_weight=0.0,
        additivity_weight=0.0,
        reconstruction_weight=0.0,
        output_gain=10.0,
    )
    model = CompAsModel.from_base(base, config, tokenizer=tokenizer)
    batch = model.collate_training_examples(EXAMPLES)
    # from a sweep on this batch (seed 0, 10 Adam steps; ΔW starts at zero): KL 2.94 -> 0.43 with lr 1e-3 and
    # output_gain 10, -> 2.10 with gain 1 (the output scale then grows ten times slower)
    optimizer = torch.optim.Adam(model.method_parameters(), lr=1e-3)
    values = []
    for _ in range(6):
        losses = model.training_losses(batch)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        values.append(losses["alignment"].item())
    assert all(p.grad is None for p in base.parameters())
    assert min(values[-2:]) <= 0.75 * values[0], values
