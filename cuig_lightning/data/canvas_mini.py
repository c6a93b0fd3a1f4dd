"""Canvas-mini: a miniature, procedurally drawn UnlearnCanvas.

Every image is 32x32 RGB. Its *style* is the background: a two-colour texture whose colours come
from a *palette* (Red, Blue, Green, Gold, Purple, Teal) and whose geometry is a *pattern*
(Stripes, Dots, Checks, Waves, Grid). A style name joins the two with an underscore
(``Red_Stripes``), so styles whose names share a word also look alike (same colours or same
texture), which is what makes in-domain retention hard and GradProj's text similarity meaningful.
Its *object* is one large filled shape (Circle, Square, ...) drawn in a colour that contrasts with
the palette, with small random jitter of position, size and rotation.

Layout of the vocabulary, mirroring UnlearnCanvas' continual-unlearning protocol:

* ``STYLES``: 24 styles = 6 palettes x 4 of the 5 patterns (one pattern left out per palette).
* ``OBJECTS``: 8 shapes.
* ``SEQ12_STYLES``: the 12 styles erased one by one, in order; two per palette, every pattern 2-3 times.
* ``RETAIN_STYLES``: the other 12 styles. Each shares its palette with two erased styles and its
  pattern with at least two erased styles.
* ``RETAIN_OBJECTS``: all objects (the cross-domain retain set of style requests).

Image format: :func:`draw`, :func:`draw_batch` and :func:`make_dataset` return ``uint8`` arrays,
height x width x RGB (``(32, 32, 3)`` per image). :func:`to_tensor` turns them into the float
``N x 3 x 32 x 32`` tensors in ``[-1, 1]`` that the diffusion model and the classifiers take;
:func:`from_tensor` goes back.

Drawing is vectorised numpy with 2x2 supersampling (soft edges); ~10k images take a couple of
seconds on one core. Everything is a pure function of the seed / ``numpy.random.Generator``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SIZE = 32
_SS = 2  # supersampling factor
_CHUNK = 1024  # images drawn at once (bounds memory at ~100 MB)

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

#: palette -> (pattern colour, base colour, object colour), RGB 0..255.
PALETTES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]] = {
    "Red": ((205, 35, 35), (255, 200, 185), (25, 30, 110)),
    "Blue": ((35, 70, 210), (185, 205, 255), (255, 200, 0)),
    "Green": ((35, 145, 45), (200, 240, 170), (170, 20, 120)),
    "Gold": ((220, 165, 0), (255, 242, 175), (70, 30, 140)),
    "Purple": ((135, 50, 190), (230, 205, 250), (255, 140, 0)),
    "Teal": ((0, 140, 140), (175, 235, 230), (150, 20, 20)),
}
PATTERNS: list[str] = ["Stripes", "Dots", "Checks", "Waves", "Grid"]
OBJECTS: list[str] = ["Circle", "Square", "Triangle", "Cross", "Ring", "Diamond", "Star", "Heart"]


def _build_styles() -> list[str]:
    styles = []
    for i, palette in enumerate(PALETTES):
        dropped = PATTERNS[(i + 4) % len(PATTERNS)]
        styles += [f"{palette}_{p}" for p in PATTERNS if p != dropped]
    return styles


#: 24 styles, palette-major: Red_Stripes, Red_Dots, Red_Checks, Red_Waves, Blue_Dots, ...
STYLES: list[str] = _build_styles()

#: The 12 styles erased in order (the Canvas-mini counterpart of the paper's style sequence).
SEQ12_STYLES: list[str] = [
    "Red_Stripes", "Blue_Dots", "Green_Checks", "Gold_Waves", "Purple_Grid", "Teal_Stripes",
    "Red_Checks", "Blue_Grid", "Green_Waves", "Gold_Dots", "Purple_Stripes", "Teal_Waves",
]
#: The styles never erased (all the others), in ``STYLES`` order.
RETAIN_STYLES: list[str] = [s for s in STYLES if s not in SEQ12_STYLES]
#: Cross-domain retain set of style requests: every object.
RETAIN_OBJECTS: list[str] = list(OBJECTS)

assert len(STYLES) == 24 and len(set(STYLES)) == 24
assert set(SEQ12_STYLES) <= set(STYLES) and len(set(SEQ12_STYLES)) == 12
assert len(RETAIN_STYLES) == 12


def palette_of(style: str) -> str:
    return style.split("_")[0]


def pattern_of(style: str) -> str:
    return style.split("_")[1]


def concept_text(name: str) -> str:
    """``Red_Stripes`` -> ``Red Stripes``."""
    return name.replace("_", " ")


def caption(style: str, obj: str) -> str:
    """UnlearnCanvas caption: ``caption("Red_Stripes", "Circle") == "A Circle image in Red Stripes style."``."""
    return f"A {concept_text(obj)} image in {concept_text(style)} style."


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------

_PAL = np.array([PALETTES[palette_of(s)] for s in STYLES], dtype=np.float32)  # (S, 3 colours, RGB)
_PAT = np.array([PATTERNS.index(pattern_of(s)) for s in STYLES])
_COORD = (np.arange(SIZE * _SS, dtype=np.float32) + 0.5) / _SS  # pixel centres in 32-px units


def _pattern_mask(pattern: int, x: np.ndarray, y: np.ndarray, ph: np.ndarray) -> np.ndarray:
    """1 where the pattern colour goes. x, y: (1, H, W) coordinates; ph: (n, 2) phases in px."""
    px = ph[:, 0, None, None]
    py = ph[:, 1, None, None]
    name = PATTERNS[pattern]
    if name == "Stripes":  # diagonal bands, period 10 px along x (7.1 px across the bands)
        return np.mod(x + y + px, 10.0) < 5.0
    if name == "Dots":  # dots of diameter 4.6 px on an 8 px lattice
        dx = np.mod(x + px, 8.0) - 4.0
        dy = np.mod(y + py, 8.0) - 4.0
        return dx * dx + dy * dy < 2.3**2
    if name == "Checks":  # 5 px squares
        return (np.floor((x + px) / 5.0) + np.floor((y + py) / 5.0)) % 2 == 0
    if name == "Waves":  # horizontal wavy bands, period 8 px, wavelength 12 px
        return np.mod(y + py + 2.0 * np.sin(2 * np.pi * (x + px) / 12.0), 8.0) < 4.0
    if name == "Grid":  # 2 px lines every 8 px
        return (np.mod(x + px, 8.0) < 2.0) | (np.mod(y + py, 8.0) < 2.0)
    raise ValueError(name)


def _star(u: np.ndarray, v: np.ndarray, inner: float = 0.5) -> np.ndarray:
    """Five-pointed star, one point up, outer radius 1."""
    phi = np.arctan2(u, -v)  # 0 = up
    sector = np.deg2rad(72.0)
    c = np.abs(np.mod(phi, sector) - sector / 2)  # 0 at an inner vertex, 36 deg at an outer one
    c = sector / 2 - c  # 0 at an outer vertex
    rho = np.sqrt(u * u + v * v)
    px, py = rho * np.cos(c), rho * np.sin(c)
    ix, iy = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
    dx, dy = ix - 1.0, iy
    return dx * py - dy * (px - 1.0) >= 0.0


def _shape_mask(obj: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Filled shape in object coordinates (u right, v down, 1 = the object's radius)."""
    name = OBJECTS[obj]
    if name == "Circle":
        return u * u + v * v <= 1.0
    if name == "Ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if name == "Square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if name == "Diamond":  # taller than wide, so never a rotated square
        return np.abs(u) / 0.78 + np.abs(v) / 1.05 <= 1.0
    if name == "Triangle":  # equilateral, apex up, circumradius 1.15
        ok = v <= 0.575
        for ang in (np.deg2rad(30.0), np.deg2rad(150.0)):  # outward normals of the two slanted edges
            ok &= u * np.cos(ang) - v * np.sin(ang) <= 0.575
        return ok
    if name == "Cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.32) & (av <= 1.0)) | ((av <= 0.32) & (au <= 1.0))
    if name == "Star":
        return _star(u * 0.95, v * 0.95 + 0.05)
    if name == "Heart":  # (X^2 + Y^2 - 1)^3 - X^2 Y^3 <= 0, tip down
        X = 1.12 * u
        Y = -1.125 * v + 0.125
        return (X * X + Y * Y - 1.0) ** 3 - X * X * Y**3 <= 0.0
    raise ValueError(name)


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _block_mean(mask: np.ndarray) -> np.ndarray:
    """(n, 64, 64) bool -> (n, 32, 32) float32 share of True in each 2x2 block."""
    m = mask.view(np.uint8)
    total = m[:, 0::2, 0::2] + m[:, 1::2, 0::2] + m[:, 0::2, 1::2] + m[:, 1::2, 1::2]
    return total.astype(np.float32) * np.float32(1.0 / (_SS * _SS))


def _draw_chunk(style_idx: np.ndarray, object_idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(style_idx)
    # random parameters, always drawn in this order (determinism)
    # whole-pixel phases in 0..39 (40 = a common multiple of all periods): crisp, translated textures
    phase = rng.integers(0, 40, size=(n, 2)).astype(np.float32)
    centre = (SIZE / 2 + rng.uniform(-2.5, 2.5, size=(n, 2))).astype(np.float32)
    radius = rng.uniform(8.5, 10.5, size=n).astype(np.float32)  # object 17..21 px across
    angle = np.deg2rad(rng.uniform(-15.0, 15.0, size=n)).astype(np.float32)

    x = _COORD[None, None, :]
    y = _COORD[None, :, None]
    hi = SIZE * _SS
    pat = np.zeros((n, hi, hi), dtype=bool)
    for p in np.unique(_PAT[style_idx]):
        sel = _PAT[style_idx] == p
        pat[sel] = _pattern_mask(int(p), x, y, phase[sel])

    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    inv_r = (1.0 / radius)[:, None, None]
    shape = np.zeros((n, hi, hi), dtype=bool)
    for o in np.unique(object_idx):
        sel = object_idx == o
        dx = x - centre[sel, 0, None, None]
        dy = y - centre[sel, 1, None, None]
        u = (cos[sel] * dx + sin[sel] * dy) * inv_r[sel]  # object frame, 1 = radius
        v = (-sin[sel] * dx + cos[sel] * dy) * inv_r[sel]
        shape[sel] = _shape_mask(int(o), u, v)

    # colour = coverage-weighted mix of the three palette colours over each 2x2 block (box filter)
    w_obj = _block_mean(shape)
    w_pat = _block_mean(pat & ~shape)
    pal = _PAL[style_idx][:, :, None, None, :]  # (n, [pattern, base, object], 1, 1, RGB)
    img = pal[:, 1] + w_pat[..., None] * (pal[:, 0] - pal[:, 1]) + w_obj[..., None] * (pal[:, 2] - pal[:, 1])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def draw_batch(
    style_idx: np.ndarray | list[int], object_idx: np.ndarray | list[int], rng: np.random.Generator | int | None
) -> np.ndarray:
    """Draw one image per (style index, object index) pair: uint8 ``(N, 32, 32, 3)``.

    Indices refer to ``STYLES`` / ``OBJECTS``. The result is a pure function of the indices and
    the generator's state (an ``int`` seed is turned into ``numpy.random.default_rng(seed)``).
    """
    style_idx = np.asarray(style_idx, dtype=np.int64).reshape(-1)
    object_idx = np.asarray(object_idx, dtype=np.int64).reshape(-1)
    if style_idx.shape != object_idx.shape:
        raise ValueError("style_idx and object_idx must have the same length")
    if style_idx.size and (style_idx.min() < 0 or style_idx.max() >= len(STYLES)):
        raise ValueError(f"style index out of range 0..{len(STYLES) - 1}")
    if object_idx.size and (object_idx.min() < 0 or object_idx.max() >= len(OBJECTS)):
        raise ValueError(f"object index out of range 0..{len(OBJECTS) - 1}")
    rng = _as_rng(rng)
    out = np.empty((len(style_idx), SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(0, len(style_idx), _CHUNK):
        out[i : i + _CHUNK] = _draw_chunk(style_idx[i : i + _CHUNK], object_idx[i : i + _CHUNK], rng)
    return out


def draw(style: str, obj: str, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """One image of ``obj`` in ``style``: uint8 ``(32, 32, 3)``."""
    if style not in STYLES:
        raise KeyError(f"unknown style {style!r}; known: {STYLES}")
    if obj not in OBJECTS:
        raise KeyError(f"unknown object {obj!r}; known: {OBJECTS}")
    return draw_batch([STYLES.index(style)], [OBJECTS.index(obj)], rng)[0]


def _indices(names: list[str] | None, vocab: list[str]) -> np.ndarray:
    if names is None:
        return np.arange(len(vocab))
    unknown = [n for n in names if n not in vocab]
    if unknown:
        raise KeyError(f"unknown concepts {unknown}")
    return np.array([vocab.index(n) for n in names], dtype=np.int64)


def make_dataset(
    n_per_class: int,
    seed: int = 0,
    styles: list[str] | None = None,
    objects: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n_per_class`` images of every (style, object) pair.

    Returns ``(images, style_idx, object_idx)``: uint8 ``(N, 32, 32, 3)`` and two int64 ``(N,)``
    arrays of indices into the full ``STYLES`` / ``OBJECTS`` (also when subsets are given).
    Order: style-major, then object, then the ``n_per_class`` repeats. Identical for the same
    arguments; use :func:`to_tensor` for the ``[-1, 1]`` float tensor.
    """
    s = _indices(styles, STYLES)
    o = _indices(objects, OBJECTS)
    style_idx = np.repeat(s, len(o) * n_per_class)
    object_idx = np.tile(np.repeat(o, n_per_class), len(s))
    return draw_batch(style_idx, object_idx, seed), style_idx, object_idx


def sample_batch(
    n: int,
    rng: np.random.Generator | int | None,
    styles: list[str] | None = None,
    objects: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` images with uniformly random (style, object) labels (from the given subsets)."""
    rng = _as_rng(rng)
    s = _indices(styles, STYLES)
    o = _indices(objects, OBJECTS)
    style_idx = s[rng.integers(0, len(s), size=n)]
    object_idx = o[rng.integers(0, len(o), size=n)]
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
    """One row per style, one column per object, each tile upscaled ``scale`` x; optional PNG."""
    imgs, _, _ = make_dataset(1, seed)
    t = SIZE * scale
    rows, cols = len(STYLES), len(OBJECTS)
    sheet = np.full((rows * (t + gap) + gap, cols * (t + gap) + gap, 3), 255, dtype=np.uint8)
    for i in range(rows):
        for j in range(cols):
            tile = imgs[i * cols + j].repeat(scale, 0).repeat(scale, 1)
            sheet[gap + i * (t + gap) : gap + i * (t + gap) + t, gap + j * (t + gap) : gap + j * (t + gap) + t] = tile
    if path is not None:
        import matplotlib.image

        matplotlib.image.imsave(str(path), sheet)
    return sheet
