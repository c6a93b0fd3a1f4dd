"""Measurements behind docs/canvas_mini_objects.md (not part of the package): the 25-way object classifier (20 objects
and 5 category looks, over the style backgrounds) and the Mantel tests of the objects' shape vs meaning.

    OMP_NUM_THREADS=1 python docs/canvas_mini_objects_measure.py [--steps 600] [--out /tmp/objects_measure.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional import spearman_corrcoef

from cuig_lightning.canvas_mini import objects as ob
from cuig_lightning.canvas_mini import world
from cuig_lightning.canvas_mini.classifiers import EVAL_NOISE, EVAL_SEED, _gaussian_blur, predict, train_classifier
from cuig_lightning.canvas_mini.instrument_measures import _image_statistics, mantel_p


def held_out(model, n_per_pair: int = 3):
    """Every (style class, object) pair n_per_pair times from EVAL_SEED: clean, noise 0.1, blur 0.7."""
    s = np.repeat(np.arange(len(world.STYLE_CLASSES)), len(ob.GLYPHS) * n_per_pair)
    o = np.tile(np.repeat(np.arange(len(ob.GLYPHS)), n_per_pair), len(world.STYLE_CLASSES))
    x = world.to_tensor(world.draw_batch(s, o, EVAL_SEED))
    y = torch.from_numpy(o)
    gen = torch.Generator().manual_seed(EVAL_SEED)
    variants = {"clean": x, "noise": (x + EVAL_NOISE * torch.randn(x.shape, generator=gen)).clamp(-1, 1),
                "blur": _gaussian_blur(x, torch.full((len(x),), 0.7))}  # fmt: skip
    out = {"n_images": len(x)}
    for name, xv in variants.items():
        pred = predict(model, xv)
        out[f"acc_{name}"] = round((pred == y).float().mean().item() * 100, 2)
        if name == "clean":
            n = len(ob.GLYPHS)
            conf = np.zeros((n, n), int)
            np.add.at(conf, (o, pred.numpy()), 1)
            off = [(int(conf[i, j]), ob.GLYPHS[i], ob.GLYPHS[j])
                   for i in range(n) for j in range(n) if i != j and conf[i, j]]
            out["confusions"] = sorted(off, reverse=True)[:8]
            out["per_glyph"] = {ob.GLYPHS[i]: round(conf[i, i] / conf[i].sum() * 100, 1) for i in range(n)}
    return out


def meaning(cosine: np.ndarray, model=None, n: int = 100):
    """Spearman (190 pairs) of text cosine vs visual similarity + one-sided Mantel p (999 relabellings)."""
    iu = np.triu_indices(20, 1)
    params = ob.shape_matrix(names=ob.OBJECTS)  # the objects' glyphs (the categories' are measured apart)
    # neutral drawings (flat grey, dark object): the image statistics then see the shape, not the style colours
    o = np.repeat(np.arange(20), n)
    imgs = world.draw_batch(np.full(len(o), world.NEUTRAL_INDEX), o, 12345)
    ink = 1 - imgs.astype(np.float32).mean(-1) / 128  # ~1 on the object, 0 on grey
    mean_img = np.stack([ink[o == i].mean(0).ravel() for i in range(20)])
    stats = np.stack([_image_statistics(imgs[o == i]) for i in range(20)])
    stats = (stats - stats.mean(0)) / (stats.std(0) + 1e-6)
    # canonical (undeformed, centred) masks: their IoU is the shape overlap itself
    g = (np.arange(64) + 0.5) / 32 - 1
    canon = ob.shape_mask(params, np.broadcast_to(g[None, None] * 1.35, (20, 64, 64)),
                          np.broadcast_to(g[None, :, None] * 1.35, (20, 64, 64))).reshape(20, -1)  # fmt: skip
    inter = (canon[:, None] & canon[None]).sum(-1)
    union = (canon[:, None] | canon[None]).sum(-1)
    sims = {
        "shape_parameters": -np.linalg.norm(params[:, None] - params[None], axis=-1),
        "outline": -ob.outline_distance(params),
        "canonical_mask_iou": inter / union,
        "mean_image": -np.linalg.norm(mean_img[:, None] - mean_img[None], axis=-1),
        "image_statistics": -np.linalg.norm(stats[:, None] - stats[None], axis=-1),
    }
    if model is not None:
        s = np.random.default_rng(7).integers(0, len(world.STYLES), len(o))
        with torch.no_grad():
            feats = model.features(world.to_tensor(world.draw_batch(s, o, 777))).mean(dim=(2, 3))
        means = torch.stack([feats[torch.from_numpy(o == i)].mean(0) for i in range(20)])
        means = F.normalize(means - means.mean(0), dim=-1)
        sims["classifier_features"] = (means @ means.T).numpy()
    text = torch.tensor(cosine[iu])
    out = {}
    for k, v in sims.items():
        out[k] = {"spearman": round(float(spearman_corrcoef(torch.tensor(v[iu]).double(), text)), 3),
                  "mantel_p": mantel_p(v, cosine, 999)}  # fmt: skip

    def pairs(m, top):
        order = np.argsort(-m[iu] if top else m[iu])[:5]
        return [f"{ob.OBJECTS[iu[0][k]]}-{ob.OBJECTS[iu[1][k]]} {m[iu][k]:.2f}" for k in order]

    out["pairs"] = {name: {"most": pairs(m, True), "least": pairs(m, False)}
                    for name, m in (("text_cosine", cosine), ("shape_parameters", sims["shape_parameters"]),
                                    ("canonical_mask_iou", sims["canonical_mask_iou"]),
                                    ("mean_image", sims["mean_image"]))}  # fmt: skip
    cat = np.array([ob.CATEGORY[x] for x in ob.OBJECTS])
    same = (cat[:, None] == cat[None])[iu]
    out["within_vs_across_category"] = {
        k: [round(float(sims[k][iu][same].mean()), 3), round(float(sims[k][iu][~same].mean()), 3)]
        for k in ("shape_parameters", "canonical_mask_iou", "mean_image")}  # fmt: skip
    out["text_within_vs_across_category"] = [round(float(cosine[iu][same].mean()), 3),
                                              round(float(cosine[iu][~same].mean()), 3)]
    return out


def labelled_sheet(path: str) -> None:
    """objects.contact_sheet with the glyphs' names (and the objects' categories) written beside the rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = [*world.STYLES[::7], world.NEUTRAL]
    sheet = ob.contact_sheet(styles=styles)
    fig, ax = plt.subplots(figsize=(sheet.shape[1] / 100 + 1.6, sheet.shape[0] / 100), dpi=100)
    ax.imshow(sheet)
    step = sheet.shape[0] / len(ob.GLYPHS)
    labels = [f"{o} ({ob.CATEGORY[o]})" if o in ob.CATEGORY else f"{o} (category)" for o in ob.GLYPHS]
    ax.set_yticks([(i + 0.5) * step for i in range(len(ob.GLYPHS))], labels)
    step = sheet.shape[1] / len(styles)
    ax.set_xticks([(i + 0.5) * step for i in range(len(styles))], styles, rotation=45, ha="right")
    ax.tick_params(length=0, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default="/tmp/objects_measure.json")
    parser.add_argument("--no_train", action="store_true")
    parser.add_argument("--sheet", default="/tmp/objects_sheet.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cosine = ob.object_text_cosine(ob.OBJECTS)
    result = {}
    model = None
    if not args.no_train:
        model, report = train_classifier("object", steps=args.steps, half=False, progress=False)
        result["classifier"] = {"steps": args.steps, "batch_size": 128, "train_seconds": report["seconds"],
                                **held_out(model.eval())}
        print(json.dumps(result["classifier"]), flush=True)
    result["meaning"] = meaning(cosine, model)
    labelled_sheet(args.sheet)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
