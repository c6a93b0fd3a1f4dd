"""A Canvas-mini pretraining stopped and resumed ends bit for bit where an uninterrupted one ends (tiny UNet)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from cuig_lightning.canvas_mini import model as cm
from cuig_lightning.canvas_mini import pretrain as P

TINY = dict(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2, norm_num_groups=4)  # fmt: skip
SETTINGS = dict(steps=6, batch_size=2, warmup=2, checkpoint_every=3, bf16=False, progress=False, unet_overrides=TINY)


@pytest.fixture(autouse=True)
def fake_text_states(monkeypatch):
    """Random text states of the right shapes instead of running MiniLM (the math under test is the loop's)."""
    g = torch.Generator().manual_seed(0)
    states = torch.randn(len(cm.all_captions()), 77, cm.TEXT_HIDDEN_SIZE, generator=g)
    uncond = torch.randn(1, 77, cm.TEXT_HIDDEN_SIZE, generator=g)
    monkeypatch.setattr(cm, "caption_embeddings", lambda *a, **k: (states.clone(), uncond.clone()))


def final_weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


def last_logged_loss(out) -> float:
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [rec for rec in lines if "loss" in rec][-1]["loss"]


def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    report_a = P.pretrain(a, **SETTINGS)
    stopped = P.pretrain(b, stop_after=3, **SETTINGS)
    assert stopped["stopped_after"] == 3 and not (b / "unet").exists()
    assert json.loads((b / P.STATE / "manifest.json").read_text())["step"] == 3
    report_b = P.pretrain(b, **SETTINGS)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert last_logged_loss(a) == last_logged_loss(b)
    assert report_a["final_loss"] == report_b["final_loss"]
    assert report_b["train_seconds"] >= stopped["train_seconds"]
    assert json.loads((b / P.STATE / "manifest.json").read_text())["step"] == 6
    again = P.pretrain(b, **SETTINGS)  # complete: the saved report, nothing trained
    assert again == json.loads((b / "pretrain_report.json").read_text())


def test_resume_with_other_settings_is_refused(tmp_path):
    P.pretrain(tmp_path, stop_after=1, **SETTINGS)
    with pytest.raises(ValueError, match=r"\(lr\)") as err:
        P.pretrain(tmp_path, **{**SETTINGS, "lr": 2e-3})
    assert "another out_dir" in str(err.value) and "\n" not in str(err.value)
    P.pretrain(tmp_path, stop_after=2, **{**SETTINGS, "lr": 2e-3}, resume=False)  # afresh: allowed


def test_corrupt_state_is_a_one_line_error(tmp_path):
    P.pretrain(tmp_path, stop_after=1, **SETTINGS)
    tensors = tmp_path / P.STATE / P.STATE_TENSORS
    tensors.write_bytes(tensors.read_bytes()[:100])  # truncated
    with pytest.raises(RuntimeError, match=re.escape(str(tensors))) as err:
        P.pretrain(tmp_path, **SETTINGS)
    assert "\n" not in str(err.value)


def test_a_save_cut_between_its_renames_is_recovered(tmp_path):
    P.pretrain(tmp_path, stop_after=1, **SETTINGS)
    (tmp_path / P.STATE).rename(tmp_path / f"{P.STATE}.old")
    P.pretrain(tmp_path, **SETTINGS)
    assert json.loads((tmp_path / P.STATE / "manifest.json").read_text())["step"] == 6
    assert not (tmp_path / f"{P.STATE}.old").exists()
