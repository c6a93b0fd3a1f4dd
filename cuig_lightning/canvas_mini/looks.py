"""Derive each Canvas-mini style's look from its name's text geometry (writes ``assets/canvas_mini/looks.json``).

The UNet sees a style through its name's token states (causal MiniLM, inside a prompt:
:meth:`DiffusionModel.concept_embeddings`). Classical MDS of those states' cosine matrix gives each
style a point whose coordinates follow meaning; each look parameter (:data:`world.LOOK_KEYS`) is one
MDS coordinate mixed with a per-style random coordinate (weight ``meaning``; the rest keeps styles
apart and stops any single attribute from carrying all the similarity), then squashed to [0, 1] by
the normal CDF. So close names look somewhat alike, and far names mostly do not.

    python -m cuig_lightning.canvas_mini.looks            # rewrite looks.json (deterministic; not a user command)
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from cuig_lightning.canvas_mini.world import LOOK_KEYS, LOOKS_PATH, STYLES

#: Share of each look coordinate that comes from meaning (MDS); the rest is a per-style random draw.
MEANING = 0.75
SEED = 2026


def style_text_cosine(names: list[str] = STYLES) -> np.ndarray:
    """Cosine matrix of the styles' in-prompt token states, as the UNet sees them."""
    from cuig_lightning.canvas_mini.model import load_text_model

    emb = load_text_model().concept_embeddings(list(names), "style").double()
    emb = torch.nn.functional.normalize(emb, dim=-1)
    return (emb @ emb.T).numpy()


def classical_mds(similarity: np.ndarray, dims: int) -> np.ndarray:
    """Coordinates ``(n, dims)`` whose inner products best match the double-centred similarity matrix."""
    n = len(similarity)
    centre = np.eye(n) - np.ones((n, n)) / n
    b = centre @ similarity @ centre
    values, vectors = np.linalg.eigh(b)
    order = np.argsort(values)[::-1][:dims]
    return vectors[:, order] * np.sqrt(np.clip(values[order], 0, None))


def derive_looks(cosine: np.ndarray, meaning: float = MEANING, seed: int = SEED) -> dict[str, dict[str, float]]:
    """``{style: {look key: value in [0, 1]}}`` from the styles' text cosine matrix (rows in :data:`STYLES` order)."""
    coords = classical_mds(cosine, len(LOOK_KEYS))
    coords = (coords - coords.mean(0)) / coords.std(0)
    noise = np.random.default_rng(seed).standard_normal(coords.shape)
    z = meaning * coords + math.sqrt(1 - meaning**2) * noise
    values = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))  # normal CDF
    return {s: {k: round(float(v), 4) for k, v in zip(LOOK_KEYS, row)} for s, row in zip(STYLES, values)}


def main() -> None:
    cosine = style_text_cosine()
    looks = derive_looks(cosine)
    table = {
        "about": "Canvas-mini style looks, derived by cuig_lightning/canvas_mini/looks.py from the causal MiniLM "
        "in-prompt states of the style names (classical MDS, mixed with a per-style random draw).",
        "meaning": MEANING,
        "seed": SEED,
        "styles": looks,
    }
    LOOKS_PATH.parent.mkdir(parents=True, exist_ok=True)
    LOOKS_PATH.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {LOOKS_PATH} ({len(looks)} styles)")


if __name__ == "__main__":
    main()
