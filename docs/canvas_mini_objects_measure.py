"""Measurements behind docs/canvas_mini_objects.md (not part of the package): a 20-way object classifier on the new
silhouettes over the style backgrounds, and the Mantel tests of shape vs meaning.

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
from cuig_lightning.canvas_mini.classifiers import (EVAL_NOISE, EVAL_SEED, ConceptClassifier, _gaussian_blur, augment,
                                                    predict)
from cuig_lightning.canvas_mini.instrument_measures import _image_statistics, mantel_p


def train(steps: int, seed: int = 0, batch_size: int = 128, lr: float = 3e-3, width: int = 24):
    """classifiers.train_classifier's recipe (AdamW, one-cycle, label smoothing 0.05, fresh augmented batches,
    1/49 neutral), on :func:`objects.sample_objects` (train_classifier draws world.py's objects only)."""
    torch.manual_seed(seed)
    model = ConceptClassifier(len(ob.OBJECTS), width=width, classes=ob.OBJECTS)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1,
                                                anneal_strategy="cos")
    rng, gen = np.random.default_rng([seed, 1]), torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        images, _, o_idx = ob.sample_objects(batch_size, rng, neutral_share=1 / len(world.STYLE_CLASSES))
        logits = model(augment(world.to_tensor(images), gen))
        loss = F.cross_entropy(logits, torch.from_numpy(o_idx), label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f}", flush=True)
    return model.eval(), time.perf_counter() - t0


def held_out(model, n_per_pair: int = 3):
    """Every (style class, object) pair n_per_pair times from EVAL_SEED: clean, noise 0.1, blur 0.7."""
    s = np.repeat(np.arange(len(world.STYLE_CLASSES)), len(ob.OBJECTS) * n_per_pair)
    o = np.tile(np.repeat(np.arange(len(ob.OBJECTS)), n_per_pair), len(world.STYLE_CLASSES))
    x = world.to_tensor(ob.draw_objects(s, o, EVAL_SEED))
    y = torch.from_numpy(o)
    gen = torch.Generator().manual_seed(EVAL_SEED)
    variants = {"clean": x, "noise": (x + EVAL_NOISE * torch.randn(x.shape, generator=gen)).clamp(-1, 1),
                "blur": _gaussian_blur(x, torch.full((len(x),), 0.7))}  # fmt: skip
    out = {"n_images": len(x)}
    for name, xv in variants.items():
        pred = predict(model, xv)
        out[f"acc_{name}"] = round((pred == y).float().mean().item() * 100, 2)
        if name == "clean":
            conf = np.zeros((20, 20), int)
            np.add.at(conf, (o, pred.numpy()), 1)
            off = [(int(conf[i, j]), ob.OBJECTS[i], ob.OBJECTS[j])
                   for i in range(20) for j in range(20) if i != j and conf[i, j]]
            out["confusions"] = sorted(off, reverse=True)[:8]
            out["per_object"] = {ob.OBJECTS[i]: round(conf[i, i] / conf[i].sum() * 100, 1) for i in range(20)}
    return out


def meaning(cosine: np.ndarray, model=None, n: int = 100):
    """Spearman (190 pairs) of text cosine vs visual similarity + one-sided Mantel p (999 relabellings)."""
    iu = np.triu_indices(20, 1)
    params = ob.shape_matrix()
    # neutral drawings (flat grey, dark object): the image statistics then see the shape, not the style colours
    o = np.repeat(np.arange(20), n)
    imgs = ob.draw_objects(np.full(len(o), world.NEUTRAL_INDEX), o, 12345)
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
            feats = model.features(world.to_tensor(ob.draw_objects(s, o, 777))).mean(dim=(2, 3))
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
    """objects.contact_sheet with the objects' names (and categories) written beside the rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = [*world.STYLES[::7], world.NEUTRAL]
    sheet = ob.contact_sheet(styles=styles)
    fig, ax = plt.subplots(figsize=(sheet.shape[1] / 100 + 1.6, sheet.shape[0] / 100), dpi=100)
    ax.imshow(sheet)
    step = sheet.shape[0] / len(ob.OBJECTS)
    ax.set_yticks([(i + 0.5) * step for i in range(len(ob.OBJECTS))], [f"{o} ({ob.CATEGORY[o]})" for o in ob.OBJECTS])
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
    cosine = ob.object_text_cosine()
    result = {}
    model = None
    if not args.no_train:
        model, seconds = train(args.steps)
        result["classifier"] = {"steps": args.steps, "batch_size": 128, "train_seconds": round(seconds, 1),
                                **held_out(model)}
        print(json.dumps(result["classifier"]), flush=True)
    result["meaning"] = meaning(cosine, model)
    labelled_sheet(args.sheet)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
