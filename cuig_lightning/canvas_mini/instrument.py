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

The measurements beside the jobs are in :mod:`~cuig_lightning.canvas_mini.instrument_measures`, the report in
:mod:`~cuig_lightning.canvas_mini.instrument_report`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from torchmetrics.functional import pearson_corrcoef

from cuig_lightning.canvas_mini import looks, world
from cuig_lightning.canvas_mini.classifiers import DEFAULT_DIR
from cuig_lightning.canvas_mini.instrument_measures import (_base_check, _style_probability, key_value_drift,
                                                            look_meaning, mantel_p)
from cuig_lightning.canvas_mini.instrument_report import write_report

__all__ = ["POLL_SECONDS", "instrument", "key_value_drift", "look_meaning", "mantel_p", "write_report"]

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
