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
   accuracy (mean over the seeds; also per seed);

and the same for the objects, on the object job (``object_job``, ``object_seeds``: one seed unless given; its
runs in ``runs_dir/objects``; none of them when it is None or empty, and then its rows say "not run"):

6. sequential ConAbl on the object sequence: the first request with RA-I < 50 (due within requests 3-8);
7. simultaneous ConAbl of the 12 objects until UA >= 95: UA, RA-I (due >= 60), RA-C, steps;
8. after request 1: Pearson r between each retained object's text cosine to the target and its accuracy;
9. GradProj (``gradproj``: the paper's C, built for object requests by the callback itself) against
   sequential, same seed and learning rate: UA / RA-I / RA-C per request; it holds when GradProj's RA-I after
   the last request both runs have exceeds sequential's while its UA stays within 5 of sequential's.

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

from cuig_lightning.canvas_mini import looks
from cuig_lightning.canvas_mini.classifiers import DEFAULT_DIR
from cuig_lightning.canvas_mini.instrument_measures import (_base_check, _style_probability, compare_gradproj,
                                                            key_value_drift, look_meaning, mantel_p,
                                                            sequential_summary, similarity_after_request_1,
                                                            text_cosine_to)
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
        own_seed = _own_seed(configs)
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
        trainer = {**trainer, **section,
                   "evaluation": {**trainer.get("evaluation", {}), **section.get("evaluation", {})}}
    return trainer


def _own_seed(configs: list[str]) -> int | None:
    return yaml.safe_load(Path(configs[0]).read_text()).get("seed_everything")


def _job_settings(configs: list[str]) -> tuple[list[str], list[str], dict, str]:
    """The targets, retained concepts of their domain (``retain_styles`` or ``retain_objects``), evaluation settings
    and domain (the first request's) of a job given as a base config plus overlays."""
    trainer = _trainer_section(configs)
    domain = trainer["requests"][0].get("domain", "style")
    ev = trainer["evaluation"]
    return [r["target"] for r in trainer["requests"]], ev[f"retain_{domain}s"], ev, domain


def _training_rate(configs: list[str]) -> dict:
    """What sets the learning rate of a base config plus overlays (the last config that sets each key wins)."""
    rate: dict = {}
    for config in configs:
        model = yaml.safe_load(Path(config).read_text()).get("model") or {}
        rate.update({k: model[k] for k in ("learning_rate", "scale_lr") if k in model})
    return rate


def _plan(configs: list[str], simultaneous: str, runs: Path, seeds: list[int], stop_after_collapse: bool,
          model: str, through: set) -> dict:
    """One domain's runs: sequential per seed (ended once RA-I < 50 unless its seed is in ``through``) and
    simultaneous with the first seed."""
    plan: dict = {s: dict(configs=configs, run_dir=runs / "sequential" / f"seed{s}", seed=s, model=model,
                          stop_after_collapse=stop_after_collapse and s not in through) for s in seeds}
    plan["simultaneous"] = dict(configs=[*configs, simultaneous], run_dir=runs / "simultaneous" / f"seed{seeds[0]}",
                                seed=seeds[0], model=model)  # fmt: skip
    return plan


def _summary(fits: dict, configs: list[str], seeds: list[int], cosine=None) -> dict:
    """A domain's checks 3-5 (6-8) from its runs (``fits``: the plan's keys -> (rows, wall minutes))."""
    targets, retain, _, domain = _job_settings(configs)
    sim_rows, sim_wall = fits["simultaneous"]
    sequential = {s: fits[s] for s in seeds}
    return {
        "sequential": sequential_summary(sequential),
        "simultaneous": {**{k: sim_rows[-1].get(k) for k in ("UA", "RA_I", "RA_C", "drift_rel", "steps")},
                         "wall_minutes": round(sim_wall, 1)},
        "similarity_after_request_1": similarity_after_request_1([sequential[s][0][0] for s in seeds], targets[0],
                                                                 retain, domain, cosine),
    }  # fmt: skip


def _object_checks(fits: dict, object_job: list[str], gradproj: str, seeds: list[int]) -> dict:
    """Checks 6-9 (the report's ``objects`` section) from the object runs; GradProj against sequential on the
    first seed."""
    rows = {key: r for key, (r, _) in fits.items()}
    return {"job": object_job, "seeds": seeds, **_summary(fits, object_job, seeds),
            "gradproj": {"overlay": gradproj, "seed": seeds[0], "targets": _job_settings(object_job)[0],
                         **_training_rate(object_job), **compare_gradproj(rows["gradproj"], rows[seeds[0]])}}


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
    object_job: list[str] | None = ["configs/seq12_object.yaml"],
    gradproj: str = "configs/canvas_mini/gradproj.yaml",
    object_seeds: list[int] | None = None,
) -> dict:
    """Run the instrument checks (styles, then objects) and write the report.

    Args:
        job: the main job's config, plus overlays (e.g. ``configs/paper/validation.yaml`` for the validation split).
        simultaneous: overlay that erases all the targets at once (trained until UA >= 95, ``max_steps`` the cap);
            used for the style and the object job.
        seeds: seeds of the sequential runs (and of the similarity check); the main job's own seed is 42.
        runs_dir: where the jobs' run folders go (reused when finished); the object job's in ``runs_dir/objects``.
        output: the Markdown report (a ``.json`` with the same numbers is written beside it).
        base_seeds: sampling seeds of the base-model check.
        jobs: ``cuig fit`` processes at once (each with ``cores / jobs`` threads; wall times are then under load).
        stop_after_collapse: the sequential runs of seeds other than the job's own end once RA-I < 50 (checks 3,
            5, 6 and 8 read nothing later); the job's own seed always runs every request (its curve, its wall
            time), and so does the object run GradProj is compared with.
        model: the base model (``canvas-mini`` or a model folder, e.g. a pretraining checkpoint's ``model/``): a world
            variant is checked by pointing every job, the base check and the damage measure at it.
        object_job: the object job's config, plus overlays (its requests all object requests); None or empty: no
            object checks (their rows say "not run").
        gradproj: overlay adding Gradient Projection to the object job (the paper's object C); it must not change
            the learning rate: GradProj is compared with sequential unlearning at the same one.
        object_seeds: seeds of the object job's sequential runs and similarity check (None: the first of
            ``seeds``); the simultaneous and GradProj runs use the first.
    """
    from cuig_lightning.models.diffusion import DiffusionModel

    DiffusionModel.from_pretrained(model)  # a missing or broken model folder: one error before any job starts
    object_job, object_seeds = list(object_job or []), list(object_seeds or seeds[:1])
    targets, retain, ev, domain = _job_settings(job)
    if domain != "style" or (object_job and _job_settings(object_job)[3] != "object"):
        raise ValueError("job must be a style job and object_job an object job")
    if object_job and _training_rate([*object_job, gradproj]) != _training_rate(object_job):
        raise ValueError(f"{gradproj} changes the learning rate; GradProj is compared at the object job's own")
    runs = Path(runs_dir)
    report: dict = {"job": job, "seeds": list(seeds), "jobs": jobs, "model": model}

    report["classifiers"] = {k: json.loads((DEFAULT_DIR / f"{k}.json").read_text())["held_out"]
                             for k in ("style", "object")}  # fmt: skip

    cosine = looks.style_text_cosine()
    report["look_meaning"] = look_meaning(cosine)

    plan = {("style", k): run for k, run in
            _plan(job, simultaneous, runs, seeds, stop_after_collapse, model, {_own_seed(job)}).items()}
    if object_job:
        through = {_own_seed(object_job), object_seeds[0]}  # GradProj's comparison runs every request
        objects = _plan(object_job, simultaneous, runs / "objects", object_seeds, stop_after_collapse, model, through)
        objects["gradproj"] = dict(configs=[*object_job, gradproj], seed=object_seeds[0], model=model,
                                   run_dir=runs / "objects" / "gradproj" / f"seed{object_seeds[0]}")
        plan.update({("object", k): run for k, run in objects.items()})
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    if threads:
        torch.set_num_threads(threads)  # the base check runs in this process, beside the fits
    with ThreadPoolExecutor(jobs) as pool:
        base = pool.submit(_base_check, runs / "base.json", base_seeds, ev.get("steps", 20), ev.get("guidance", 1.5),
                           model)  # fmt: skip
        futures = {key: pool.submit(_fit, threads=threads, **run) for key, run in plan.items()}
        fits = {key: f.result() for key, f in futures.items()}
        report["base"] = base.result()
    report.update(_summary({k: v for (d, k), v in fits.items() if d == "style"}, job, seeds, cosine))
    report["objects"] = _object_checks({k: v for (d, k), v in fits.items() if d == "object"}, object_job, gradproj,
                                       object_seeds) if object_job else None  # fmt: skip

    run_dirs = [plan["style", s]["run_dir"] for s in seeds]
    cos = text_cosine_to(targets[0], retain, "style", cosine)
    probability = _style_probability(runs / "request1_probability.json", run_dirs, retain, ev["retain_objects"],
                                     ev.get("steps", 20), ev.get("guidance", 1.5), model=model)
    drop = torch.tensor(probability["base"]) - torch.tensor(list(probability["after"].values())).mean(0)
    report["similarity_after_request_1"]["probability"] = {
        **probability, "mean_drop": [round(float(d), 4) for d in drop],
        "pearson_r_drop": round(float(pearson_corrcoef(cos, drop.double())), 3) if drop.std() > 0 else None,
    }  # fmt: skip
    report["similarity_after_request_1"]["key_value_drift"] = key_value_drift(run_dirs, targets[0], retain, model)
    write_report(report, Path(output))
    return report
