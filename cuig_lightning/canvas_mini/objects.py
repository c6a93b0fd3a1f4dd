"""The 20 UnlearnCanvas objects as procedural glyphs whose shape follows their name's text geometry.

Canvas-mini's first objects were 12 unrelated geometric shapes (Circle, Square, ...). The UnlearnCanvas objects
(Bears, Cats, Towers, ...) are related by meaning, and unlearning one should be measurable against its
neighbours, so their drawings are related the same way. As for the style looks
(:mod:`cuig_lightning.canvas_mini.looks`), every object is a point of ONE continuous family and its parameters
come from the names' in-prompt MiniLM states (:meth:`DiffusionModel.concept_embeddings` with ``"object"``):
classical MDS of their cosine matrix, each coordinate mixed with a per-object random draw (weight ``meaning``)
and squashed to [0, 1] by the normal CDF.

The family is a mirror-symmetric radial Fourier outline (a filled glyph, left-right symmetric like most
objects): in object coordinates (u right, v down, angle ``theta`` from straight up, clockwise) the glyph is
``rho <= s * exp(sum_k c_k cos(k theta) / sqrt(k))`` for harmonics k = 1..10, with ``c_k = AMPLITUDE * (2 p_k - 1)``:

* k = 1: heavy top (p > 0.5) or heavy bottom; k = 2: tall or wide; k = 3: a triangle pointing up or down;
  k = 4: a diamond or a square; k = 5..10: lobes, petals, spikes and notches, finer as k grows.
* The 1 / sqrt(k) decay gives coarse harmonics the larger share of the outline, and MDS coordinate j drives
  harmonic j, so the axes that carry most of the meaning move most of the ink: drawings of close names overlap
  (the Mantel tests in ``docs/canvas_mini_objects.md`` measure it on the parameters and on the images).
* ``s`` scales every glyph to the same ink area (:data:`AREA`; capped so no point passes :data:`MAX_EXTENT`):
  size would otherwise tell objects apart on its own and dominate image similarity without meaning anything.

An earlier design of this module (a superellipse body with limbs, hole, taper, bend: readable attributes) was
nearly as distinct (99.4%) but far less linear in pixels: mean drawings followed meaning at Spearman 0.14
(Mantel p 0.09) against 0.40 here, because limbs gate their angle and length and a hole or a lobe count moves
little ink.

:func:`shape_mask` draws a batch of glyphs (one parameter row per image) in object coordinates and applies the
per-image deformation from a generator; :mod:`cuig_lightning.canvas_mini.world` composes them over the style
backgrounds (``world.draw_batch``), and the captions name an object or its category (:data:`CATEGORIES`).

    python -m cuig_lightning.canvas_mini.objects            # rewrite shapes.json (deterministic; not a user command)
    python -m cuig_lightning.canvas_mini.objects --sheet docs/canvas_mini_objects.png   # contact sheet
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch


#: The 20 UnlearnCanvas objects, in the order of UnlearnCanvas' object classifier head (alphabetical).
OBJECTS: list[str] = [
    "Architectures", "Bears", "Birds", "Butterfly", "Cats", "Dogs", "Fishes", "Flame", "Flowers", "Frogs", "Horses",
    "Human", "Jellyfish", "Rabbits", "Sandwiches", "Sea", "Statues", "Towers", "Trees", "Waterfalls",
]  # fmt: skip

#: The paper's anchor categories (ConAbl erases an object towards its category, e.g. "A Animals image.").
#: Doubtful members, decided here:
#: * Human -> Sculptures: the five anchors have no "People"; "Animals" would make ConAbl draw beasts for humans,
#:   while statues are human figures without the person, the nearest concept an anchor can render.
#: * Flowers -> Landscapes: plants, like Trees, which the paper's grouping puts among landscapes; not Food.
#: * Flame -> Landscapes: a natural phenomenon, like Sea and Waterfalls (UnlearnCanvas' photos are of fires
#:   outdoors); no other category comes close.
#: * Butterfly -> Animals (an insect, as Jellyfish is an invertebrate); Architectures -> Buildings, by name.
CATEGORIES: dict[str, list[str]] = {
    "Animals": ["Bears", "Birds", "Butterfly", "Cats", "Dogs", "Fishes", "Frogs", "Horses", "Jellyfish", "Rabbits"],
    "Food": ["Sandwiches"],
    "Sculptures": ["Statues", "Human"],
    "Buildings": ["Architectures", "Towers"],
    "Landscapes": ["Sea", "Trees", "Waterfalls", "Flame", "Flowers"],
}
#: ``{object: category}``.
CATEGORY: dict[str, str] = {o: c for c, members in CATEGORIES.items() for o in members}
#: Everything a caption can name, each with its own glyph: the objects, then the categories. A category has a look
#: of its own (as the style-less caption has the neutral look), not one of its members: with members, "A Food
#: image." would draw Sandwiches, its only member, and ConAbl could never erase Sandwiches towards Food.
GLYPHS: list[str] = OBJECTS + list(CATEGORIES)

#: Harmonics of the outline; parameter ``h{k}`` (in [0, 1], 0.5 = none of it) is harmonic k's coefficient.
HARMONICS = tuple(range(1, 11))
SHAPE_KEYS = tuple(f"h{k}" for k in HARMONICS)
P = len(SHAPE_KEYS)
#: Largest |coefficient| of log-radius (before the 1 / sqrt(k) decay): exp(0.5) = 1.65x the mean radius for one
#: harmonic alone. Smaller glyphs blur into blobs at 32 px; larger ones grow hair-thin spikes.
AMPLITUDE = 0.5

#: Where the shape table lives (written by :func:`main`, committed).
SHAPES_PATH = Path(__file__).resolve().parent.parent / "assets" / "canvas_mini" / "shapes.json"
#: Share of each shape coordinate that comes from meaning (MDS); the rest is a per-object random draw. Higher
#: than the looks' 0.75: 20 objects give 190 pairs (48 styles 1,128), so the Mantel test has less power; at 0.85
#: the closest objects still differ by more than a per-image deformation (the classifier tells all 20 apart).
MEANING = 0.85
SEED = 2027
#: How many per-object random draws :func:`derive_shapes` tries (seeds ``seed .. seed + CANDIDATES - 1``); it
#: keeps the one whose two closest outlines are farthest apart (distinctness; chosen without looking at meaning).
CANDIDATES = 64

#: Per-image deformation: std of the parameter jitter (in [0, 1] units), largest amplitude of an asymmetric
#: wobble (sin of 2 and 3 theta, in log-radius), std of the log anisotropic stretch. Small next to the
#: smallest gap between two objects' parameters (about 0.9 in [0, 1]^10).
JITTER, WOBBLE, STRETCH = 0.03, 0.05, 0.06
#: Object radius in pixels, position jitter in pixels, rotation jitter in
#: degrees (small: up and down are part of a glyph's identity, k = 1 and 3 say which end is heavy or pointed).
RADIUS, SHIFT, ROTATION = (8.0, 9.5), 2.0, 10.0
#: Every glyph has this ink area (object units^2: a disc of radius 0.8, about 13 px across), unless a point would
#: then pass MAX_EXTENT (1.3 x 9.5 px + 2 px of shift stays inside the 32-px canvas).
AREA, MAX_EXTENT = np.pi * 0.8**2, 1.3

assert len(set(OBJECTS)) == 20 and set(CATEGORY) == set(OBJECTS) and len(set(GLYPHS)) == 25

_DECAY = 1.0 / np.sqrt(np.array(HARMONICS, dtype=np.float64))
_ANGLES = np.linspace(-np.pi, np.pi, 720, endpoint=False, dtype=np.float32)  # for each glyph's area and extent


# --------------------------------------------------------------------------------------------
# Shapes from text geometry
# --------------------------------------------------------------------------------------------


def object_text_cosine(names: list[str] = GLYPHS) -> np.ndarray:
    """Cosine matrix of the names' in-prompt token states ("A Cats image."), as the UNet sees them."""
    from cuig_lightning.canvas_mini.model import load_text_model

    emb = load_text_model().concept_embeddings(list(names), "object").double()
    emb = torch.nn.functional.normalize(emb, dim=-1)
    return (emb @ emb.T).numpy()


def oriented_mds(cosine: np.ndarray, dims: int) -> np.ndarray:
    """Classical MDS (looks.py's), each axis standardised and its sign fixed (largest-magnitude entry positive):
    an eigenvector's sign is arbitrary, and a LAPACK update must not turn every glyph upside down."""
    from cuig_lightning.canvas_mini.looks import classical_mds  # looks imports world, which imports this module

    coords = classical_mds(cosine, dims)
    coords = (coords - coords.mean(0)) / coords.std(0)
    return coords * np.sign(coords[np.abs(coords).argmax(0), np.arange(dims)])


def outline_distance(params: np.ndarray) -> np.ndarray:
    """``(n, n)`` RMS difference of the glyphs' log-radius over the angle (before area scaling): by Parseval
    ``AMPLITUDE * 2 * sqrt(sum_k dp_k^2 / k / 2)``, how far apart two outlines are, coarse harmonics weighing more."""
    coeff = np.asarray(params, dtype=np.float64) * 2 * AMPLITUDE * _DECAY
    return np.linalg.norm(coeff[:, None] - coeff[None], axis=-1) / np.sqrt(2)


def derive_shapes(
    cosine: np.ndarray, meaning: float = MEANING, seed: int = SEED, candidates: int = CANDIDATES
) -> dict[str, dict[str, float]]:
    """``{glyph: {shape key: value in [0, 1]}}`` from the glyphs' text cosine matrix (rows in :data:`GLYPHS` order).

    Parameter j = normal CDF of ``meaning * MDS_j + sqrt(1 - meaning^2) * noise_j`` (MDS axes standardised, as
    looks.py). Of ``candidates`` noise draws (seeds ``seed, seed + 1, ...``) the one whose two closest outlines
    (:func:`outline_distance`) are farthest apart is kept, so that chance does not make two objects look alike.
    """
    coords = oriented_mds(cosine, P)
    erf = np.vectorize(math.erf)
    iu = np.triu_indices(len(coords), 1)
    best, best_gap = None, -1.0
    for k in range(candidates):
        noise = np.random.default_rng(seed + k).standard_normal(coords.shape)
        z = meaning * coords + math.sqrt(1 - meaning**2) * noise
        values = np.round(0.5 * (1 + erf(z / math.sqrt(2))), 4)  # rounded as stored
        gap = outline_distance(values)[iu].min()
        if gap > best_gap:
            best, best_gap = values, gap
    return {o: {k: float(v) for k, v in zip(SHAPE_KEYS, row)} for o, row in zip(GLYPHS, best)}


def load_shapes(path: Path = SHAPES_PATH) -> dict[str, dict[str, float]]:
    """``{object: {key: value in [0, 1]}}`` from the committed shape table."""
    table = json.loads(Path(path).read_text())["objects"]
    missing = [o for o in GLYPHS if o not in table]
    if missing:
        raise ValueError(f"{path} has no shape for {missing}; rerun `python -m cuig_lightning.canvas_mini.objects`")
    return table


def shape_matrix(table: dict[str, dict[str, float]] | None = None, names: list[str] = GLYPHS) -> np.ndarray:
    """``(len(names), P)`` parameters in :data:`SHAPE_KEYS` order (default: the committed table)."""
    table = load_shapes() if table is None else table
    return np.array([[table[o][k] for k in SHAPE_KEYS] for o in names], dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _log_radius(coeff: np.ndarray, wobble: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """log r(theta) for coefficients ``(n, P)`` (decay included) and wobble ``(n, 2)``, at angles given by their
    cosine and sine (``(n, ...)``, or ``(m,)`` shared by every glyph: then ``(n, m)``). cos(k theta) comes from
    the Chebyshev recurrence, 3x faster than ten cosines of an arctan2."""
    if cos.ndim == 1:
        cos, sin = cos[None], sin[None]
    extra = (1,) * (cos.ndim - 1)
    col = lambda a, j: a[:, j].reshape(-1, *extra)  # noqa: E731
    out = col(wobble, 0) * (2 * sin * cos) + col(wobble, 1) * sin * (3 - 4 * sin * sin)  # sin 2theta, sin 3theta
    previous, current = np.ones_like(cos), cos
    for j in range(len(HARMONICS)):  # HARMONICS = 1, 2, ...: current = cos((j + 1) theta)
        out = out + col(coeff, j) * current
        previous, current = current, 2 * cos * current - previous
    return out


def shape_mask(
    params: np.ndarray, u: np.ndarray, v: np.ndarray, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Filled glyphs ``(n, H, W)`` bool: image i drawn with parameters ``params[i]`` (in [0, 1], ``(n, P)``) at
    object coordinates ``u[i], v[i]`` (u right, v down, 1 = the object's radius; broadcastable to ``(n, H, W)``).

    With ``rng`` every image is deformed a little (drawn in this order: parameter jitter ``JITTER``, asymmetric
    wobble up to ``WOBBLE``, anisotropic stretch ``STRETCH``); without, the canonical glyph.
    """
    params = np.asarray(params, dtype=np.float64).reshape(-1, P)
    n = len(params)
    u = np.broadcast_to(u, (n, *np.shape(u)[-2:])).astype(np.float32)
    v = np.broadcast_to(v, (n, *np.shape(v)[-2:])).astype(np.float32)
    wobble = np.zeros((n, 2))
    if rng is not None:
        params = np.clip(params + JITTER * rng.standard_normal(params.shape), 0, 1)
        wobble = rng.uniform(-WOBBLE, WOBBLE, (n, 2))
        stretch = np.exp(STRETCH * rng.standard_normal((n, 2))).astype(np.float32)
        u, v = u * stretch[:, 0, None, None], v * stretch[:, 1, None, None]
    coeff = (AMPLITUDE * (2 * params - 1) * _DECAY).astype(np.float32)
    wobble = wobble.astype(np.float32)
    # scale to AREA: the area of a star-shaped region is 1/2 * integral of r^2 over the angle
    r = np.exp(_log_radius(coeff, wobble, np.cos(_ANGLES), np.sin(_ANGLES)))
    area = np.pi * (r**2).mean(1)
    scale = np.minimum(np.sqrt(AREA / area), MAX_EXTENT / r.max(1))[:, None, None]
    # theta from straight up, clockwise (v points down): cos = -v / rho, sin = u / rho (straight up at rho = 0)
    rho = np.sqrt(u * u + v * v)
    inv = 1 / np.maximum(rho, 1e-6)
    cos, sin = np.where(rho > 0, -v * inv, 1), u * inv
    return rho <= scale * np.exp(_log_radius(coeff, wobble, cos, sin))


def contact_sheet(
    path: str | Path | None = None, styles: list[str] | None = None, seed: int = 0, scale: int = 3, gap: int = 2
) -> np.ndarray:
    """One row per glyph (objects, then categories), one column per style (default: 7 spread-out styles, then
    neutral), tiles upscaled."""
    from cuig_lightning.canvas_mini import world  # world draws the glyphs (and imports this module)

    styles = styles or [*world.STYLES[::7], world.NEUTRAL]
    s_idx = np.array([world.STYLE_CLASSES.index(s) for s in styles])
    rows, cols = len(GLYPHS), len(styles)
    imgs = world.draw_batch(np.tile(s_idx, rows), np.repeat(np.arange(rows), cols), seed)
    return world.tile_sheet(imgs, rows, cols, path, scale, gap)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sheet", help="write a contact sheet PNG here instead of shapes.json")
    args = parser.parse_args(argv)
    if args.sheet:
        contact_sheet(args.sheet)
        print(f"wrote {args.sheet}")
        return
    shapes = derive_shapes(object_text_cosine())
    table = {
        "about": "Canvas-mini object glyphs (mirror-symmetric radial Fourier outlines, harmonics h1..h10), derived "
        "by cuig_lightning/canvas_mini/objects.py from the causal MiniLM in-prompt states of the object and "
        "category names "
        f"(classical MDS, mixed with a per-object random draw: of {CANDIDATES} draws, the one keeping outlines "
        "farthest apart).",
        "meaning": MEANING,
        "seed": SEED,
        "candidates": CANDIDATES,
        "objects": shapes,
    }
    SHAPES_PATH.parent.mkdir(parents=True, exist_ok=True)
    SHAPES_PATH.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {SHAPES_PATH} ({len(shapes)} glyphs: objects and categories)")


if __name__ == "__main__":
    main()
