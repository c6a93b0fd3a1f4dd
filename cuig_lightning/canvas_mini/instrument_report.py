"""The instrument's report: ``results/instrument.md`` (each check, its target, what was measured, whether it
holds) and the same numbers as ``.json`` beside it, from what :func:`cuig_lightning.canvas_mini.instrument.instrument`
gathered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_report(report: dict, path: Path) -> None:
    b, lm, sim, r1 = report["base"], report["look_meaning"], report["simultaneous"], report["similarity_after_request_1"]
    clear = {k: v > 0 and lm["mantel_p"][k] < 0.01 for k, v in lm["spearman"].items()}  # check 2, per measure
    clf = report["classifiers"]
    firsts = [v["first_below_50"] for v in report["sequential"].values()]
    wall = next(iter(report["sequential"].values()))["wall_minutes"]
    curves = [v["RA_I"] for v in report["sequential"].values()]  # a run stopped early has fewer requests
    ra_i = [np.mean([c[k] for c in curves if k < len(c)]) for k in range(max(map(len, curves)))]
    lines = [
        "# Canvas-mini instrument checks",
        "",
        "Made by `cuig instrument` (cuig_lightning/canvas_mini/instrument.py); every number is from a real run.",
        "",
        "| check | target | measured | holds |",
        "|---|---|---|---|",
        f"| base model, full grid ({b['n_images']} images) | style ≥ 95, object ≥ 90 | style {b['style_accuracy']}, "
        f"object {b['object_accuracy']}, neutral {b['neutral_accuracy']} | "
        f"{'yes' if b['style_accuracy'] >= 95 and b['object_accuracy'] >= 90 else 'no'} |",
        f"| classifiers, held-out drawings (clean / noise / blur) | ≥ 98 | style "
        + " / ".join(f"{100 * clf['style'][k]:.1f}" for k in ("acc_clean", "acc_noise", "acc_blur"))
        + ", object " + " / ".join(f"{100 * clf['object'][k]:.1f}" for k in ("acc_clean", "acc_noise", "acc_blur"))
        + f" | {'yes' if min(clf[c]['acc_clean'] for c in clf) >= 0.98 else 'no'} |",
        f"| look follows meaning: Spearman(text cosine, visual similarity), {lm['pairs']} style pairs (Mantel p over "
        "style relabellings) | clearly > 0 (p < 0.01) | "
        + ", ".join(f"{k.replace('_', ' ')} {v} (p {lm['mantel_p'][k]:.3g})" for k, v in lm["spearman"].items())
        + f" | {'yes' if all(clear.values()) else 'partly' if any(clear.values()) else 'no'} |",
        f"| the main job's wall time (seed {next(iter(report['sequential']))}, {report['jobs']} job(s) at once) | ≤ 10 min | "
        + (f"{wall} min | {'yes' if wall <= 10 else 'no'} |" if wall == wall else "not timed (the run was not started by "
           "`cuig instrument`) | – |"),
        f"| sequential ConAbl: first request with RA-I < 50 (seeds {', '.join(report['sequential'])}) | 3-6 | "
        f"{', '.join(str(f) for f in firsts)} | {'yes' if all(f is not None and 3 <= f <= 6 for f in firsts) else 'no'} |",
        f"| simultaneous ConAbl, all 12 targets, trained until UA ≥ 95 | UA ≥ 95, RA-I ≥ 60, RA-C ≥ 80 | UA {sim['UA']:.1f}, "
        f"RA-I {sim['RA_I']:.1f}, RA-C {sim['RA_C']:.1f} after {sim.get('steps') or '?'} steps | "
        f"{'yes' if sim['UA'] >= 95 and sim['RA_I'] >= 60 and sim['RA_C'] >= 80 else 'no'} |",
        f"| after request 1 ({r1['target']}): Pearson r(text cosine to target, accuracy), 12 retained styles | ≤ -0.5 | "
        + (f"{r1['pearson_r']} (per seed {r1['per_seed_r']})" if r1["pearson_r"] is not None else
           "undefined: every retained style kept the same accuracy (no damage to correlate)")
        + f" | {'yes' if r1['pearson_r'] is not None and r1['pearson_r'] <= -0.5 else 'no'} |",
        "",
        "Sequential RA-I after each request (mean over the seeds that reached it): " + ", ".join(f"{v:.0f}" for v in ra_i),
        "",
        "Closest 10% of style pairs by text cosine: share agreeing on each look attribute (|Δ| < 0.15): "
        + ", ".join(f"{k} {v}" for k, v in lm["attribute_agreement"].items()),
        "",
        "After request 1, retained styles (text cosine to the target → accuracy, mean over seeds): "
        + ", ".join(f"{s} {v['cosine']} → {v['accuracy']}" for s, v in sorted(r1["styles"].items(), key=lambda x: -x[1]["cosine"])),
        "",
    ]  # fmt: skip
    prob = r1.get("probability")
    if prob:
        lines += [
            "A finer damage measure: the style classifier's mean probability of the prompted style (seeds "
            f"{', '.join(map(str, prob['seeds']))}), base → after request 1 (mean over the runs); "
            f"Pearson r(text cosine, drop) = {prob['pearson_r_drop']}: "
            + ", ".join(f"{s} {b:.3f} → {b - d:.3f}" for s, b, d in zip(r1["styles"], prob["base"], prob["mean_drop"])),
            "",
        ]
    kv = r1.get("key_value_drift")
    if kv:
        retained = list(kv["retained"].values())
        lines += [
            "The mechanism, without sampling: after request 1, key/value drift ‖ΔW·c‖ / ‖W0·c‖ of each name's in-prompt "
            f"token states (mean over the attn2 to_k/to_v layers and {kv['runs']} runs): target {kv['target']}, retained "
            f"{min(retained)}–{max(retained)} (mean {np.mean(retained):.4f}); Pearson r(text cosine, drift) over the "
            f"retained styles = {kv['pearson_r']}: "
            + ", ".join(f"{s} {d}" for s, d in sorted(kv["retained"].items(), key=lambda x: -x[1])),
            "",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))
