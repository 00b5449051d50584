"""The demo's pieces on a tiny model (the full demo on SmolLM2 is run by `bash scripts/run.sh demo`)."""

from __future__ import annotations

import pytest
import torch

from ctx2param import ContextAdapter, apply_adapter
from ctx2param.demo import ANCHOR, FACTS, _per_row_loss, _table, _training_batch, answer, fit_adapter, main
from ctx2param.demo import peft_roundtrip as demo_peft_roundtrip


def test_training_batch_masks_prompts_and_padding(tiny_tok) -> None:
    input_ids, mask, labels = _training_batch(tiny_tok, FACTS[0])
    assert input_ids.shape == mask.shape == labels.shape and input_ids.shape[0] == 2
    for row, answer_text in enumerate((FACTS[0].statement, ANCHOR[1])):
        kept = labels[row][labels[row] != -100]
        assert tiny_tok.decode(kept) == answer_text + tiny_tok.eos_token
        # labels are the input ids where a loss is taken, and no loss is taken on padding
        taken = labels[row] != -100
        assert torch.equal(labels[row][taken], input_ids[row][taken])
        assert not (taken & (mask[row] == 0)).any()


def test_per_row_loss_matches_cross_entropy() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 1, 2, 3, 4], [-100, -100, 5, 6, -100]])
    got = _per_row_loss(logits, labels)
    for r in range(2):
        want = torch.nn.functional.cross_entropy(logits[r, :-1], labels[r, 1:], ignore_index=-100)
        torch.testing.assert_close(got[r], want)


def test_fit_adapter_learns_the_fact_on_a_tiny_model(tiny_model, tiny_tok) -> None:
    tiny_model.requires_grad_(False)
    input_ids, mask, labels = _training_batch(tiny_tok, FACTS[1])
    with torch.no_grad():
        before = float(_per_row_loss(tiny_model(input_ids=input_ids, attention_mask=mask).logits, labels)[0])
    adapter, taken, after = fit_adapter(
        tiny_model, tiny_tok, FACTS[1], steps=25, lr=2e-2, rank=4, stop_loss=0.0, progress=False
    )
    assert taken == 25
    # a random tiny model's tied embeddings cap how far the loss can fall (its floor is near log 512)
    assert after < before - 0.5, (before, after)
    assert adapter.rank == 4 and adapter.metadata["context"] == FACTS[1].statement
    assert all(not f.A.requires_grad and not f.B.requires_grad for f in adapter.values())
    assert not any(p.requires_grad for p in tiny_model.parameters())
    with torch.no_grad(), apply_adapter(tiny_model, adapter):
        adapted = float(_per_row_loss(tiny_model(input_ids=input_ids, attention_mask=mask).logits, labels)[0])
    assert adapted == pytest.approx(after, rel=0.2, abs=0.05)


def test_answer_and_peft_roundtrip_on_tiny_model(tiny_model, tiny_tok, tmp_path) -> None:
    adapter = ContextAdapter.random(tiny_model, rank=2, target_modules=("q_proj", "down_proj"), std=0.2)
    text = answer(tiny_model, tiny_tok, "What is the secret password?", adapter, max_new_tokens=4)
    assert isinstance(text, str)
    diff, files = demo_peft_roundtrip(tiny_model, tiny_tok, adapter + adapter, tmp_path / "peft")
    assert diff < 1e-5
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    assert not any("lora" in name for name, _ in tiny_model.named_modules())  # PEFT layers unloaded


def test_table_layout() -> None:
    table = _table([["a", "xyz"], ["bb", "q"]], ["h1", "header2"])
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[1] == "| h1 | header2 |"


def test_main_rejects_bad_arguments(capsys) -> None:
    with pytest.raises(SystemExit) as err:
        main(["--steps", "0"])
    assert err.value.code == 2
    assert "--steps and --rank must be at least 1" in capsys.readouterr().err
