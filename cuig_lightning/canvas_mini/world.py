"""Canvas-mini's drawn world: 48 styles x 20 objects, plus a neutral (style-less) look.

Every image is 32x32 RGB. Its *style* is the background: a two-colour texture drawn from a small
continuous family (two crossed cosine gratings, thresholded: stripes, checks, dots, grids and all in
between) with a base colour, a pattern colour, an orientation, a period, a cross weight and a
duty. Its *object* is one filled glyph (:mod:`cuig_lightning.canvas_mini.objects`: the 20 UnlearnCanvas objects,
shapes derived from their names' text geometry) in a colour that contrasts with the background, with small random
jitter of position, size, rotation and outline.

Style names are real single-concept names taken from UnlearnCanvas (``Van_Gogh``, ``Byzantine``,
``Winter``...). Each style's look parameters come from the names' text geometry as the UNet sees
it (:mod:`cuig_lightning.canvas_mini.looks` derives them and writes ``looks.json``), so names that
the text encoder finds close look somewhat alike, as real art does, without any one visual
attribute being shared by every similar pair.

A caption without a style ("A Cats image.") shows the *neutral* look: a flat grey background
with a dark object. It is what ConAbl's style anchor prompts render, and the style classifier has a class
for it (:data:`NEUTRAL`). A caption may name a category instead of an object ("A Animals image.", ConAbl's object
anchors): each category has a glyph of its own, near its members' (:data:`GLYPHS`).

Image format: :func:`draw_batch` and :func:`make_dataset` return ``uint8`` arrays ``(N, 32, 32, 3)``;
:func:`to_tensor` turns them into ``float (N, 3, 32, 32)`` in ``[-1, 1]``, :func:`from_tensor` back.
Everything is a pure function of the seed / ``numpy.random.Generator``.
"""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import torch

from cuig_lightning.canvas_mini import objects
from cuig_lightning.requests import NEUTRAL_STYLE

SIZE = 32
_SS = 2  # supersampling factor
_CHUNK = 1024  # images drawn at once (bounds memory)

#: Where the look table lives (written by ``looks.py``, committed).
LOOKS_PATH = Path(__file__).resolve().parent.parent / "assets" / "canvas_mini" / "looks.json"

#: 48 styles (UnlearnCanvas names). Splits (reported / validation targets and retain sets) live in the configs.
STYLES: list[str] = [
    "Abstractionism", "Artist_Sketch", "Blossom_Season", "Blue_Blooming", "Bricks", "Byzantine", "Cartoon",
    "Cold_Warm", "Color_Fantasy", "Comic_Etch", "Crayon", "Crystals", "Cubism", "Dapple", "Early_Autumn",
    "Fauvism", "Foliage_Patchwork", "French", "Glowing_Sunset", "Gorgeous_Love", "Greenfield", "Ink_Art", "Joy",
    "Liquid_Dreams", "Magic_Cube", "Meteor_Shower", "Monet", "Mosaic", "Neon_Lines", "On_Fire", "Palette_Knife",
    "Pastel", "Pencil_Drawing", "Picasso", "Pointillism", "Pop_Art", "Rain", "Red_Blue_Ink", "Rust", "Superstring",
    "Surrealism", "Techno", "Ukiyoe", "Van_Gogh", "Vibrant_Flow", "Warm_Smear", "Watercolor", "Winter",
]  # fmt: skip
#: The style-less look; a class of the style classifier, never a style of the vocabulary.
NEUTRAL = NEUTRAL_STYLE
#: The 20 UnlearnCanvas objects and the 5 categories ConAbl's object anchors name (glyphs from objects.py).
OBJECTS: list[str] = objects.OBJECTS
CATEGORIES: list[str] = list(objects.CATEGORIES)
#: Every drawable glyph, the object word of every caption: the objects, then the categories' own looks.
GLYPHS: list[str] = objects.GLYPHS
#: Style classes of the judge: every style, then the neutral look (index ``len(STYLES)``).
STYLE_CLASSES: list[str] = STYLES + [NEUTRAL]
NEUTRAL_INDEX = len(STYLES)

assert len(set(STYLES)) == 48 and len(set(OBJECTS)) == 20


# --------------------------------------------------------------------------------------------
# Looks
# --------------------------------------------------------------------------------------------

#: Look parameters, each in [0, 1] in looks.json; mapped to drawing quantities by :func:`_decode_look`.
LOOK_KEYS = ("hue_base", "hue_pattern", "lightness", "contrast", "angle", "period", "cross", "duty")


def _rgb(h: float, light: float, sat: float) -> np.ndarray:
    return np.array(colorsys.hls_to_rgb(h % 1.0, light, sat), dtype=np.float32) * 255.0


def _decode_look(p: dict[str, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """[0, 1] parameters -> (3 colours (base, pattern, object) RGB, texture (angle rad, period px, cross, threshold))."""
    light = 0.28 + 0.45 * p["lightness"]
    delta = 0.22 + 0.25 * p["contrast"]
    light_pat = light + delta if light + delta <= 0.9 else light - delta
    base = _rgb(p["hue_base"], light, 0.75)
    pattern = _rgb(p["hue_pattern"], light_pat, 0.8)
    mean_light = (light + light_pat) / 2
    obj = _rgb(p["hue_base"] + 0.5, 0.1 if mean_light > 0.5 else 0.92, 0.7)
    cross = p["cross"]
    texture = np.array([np.pi * p["angle"], 4.0 + 6.0 * p["period"], cross, (p["duty"] - 0.5) * 1.2 * (1 + cross)],
                       dtype=np.float32)  # fmt: skip
    return np.stack([base, pattern, obj]), texture


def load_looks(path: Path = LOOKS_PATH) -> dict[str, dict[str, float]]:
    """``{style: {key: value in [0, 1]}}`` from the committed look table."""
    table = json.loads(Path(path).read_text())["styles"]
    missing = [s for s in STYLES if s not in table]
    if missing:
        raise ValueError(f"{path} has no look for {missing}; rerun `python -m cuig_lightning.canvas_mini.looks`")
    return table


def _build_tables() -> tuple[np.ndarray, np.ndarray]:
    looks = load_looks() if LOOKS_PATH.is_file() else {s: {k: 0.5 for k in LOOK_KEYS} for s in STYLES}
    colours, textures = zip(*(_decode_look(looks[s]) for s in STYLES))
    neutral_colours = np.array([[128, 128, 128], [128, 128, 128], [40, 40, 40]], dtype=np.float32)
    neutral_texture = np.array([0.0, 8.0, 0.0, 10.0], dtype=np.float32)  # threshold above the range: no pattern
    return np.stack([*colours, neutral_colours]), np.stack([*textures, neutral_texture])


_COLOURS, _TEXTURES = _build_tables()  # (S + 1, 3, RGB), (S + 1, 4); the last row is the neutral look
_SHAPES = objects.shape_matrix() if objects.SHAPES_PATH.is_file() else np.full((len(GLYPHS), objects.P), 0.5)
_COORD = (np.arange(SIZE * _SS, dtype=np.float32) + 0.5) / _SS  # pixel centres in 32-px units


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _texture_mask(tex: np.ndarray, phase: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Thresholded sum of two orthogonal cosine gratings. tex: (n, 4); phase: (n, 2) in [0, 1)."""
    ang, period, cross, thr = (tex[:, i, None, None] for i in range(4))
    u = x * np.cos(ang) + y * np.sin(ang)
    v = -x * np.sin(ang) + y * np.cos(ang)
    two_pi = np.float32(2 * np.pi)
    g = np.cos(two_pi * (u / period + phase[:, 0, None, None])) + cross * np.cos(
        two_pi * (v / period + phase[:, 1, None, None]))  # fmt: skip
    return g > thr


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _block_mean(mask: np.ndarray) -> np.ndarray:
    """(n, 64, 64) bool -> (n, 32, 32) float32 share of True in each 2x2 block."""
    m = mask.view(np.uint8)
    total = m[:, 0::2, 0::2] + m[:, 1::2, 0::2] + m[:, 0::2, 1::2] + m[:, 1::2, 1::2]
    return total.astype(np.float32) * np.float32(1.0 / (_SS * _SS))


def _draw_chunk(style_idx: np.ndarray, object_idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(style_idx)
    # random parameters, always drawn in this order (determinism); shape_mask then draws each glyph's deformation
    phase = rng.random(size=(n, 2)).astype(np.float32)
    centre = (SIZE / 2 + rng.uniform(-objects.SHIFT, objects.SHIFT, size=(n, 2))).astype(np.float32)
    radius = rng.uniform(*objects.RADIUS, size=n).astype(np.float32)
    angle = np.deg2rad(rng.uniform(-objects.ROTATION, objects.ROTATION, size=n)).astype(np.float32)

    x, y = _COORD[None, None, :], _COORD[None, :, None]
    pat = _texture_mask(_TEXTURES[style_idx], phase, x, y)
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    dx, dy = x - centre[:, 0, None, None], y - centre[:, 1, None, None]
    inv_r = (1.0 / radius)[:, None, None]
    shape = objects.shape_mask(_SHAPES[object_idx], (cos * dx + sin * dy) * inv_r, (-sin * dx + cos * dy) * inv_r, rng)

    w_obj = _block_mean(shape)
    w_pat = _block_mean(pat & ~shape)
    pal = _COLOURS[style_idx][:, :, None, None, :]  # (n, [base, pattern, object], 1, 1, RGB)
    img = pal[:, 0] + w_pat[..., None] * (pal[:, 1] - pal[:, 0]) + w_obj[..., None] * (pal[:, 2] - pal[:, 0])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def draw_batch(
    style_idx: np.ndarray | list[int], object_idx: np.ndarray | list[int], rng: np.random.Generator | int | None
) -> np.ndarray:
    """One image per (style index, object index) pair: uint8 ``(N, 32, 32, 3)``.

    Style indices refer to :data:`STYLE_CLASSES` (``NEUTRAL_INDEX`` draws the neutral look), object
    indices to :data:`GLYPHS` (the objects, then the categories). A pure function of the indices and the
    generator's state.
    """
    style_idx = np.asarray(style_idx, dtype=np.int64).reshape(-1)
    object_idx = np.asarray(object_idx, dtype=np.int64).reshape(-1)
    if style_idx.shape != object_idx.shape:
        raise ValueError("style_idx and object_idx must have the same length")
    if style_idx.size and (style_idx.min() < 0 or style_idx.max() > NEUTRAL_INDEX):
        raise ValueError(f"style index out of range 0..{NEUTRAL_INDEX}")
    if object_idx.size and (object_idx.min() < 0 or object_idx.max() >= len(GLYPHS)):
        raise ValueError(f"object index out of range 0..{len(GLYPHS) - 1}")
    rng = _as_rng(rng)
    out = np.empty((len(style_idx), SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(0, len(style_idx), _CHUNK):
        out[i : i + _CHUNK] = _draw_chunk(style_idx[i : i + _CHUNK], object_idx[i : i + _CHUNK], rng)
    return out


def draw(style: str, obj: str, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """One image of ``obj`` (an object or a category) in ``style`` (or :data:`NEUTRAL`): uint8 ``(32, 32, 3)``."""
    return draw_batch(_indices([style], STYLE_CLASSES), _indices([obj], GLYPHS), rng)[0]


def _indices(names: list[str] | None, vocab: list[str]) -> np.ndarray:
    if names is None:
        return np.arange(len(vocab))
    unknown = [n for n in names if n not in vocab]
    if unknown:
        raise KeyError(f"unknown concepts {unknown}; known: {vocab}")
    return np.array([vocab.index(n) for n in names], dtype=np.int64)


def make_dataset(
    n_per_class: int, seed: int = 0, styles: list[str] | None = None, objects: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n_per_class`` images of every (style, object) pair; ``styles`` defaults to :data:`STYLE_CLASSES`,
    ``objects`` to :data:`OBJECTS` (any of :data:`GLYPHS` may be given).

    Returns ``(images, style_idx, object_idx)`` (indices into :data:`STYLE_CLASSES` / :data:`GLYPHS`),
    style-major, then object, then the repeats.
    """
    s = _indices(styles, STYLE_CLASSES)
    o = _indices(objects or OBJECTS, GLYPHS)
    style_idx = np.repeat(s, len(o) * n_per_class)
    object_idx = np.tile(np.repeat(o, n_per_class), len(s))
    return draw_batch(style_idx, object_idx, seed), style_idx, object_idx


def sample_batch(
    n: int, rng: np.random.Generator | int | None, neutral_share: float = 0.0, category_share: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` images with uniformly random (style, object) labels; a ``neutral_share`` of them neutral, a
    ``category_share`` of them a uniformly random category's look instead of an object (index into :data:`GLYPHS`)."""
    rng = _as_rng(rng)
    style_idx = rng.integers(0, len(STYLES), size=n)
    object_idx = rng.integers(0, len(OBJECTS), size=n)
    if neutral_share > 0:
        style_idx = np.where(rng.random(n) < neutral_share, NEUTRAL_INDEX, style_idx)
    if category_share > 0:
        category = len(OBJECTS) + rng.integers(0, len(CATEGORIES), size=n)
        object_idx = np.where(rng.random(n) < category_share, category, object_idx)
    return draw_batch(style_idx, object_idx, rng), style_idx, object_idx


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` (or one ``(H, W, 3)``) -> float32 ``(N, 3, H, W)`` in ``[-1, 1]``."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def from_tensor(images: torch.Tensor) -> np.ndarray:
    """float ``(N, 3, H, W)`` in ``[-1, 1]`` -> uint8 ``(N, H, W, 3)`` (clamped, rounded)."""
    x = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round()
    return x.permute(0, 2, 3, 1).to(torch.uint8).numpy()


def contact_sheet(path: str | Path | None = None, seed: int = 0, scale: int = 2, gap: int = 2) -> np.ndarray:
    """One row per style class (neutral last), one column per glyph (objects, then categories), tiles upscaled
    ``scale`` x; optional PNG."""
    imgs, _, _ = make_dataset(1, seed, objects=GLYPHS)
    return tile_sheet(imgs, len(STYLE_CLASSES), len(GLYPHS), path, scale, gap)


def tile_sheet(imgs: np.ndarray, rows: int, cols: int, path: str | Path | None = None, scale: int = 2,
               gap: int = 2) -> np.ndarray:
    """``rows`` x ``cols`` images (row-major, uint8 ``(N, SIZE, SIZE, 3)``) as one white-gapped sheet, tiles
    upscaled ``scale`` x; written as a PNG when ``path`` is given."""
    t = SIZE * scale
    sheet = np.full((rows * (t + gap) + gap, cols * (t + gap) + gap, 3), 255, dtype=np.uint8)
    for i in range(rows):
        for j in range(cols):
            tile = imgs[i * cols + j].repeat(scale, 0).repeat(scale, 1)
            sheet[gap + i * (t + gap) : gap + i * (t + gap) + t, gap + j * (t + gap) : gap + j * (t + gap) + t] = tile
    if path is not None:
        import matplotlib.image

        matplotlib.image.imsave(str(path), sheet)
    return sheet
