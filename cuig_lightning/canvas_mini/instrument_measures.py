"""The instrument's measurements beside the jobs (:mod:`cuig_lightning.canvas_mini.instrument` runs the jobs and
gathers them): whether a style's look follows its name's meaning (with a Mantel test), the base model over the
full grid, the summaries of a domain's runs (sequential curves, similarity after request 1, for styles and for
objects alike; GradProj against sequential), and two finer measures of request 1's damage to the styles, the
style probability and the key/value drift (style-only: they need a style to prompt)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

from cuig_lightning.canvas_mini import looks, objects, world
from cuig_lightning.canvas_mini.classifiers import EVAL_SEED, load_classifier
from cuig_lightning.checkpoints import DELTA


def _image_statistics(images: np.ndarray) -> np.ndarray:
    """A generic look descriptor of a set of drawings: colour percentiles (10/50/90 per channel, weight 2) and
    the grey-level power spectrum binned by radius (7) and orientation (6), each normalised."""
    x = images.astype(np.float32) / 255
    grey = x.mean(-1)
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean((1, 2), keepdims=True)), axes=(1, 2))).mean(0)
    yy, xx = np.mgrid[-16:16, -16:16]
    radius, angle = np.hypot(yy, xx), np.mod(np.arctan2(yy, xx), np.pi)
    radial = np.array([power[(radius >= k) & (radius < k + 2)].sum() for k in range(2, 16, 2)])
    angular = np.array([power[(radius > 2) & (angle >= k * np.pi / 6) & (angle < (k + 1) * np.pi / 6)].sum()
                        for k in range(6)])  # fmt: skip
    colour = np.percentile(x.reshape(-1, 3), [10, 50, 90], axis=0).ravel()
    return np.concatenate([2 * colour, radial / radial.sum(), angular / angular.sum()])


def mantel_p(similarity: np.ndarray, text: np.ndarray, permutations: int = 999, seed: int = 0) -> float:
    """One-sided Mantel test of the Spearman correlation between two symmetric style-pair matrices: the share of
    random relabellings of the styles (``similarity``'s rows and columns permuted together, ``permutations`` of
    them, the observed labelling counted once) whose correlation reaches the observed one. The pairs share
    styles, so they are not independent samples; relabelling the styles keeps that structure."""
    n = len(text)
    iu = np.triu_indices(n, 1)

    def ranks(v: np.ndarray) -> np.ndarray:
        out = np.empty(len(v))
        out[np.argsort(v, kind="stable")] = np.arange(len(v))
        return out

    t = ranks(text[iu])
    t = (t - t.mean()) / t.std()
    ranked = np.zeros((n, n))
    ranked[iu] = ranks(similarity[iu])  # relabelling permutes the pairs' values: their ranks stay valid
    ranked += ranked.T

    def correlation(matrix: np.ndarray) -> float:
        v = matrix[iu]
        return float((((v - v.mean()) / v.std()) * t).mean())

    observed = correlation(ranked)
    rng = np.random.default_rng(seed)
    hits = sum(correlation(ranked[np.ix_(p, p)]) >= observed for p in (rng.permutation(n) for _ in range(permutations)))
    return (1 + hits) / (1 + permutations)


def look_meaning(cosine: np.ndarray, n_per_class: int = 4) -> dict:
    """Spearman correlation, over all style pairs, between the names' text cosine and three visual similarities:
    of the look parameters (minus their distance, hues and angle circular), of generic image statistics
    (minus the distance of standardised :func:`_image_statistics`), and of the style classifier's mean
    penultimate features (cosine), each with its Mantel permutation p-value (:func:`mantel_p`); plus, for the
    closest 10% of pairs by text, the share that agree on each look attribute (|difference| < 0.15)."""
    iu = np.triu_indices(len(world.STYLES), 1)
    text = torch.tensor(cosine[iu])
    table = world.load_looks()
    values = np.array([[table[s][k] for k in world.LOOK_KEYS] for s in world.STYLES])
    delta = np.abs(values[:, None] - values[None])
    for j, key in enumerate(world.LOOK_KEYS):
        if key.startswith("hue") or key == "angle":  # circular
            delta[..., j] = np.minimum(delta[..., j], 1 - delta[..., j])
    images, style_idx, _ = world.make_dataset(n_per_class, seed=EVAL_SEED, styles=world.STYLES)
    stats = np.stack([_image_statistics(images[style_idx == i]) for i in range(len(world.STYLES))])
    stats = (stats - stats.mean(0)) / (stats.std(0) + 1e-6)
    with torch.no_grad():
        feats = load_classifier("style").features(world.to_tensor(images)).mean(dim=(2, 3))
    means = torch.stack([feats[torch.from_numpy(style_idx == i)].mean(0) for i in range(len(world.STYLES))])
    means = torch.nn.functional.normalize(means - means.mean(0), dim=-1)
    similarities = {
        "look_parameters": -np.sqrt((delta**2).sum(-1)),
        "image_statistics": -np.linalg.norm(stats[:, None] - stats[None], axis=-1),
        "classifier_features": (means @ means.T).numpy(),
    }
    close = np.argsort(-cosine[iu])[: len(text) // 10]
    return {
        "spearman": {k: round(float(spearman_corrcoef(torch.tensor(v[iu]), text)), 3) for k, v in similarities.items()},
        "mantel_p": {k: mantel_p(v, cosine) for k, v in similarities.items()},
        "pairs": len(text),
        "closest_pairs": len(close),
        "attribute_agreement": {k: round(float((delta[..., j][iu][close] < 0.15).mean()), 3)
                                for j, k in enumerate(world.LOOK_KEYS)},  # fmt: skip
    }


def _style_probability(path: Path, run_dirs: list[Path], retain: list[str], objects: list[str], steps: int,
                       guidance: float, seeds: tuple[int, ...] = (188, 288, 588), model: str = "canvas-mini") -> dict:
    """A finer damage measure than accuracy (kept in ``path``): per retained style, the style classifier's mean
    probability of the prompted style over ``retain x objects x seeds``, for the base model and after request 1
    of each run. Shows whether damage follows similarity where no image changes its label."""
    from safetensors.torch import load_file

    from cuig_lightning.evaluation.protocol import Evaluation
    from cuig_lightning.models.diffusion import DiffusionModel

    if not path.is_file():
        evaluation = Evaluation(seeds=list(seeds), steps=steps, guidance=guidance)
        model = DiffusionModel.from_pretrained(model)
        base = {k: v.clone() for k, v in model.unet.state_dict().items()}
        pairs = [(s, o) for s in retain for o in objects]
        clf = evaluation.classifiers
        prompted = torch.tensor([clf.styles.index(s) for s, _ in pairs] * len(seeds))

        def probability(delta: dict | None) -> list[float]:
            model.unet.load_state_dict({**base, **(delta or {})})
            p = clf.style_probabilities(evaluation.generate(model, pairs))
            p = p[torch.arange(len(prompted)), prompted].reshape(len(seeds), len(retain), len(objects))
            return [round(float(v), 4) for v in p.mean((0, 2))]

        result = {"seeds": list(seeds), "base": probability(None),
                  "after": {d.name: probability(load_file(str(next((d / "requests").glob("01-*")) / DELTA)))
                            for d in run_dirs}}  # fmt: skip
        path.write_text(json.dumps(result, indent=2) + "\n")
    return json.loads(path.read_text())


def key_value_drift(run_dirs: list[Path], target: str, retain: list[str], model: str = "canvas-mini") -> dict:
    """The mechanism behind check 5, without sampling: after request 1 of each run, how far the cross-attention
    keys and values of each name's in-prompt token states (``concept_embeddings``) moved, ‖ΔW·c‖ / ‖W0·c‖
    (:func:`callbacks.key_value_drift.drift_ratios`), mean over the attn2 to_k / to_v layers and the runs: the
    target's, each retained style's, and Pearson r between the retained styles' text cosine to the target (of
    the same states, as :func:`looks.style_text_cosine`) and their drift."""
    from safetensors.torch import load_file

    from callbacks.key_value_drift import drift_ratios
    from cuig_lightning.models.diffusion import DiffusionModel

    diffusion = DiffusionModel.from_pretrained(model)
    start = diffusion.unet.state_dict()
    with torch.no_grad():
        states = diffusion.concept_embeddings([target, *retain], "style")
    per_run = []
    for run_dir in run_dirs:
        trained = load_file(str(next((run_dir / "requests").glob("01-*")) / DELTA))
        layers = [k for k in trained if ".attn2.to_k." in k or ".attn2.to_v." in k]
        per_run.append(torch.stack([drift_ratios(trained[k].float(), start[k].float(), states)
                                    for k in layers]).mean(0))
    drift = torch.stack(per_run).mean(0).double()
    unit = torch.nn.functional.normalize(states.double(), dim=-1)
    cos = unit[1:] @ unit[0]
    return {"target": round(float(drift[0]), 4),
            "retained": {r: round(float(d), 4) for r, d in zip(retain, drift[1:])},
            "pearson_r": round(float(pearson_corrcoef(cos, drift[1:])), 3) if drift[1:].std() > 0 else None,
            "runs": len(run_dirs)}  # fmt: skip


def _base_check(path: Path, seeds: list[int], steps: int, guidance: float, model: str = "canvas-mini") -> dict:
    """The base model over the full grid (kept in ``path``, like the runs: it takes minutes)."""
    from cuig_lightning.evaluation.protocol import Evaluation
    from cuig_lightning.models.diffusion import DiffusionModel

    if not path.is_file():
        t0 = time.perf_counter()
        evaluation = Evaluation(seeds=list(seeds), steps=steps, guidance=guidance)
        res = evaluation.base_accuracy(DiffusionModel.from_pretrained(model))
        base = {k: round(res[k], 2) for k in ("style_accuracy", "object_accuracy", "neutral_accuracy")}
        base.update(n_images=res["n_images"], seeds=list(seeds), steps=steps, guidance=guidance,
                    seconds=round(time.perf_counter() - t0, 1), per_style=res["per_style"],
                    per_object=res["per_object"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(base, indent=2) + "\n")
    return json.loads(path.read_text())


def sequential_summary(fits: dict[int, tuple[list[dict], float]]) -> dict:
    """Per seed (``{seed: (metric rows, wall minutes)}``): the UA / RA-I / RA-C curves, the first request with
    RA-I < 50 (None: none) and the wall time."""
    return {
        str(s): {"RA_I": [r["RA_I"] for r in rows], "UA": [r["UA"] for r in rows], "RA_C": [r["RA_C"] for r in rows],
                 "first_below_50": next((r["request"] for r in rows if r["RA_I"] < 50), None),
                 "wall_minutes": round(wall, 1)}
        for s, (rows, wall) in fits.items()
    }  # fmt: skip


def text_cosine_to(target: str, names: list[str], domain: str, cosine: np.ndarray | None = None) -> torch.Tensor:
    """Each of ``names``' text cosine to ``target`` (float64), from the cosine matrix of the domain's concepts as
    the UNet sees them: :func:`looks.style_text_cosine` (rows in :data:`world.STYLES` order) for ``style``,
    :func:`objects.object_text_cosine` (:data:`world.GLYPHS`: objects, then categories) for ``object``;
    ``cosine``: that matrix, when already at hand."""
    order = {"style": world.STYLES, "object": world.GLYPHS}[domain]
    if cosine is None:
        cosine = looks.style_text_cosine() if domain == "style" else objects.object_text_cosine()
    index = {n: i for i, n in enumerate(order)}
    return torch.tensor([cosine[index[target], index[n]] for n in names], dtype=torch.float64)


def similarity_after_request_1(first_rows: list[dict], target: str, retain: list[str], domain: str,
                               cosine: np.ndarray | None = None) -> dict:
    """Whether request 1's damage follows text similarity: Pearson r between each retained concept's text cosine
    to the target and its accuracy after request 1 (``first_rows``: each run's first metrics row, whose
    ``per_concept["retain"]`` holds the in-domain retained concepts' accuracies), of the mean over the runs and
    per run (None where every retained concept kept the same accuracy). ``domain`` and ``cosine``: as
    :func:`text_cosine_to`'s."""
    cos = text_cosine_to(target, retain, domain, cosine)
    acc = torch.tensor([[row["per_concept"]["retain"][r] for r in retain] for row in first_rows], dtype=torch.float64)

    def r(a: torch.Tensor) -> float | None:
        return round(float(pearson_corrcoef(cos, a)), 3) if a.std() > 0 else None

    mean_acc = acc.mean(0)
    return {"target": target, "domain": domain, "pearson_r": r(mean_acc), "per_seed_r": [r(a) for a in acc],
            "retained": {n: {"cosine": round(float(c), 3), "accuracy": round(float(a), 1)}
                         for n, c, a in zip(retain, cos, mean_acc)}}  # fmt: skip


def compare_gradproj(gradproj: list[dict], sequential: list[dict], ua_margin: float = 5.0) -> dict:
    """GradProj against sequential unlearning (same job, seed and learning rate): both runs' UA / RA-I / RA-C per
    request, and the verdict at the last request both have (``request``; their numbers there in ``compared``):
    GradProj keeps more RA-I while its UA stays within ``ua_margin`` of sequential's (matched forgetting:
    retention bought with less forgetting does not count). ``holds`` is None when the runs share no request."""
    keys = ("UA", "RA_I", "RA_C")
    curves = {"gradproj": {k: [r[k] for r in gradproj] for k in keys},
              "sequential": {k: [r[k] for r in sequential] for k in keys}}  # fmt: skip
    n = min(len(gradproj), len(sequential))
    if not n:
        return {**curves, "request": None, "ua_margin": ua_margin, "holds": None}
    g, s = gradproj[n - 1], sequential[n - 1]
    return {**curves, "request": g.get("request", n), "ua_margin": ua_margin,
            "compared": {"gradproj": {k: g[k] for k in keys}, "sequential": {k: s[k] for k in keys}},
            "holds": bool(g["RA_I"] > s["RA_I"] and g["UA"] >= s["UA"] - ua_margin)}
