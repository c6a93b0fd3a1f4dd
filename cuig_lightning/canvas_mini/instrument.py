"""The instrument checks of Canvas-mini: is the world fit to measure the paper's effects?

Runs (or reuses) the real jobs behind each check, then writes ``results/instrument.md`` (+ ``.json``):

1. base model over the full grid (every style class x every object x 2 seeds): style / object /
   neutral accuracy, and the classifiers' held-out accuracies (from their JSON);
2. look follows meaning: Spearman correlation, over all style pairs, between the names' text cosine
   (the in-prompt token states the UNet sees) and their visual similarity (cosine of the style
   classifier's mean penultimate features over fresh drawings), and for the most similar 10% of
   pairs the share that agree on each look attribute (none may be shared by all of them);
3. sequential ConAbl on the reported sequence (``seeds``): the first request with RA-I < 50;
4. simultaneous ConAbl (all 12 targets from the base model at once, trained until UA >= 95 by the
   overlay's ``trainer.until_ua``): UA, RA-I, RA-C and the steps it took;
5. after request 1: Pearson r between each retained style's text cosine to the target and its
   accuracy (mean over the seeds; also per seed).

Each job is an ordinary ``cuig fit`` in ``runs_dir`` (resumable; a finished one is only read).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

from cuig_lightning.canvas_mini import looks, world
from cuig_lightning.canvas_mini.classifiers import DEFAULT_DIR, EVAL_SEED, load_classifier
from cuig_lightning.checkpoints import DELTA


POLL_SECONDS = 5.0  # how often a running job's metrics.json is read


def _collapsed(rows: list[dict]) -> bool:
    return any(r["RA_I"] < 50 for r in rows)


def _fit(configs: list[str], run_dir: Path, seed: int, threads: int | None = None,
         stop_after_collapse: bool = False, model: str = "canvas-mini") -> tuple[list[dict], float]:
    """Run (or reuse) one ``cuig fit``: its per-request metric rows and its wall time in minutes (whole process:
    model loading, anchor generation, training, evaluation; measured when it ran, kept beside the run folder).

    The job's own ``seed_everything`` runs the job exactly as configured; another seed also becomes the data
    seed (anchor images and the training stream), so that the runs really differ. ``stop_after_collapse``:
    end the job once a request's RA-I < 50 is written (no check reads the later requests); a folder whose
    ``metrics.json`` shows that, or a finished job, is reused as it is."""
    metrics, clock = run_dir / "metrics.json", run_dir.parent / f"{run_dir.name}.wall_seconds"
    rows = lambda: json.loads(metrics.read_text()) if metrics.is_file() else []  # noqa: E731
    done = rows()
    if len(done) < _planned_requests(configs) and not (stop_after_collapse and _collapsed(done)):
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        own_seed = yaml.safe_load(Path(configs[0]).read_text()).get("seed_everything")
        cmd = [sys.executable, "-m", "cuig_lightning", "fit", *(a for c in configs for a in ("--config", c)),
               "--trainer.run_dir", str(run_dir), "--seed_everything", str(seed),
               *([] if seed == own_seed else ["--data.seed", str(seed)]),
               *([] if model == "canvas-mini" else ["--model.model_path", model])]  # fmt: skip
        print("$", " ".join(cmd[2:]), flush=True)
        t0 = time.perf_counter()
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
            job, stopped = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), False
            while job.poll() is None:
                time.sleep(POLL_SECONDS)
                if stop_after_collapse and _collapsed(rows()):
                    job.terminate()  # the folder stays resumable: a later run picks up where this one stopped
                    job.wait()
                    stopped = True
            if job.returncode and not stopped:
                raise subprocess.CalledProcessError(job.returncode, cmd)
        if not stop_after_collapse:
            clock.write_text(f"{time.perf_counter() - t0:.1f}\n")
    wall = float(clock.read_text()) / 60 if clock.is_file() else float("nan")
    return rows(), wall


def _planned_requests(configs: list[str]) -> int:
    """How many metric rows the finished job has: one per request, one for a simultaneous stage."""
    trainer = _trainer_section(configs)
    return 1 if trainer.get("schedule") == "simultaneous" else len(trainer["requests"])


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


def _trainer_section(configs: list[str]) -> dict:
    """The ``trainer`` section of a base config plus overlays (the evaluation merged key by key)."""
    trainer: dict = {}
    for config in configs:
        section = yaml.safe_load(Path(config).read_text()).get("trainer", {})
        trainer = {**trainer, **section, "evaluation": {**trainer.get("evaluation", {}), **section.get("evaluation", {})}}
    return trainer


def _job_settings(configs: list[str]) -> tuple[list[str], list[str], dict]:
    """The targets, retain styles and evaluation settings of a job given as a base config plus overlays."""
    trainer = _trainer_section(configs)
    return [r["target"] for r in trainer["requests"]], trainer["evaluation"]["retain_styles"], trainer["evaluation"]


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
        per_run.append(torch.stack([drift_ratios(trained[k].float(), start[k].float(), states) for k in layers]).mean(0))
    drift = torch.stack(per_run).mean(0).double()
    unit = torch.nn.functional.normalize(states.double(), dim=-1)
    cos = unit[1:] @ unit[0]
    return {"target": round(float(drift[0]), 4), "retained": {r: round(float(d), 4) for r, d in zip(retain, drift[1:])},
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
                    seconds=round(time.perf_counter() - t0, 1), per_style=res["per_style"], per_object=res["per_object"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(base, indent=2) + "\n")
    return json.loads(path.read_text())


def instrument(
    job: list[str] = ["configs/seq12.yaml"],
    simultaneous: str = "configs/canvas_mini/simultaneous.yaml",
    seeds: list[int] = [42, 43, 44],
    runs_dir: str = "runs/instrument",
    output: str = "results/instrument.md",
    base_seeds: list[int] = [188, 288],
    jobs: int = 1,
    stop_after_collapse: bool = True,
    model: str = "canvas-mini",
) -> dict:
    """Run the instrument checks and write the report.

    Args:
        job: the main job's config, plus overlays (e.g. ``configs/paper/validation.yaml`` for the validation split).
        simultaneous: overlay that erases all the targets at once (trained until UA >= 95, ``max_steps`` the cap).
        seeds: seeds of the sequential runs (and of the similarity check); the main job's own seed is 42.
        runs_dir: where the jobs' run folders go (reused when finished).
        output: the Markdown report (a ``.json`` with the same numbers is written beside it).
        base_seeds: sampling seeds of the base-model check.
        jobs: ``cuig fit`` processes at once (each with ``cores / jobs`` threads; wall times are then under load).
        stop_after_collapse: the sequential runs of seeds other than the job's own end once RA-I < 50 (checks 3
            and 5 read nothing later); the job's own seed always runs every request (its curve, its wall time).
        model: the base model (``canvas-mini`` or a model folder, e.g. a pretraining checkpoint's ``model/``): a world
            variant is checked by pointing every job, the base check and the damage measure at it.
    """
    from cuig_lightning.models.diffusion import DiffusionModel

    DiffusionModel.from_pretrained(model)  # a missing or broken model folder: one error before any job starts
    targets, retain, ev = _job_settings(job)
    runs = Path(runs_dir)
    report: dict = {"job": job, "seeds": list(seeds), "jobs": jobs, "model": model}

    report["classifiers"] = {k: json.loads((DEFAULT_DIR / f"{k}.json").read_text())["held_out"] for k in ("style", "object")}

    cosine = looks.style_text_cosine()
    report["look_meaning"] = look_meaning(cosine)

    own_seed = yaml.safe_load(Path(job[0]).read_text()).get("seed_everything")
    plan = {s: dict(configs=job, run_dir=runs / "sequential" / f"seed{s}", seed=s,
                    stop_after_collapse=stop_after_collapse and s != own_seed, model=model) for s in seeds}
    plan["simultaneous"] = dict(configs=[*job, simultaneous], run_dir=runs / "simultaneous" / f"seed{seeds[0]}",
                                seed=seeds[0], model=model)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    if threads:
        torch.set_num_threads(threads)  # the base check runs in this process, beside the fits
    with ThreadPoolExecutor(jobs) as pool:
        base = pool.submit(_base_check, runs / "base.json", base_seeds, ev.get("steps", 20), ev.get("guidance", 1.5), model)
        futures = {key: pool.submit(_fit, threads=threads, **run) for key, run in plan.items()}
        fits = {key: f.result() for key, f in futures.items()}
        report["base"] = base.result()
    sim_rows, sim_wall = fits.pop("simultaneous")
    seq = {s: rows for s, (rows, _) in fits.items()}
    report["sequential"] = {
        str(s): {"RA_I": [r["RA_I"] for r in rows], "UA": [r["UA"] for r in rows], "RA_C": [r["RA_C"] for r in rows],
                 "first_below_50": next((r["request"] for r in rows if r["RA_I"] < 50), None),
                 "wall_minutes": round(wall, 1)}
        for s, (rows, wall) in fits.items()
    }  # fmt: skip
    report["simultaneous"] = {**{k: sim_rows[-1].get(k) for k in ("UA", "RA_I", "RA_C", "drift_rel", "steps")},
                              "wall_minutes": round(sim_wall, 1)}  # fmt: skip

    index = {s: i for i, s in enumerate(world.STYLES)}
    cos = torch.tensor([cosine[index[targets[0]], index[r]] for r in retain])
    acc = torch.tensor([[seq[s][0]["per_concept"]["retain"][r] for r in retain] for s in seeds], dtype=torch.float64)
    per_seed = [round(float(pearson_corrcoef(cos.double(), a)), 3) if a.std() > 0 else None for a in acc]
    mean_acc = acc.mean(0)
    report["similarity_after_request_1"] = {
        "target": targets[0], "pearson_r": round(float(pearson_corrcoef(cos.double(), mean_acc)), 3) if mean_acc.std() > 0 else None,
        "per_seed_r": per_seed,
        "styles": {r: {"cosine": round(float(c), 3), "accuracy": round(float(a), 1)} for r, c, a in zip(retain, cos, mean_acc)},
    }  # fmt: skip
    probability = _style_probability(runs / "request1_probability.json", [plan[s]["run_dir"] for s in seeds], retain,
                                     ev["retain_objects"], ev.get("steps", 20), ev.get("guidance", 1.5), model=model)
    drop = torch.tensor(probability["base"]) - torch.tensor(list(probability["after"].values())).mean(0)
    report["similarity_after_request_1"]["probability"] = {
        **probability, "mean_drop": [round(float(d), 4) for d in drop],
        "pearson_r_drop": round(float(pearson_corrcoef(cos.double(), drop.double())), 3) if drop.std() > 0 else None,
    }  # fmt: skip
    report["similarity_after_request_1"]["key_value_drift"] = key_value_drift(
        [plan[s]["run_dir"] for s in seeds], targets[0], retain, model)
    write_report(report, Path(output))
    return report


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
