"""``cuig evaluation-speed``: is a faster evaluation protocol equal to the reported one, and how much faster.

One report (``results/evaluation_speed.md`` + ``.json``) from four measurements:

* **Levers** (:func:`measure_levers`): images per second of :meth:`Evaluation.generate` on the shipped base
  model for each speed lever alone and for the chosen ones together, measured one after another in one process
  (ratios are only comparable side by side): the sampler (a multistep solver at few steps instead of DDIM),
  bf16 autocast, larger sampling batches, ``torch.compile`` of the UNet (its compile time reported apart).
* **Equality** (:func:`compare_protocols`): for every finished request of the given run folders, UA / RA-I /
  RA-C under the old protocol (DDIM 20, seeds 188, 288, 588) and the new one on the same weights, each seed
  evaluated alone: the 3-seed value is the mean of the three (every seed has the same images per concept, so
  the mean equals the pooled metric) and the old protocol's seed spread comes with it. The rule: every
  per-request difference within ``tolerance`` points.
* **Base model** over the full grid under each candidate (style and object accuracy).
* **Wall time** (:func:`time_job`, with ``time_commits``): the default job on a fresh clone of each commit with
  an empty cache, one after the other on this machine: before and after.

Resumable: each measured result ((run, request, protocol, seed), base model, timed job) is kept in
``evaluation_speed_cache.json`` beside the report, keyed by what it measured (a request by its delta's checksum, a
job by its commit, the base model by its fingerprint), so a rerun measures only what is missing. The report itself is
:mod:`cuig_lightning.benchmark.evaluation_speed_report`.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cuig_lightning.checkpoints import DELTA, atomic_write, load_tensors, read_manifest, write_json
from cuig_lightning.benchmark.evaluation_speed_report import (METRICS, describe_sampler, largest_difference,
                                                              protocol_key, render)
from cuig_lightning.evaluation.protocol import Evaluation, describe_protocol
from cuig_lightning.models.diffusion import SAMPLERS, DiffusionModel
from cuig_lightning.run_folder import RunFolder, saved_config


class Cache:
    """Measured results by key, written through to one JSON file (atomic), so an interrupted run resumes."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, measure):
        if key not in self.data:
            self.data[key] = measure()
            write_json(self.data, self.path)
        return self.data[key]


# ----------------------------------------------------------------------------------------------- equality
def load_request_weights(model: DiffusionModel, base: dict[str, torch.Tensor], folder: Path) -> dict:
    """Put a finished request's verified delta into ``model``'s UNet (on top of θ0); return its manifest."""
    manifest = read_manifest(folder, verify=True, required=(DELTA,))
    delta = load_tensors(folder / DELTA)
    params = dict(model.unet.named_parameters())
    with torch.no_grad():
        for name, tensor in base.items():
            params[name].copy_(tensor)
        for name, tensor in delta.items():
            params[name].copy_(tensor)
    return manifest


def compare_protocols(model: DiffusionModel, runs: dict[str, Path], evaluation_config: dict,
                      protocols: dict[str, dict], seeds: list[int], cache: Cache,
                      requests: dict[str, list[int]] | None = None) -> list[dict]:
    """Per run and finished request (``requests``: only these of a run), each protocol's per-seed UA / RA-I / RA-C
    on the same weights, and their means over the seeds."""
    folders = {}
    for label, run in runs.items():
        folder = RunFolder(run, saved_config(run))
        folder.check_owner()
        wanted = (requests or {}).get(label)
        folders[label] = [f for f in folder.finished_requests() if wanted is None or int(f.name.split("-")[0]) in wanted]
    params = dict(model.unet.named_parameters())
    names = {n for found in folders.values() for f in found for n in load_tensors(f / DELTA)}
    base = {n: params[n].detach().clone() for n in names}
    evaluations = {key: Evaluation(**{**evaluation_config, **protocol}, save_samples=False)
                   for key, protocol in protocols.items()}
    rows = []
    for label, found in folders.items():
        for folder in found:
            manifest = load_request_weights(model, base, folder)
            erased, domain = manifest["erased"], manifest["request"][-1]["domain"]
            row = {"run": label, "request": manifest["index"], "targets": " ".join(r["target"] for r in manifest["request"])}
            for key, evaluation in evaluations.items():
                weights = f"{label}|{manifest['files'][DELTA]}|{protocol_key(evaluation.settings())}"
                per_seed = [cache.get(f"{weights}|{seed}", lambda s=seed: _metrics(
                    evaluation.evaluate(model, erased, domain, seeds=[s]))) for seed in seeds]
                row[key] = {"per_seed": per_seed, **{m: statistics.fmean(p[m] for p in per_seed) for m in METRICS}}
            print(f"[evaluation-speed] {label} request {row['request']}: " + "; ".join(
                f"{key} " + " ".join(f"{row[key][m]:.1f}" for m in METRICS) for key in protocols), flush=True)
            rows.append(row)
    with torch.no_grad():  # θ0 again
        for name, tensor in base.items():
            params[name].copy_(tensor)
    return rows


def _metrics(result: dict) -> dict:
    return {m: float(result[m]) for m in METRICS}


# ----------------------------------------------------------------------------------------------- levers
def measure_levers(model: DiffusionModel, pairs: list[tuple[str, str]], reference: dict, candidates: list[dict],
                   chosen: dict, batch_sizes: list[int], compile_unet: bool, seeds: list[int]) -> list[dict]:
    """Images/s of ``Evaluation.generate`` for the reference protocol in fp32, each lever alone (every candidate
    sampler, bf16 autocast, other batch sizes, torch.compile) and the kept ones together (``chosen`` with bf16)."""
    base = {**reference, "bf16": False}
    variants = [("reference", base, False), ("bf16 autocast", {**base, "bf16": True}, False)]
    variants += [(f"sampler: {describe_sampler(c)}", {**base, **c}, False) for c in candidates]
    variants += [(f"batch {b}", {**base, "batch_size": b}, False) for b in batch_sizes]
    if compile_unet:
        variants.append(("torch.compile", base, True))
    variants.append((f"kept together: {describe_sampler(chosen)} + bf16", {**base, **chosen, "bf16": True}, False))
    rows, unet = [], model.unet
    for name, settings, use_compile in variants:
        evaluation = Evaluation(seeds=seeds, save_samples=False, **settings)
        compile_s = None
        if use_compile:  # compiled for the batch shape (the grid is whole batches: no other shape to compile)
            model.unet = torch.compile(unet)
            start = time.perf_counter()
            evaluation.generate(model, pairs[: evaluation.batch_size])
            compile_s = time.perf_counter() - start
        else:
            evaluation.generate(model, pairs[:8])  # warm-up (allocator, lazy inits)
        start = time.perf_counter()
        evaluation.generate(model, pairs)
        seconds = time.perf_counter() - start
        model.unet = unet
        n = len(pairs) * len(seeds)
        rows.append({"lever": name, "settings": {**settings, "compile": use_compile}, "images": n,
                     "seconds": seconds, "images_per_s": n / seconds, "compile_s": compile_s})
        print(f"[evaluation-speed] {name}: {rows[-1]['images_per_s']:.2f} images/s", flush=True)
    for row in rows:
        row["speedup"] = row["images_per_s"] / rows[0]["images_per_s"]
    return rows


# ----------------------------------------------------------------------------------------------- wall time
EVALUATION_LINE = re.compile(r"\[cuig\] request \d+ [^\n]*?\((\d+) s evaluation\)")


def commit_id(commit: str) -> str:
    """The full hash of a commit of the repository in the working directory (``HEAD`` included)."""
    return subprocess.run(["git", "rev-parse", commit], check=True, capture_output=True, text=True).stdout.strip()


def time_job(repo: Path, commit: str, config: str, scratch: Path, logs: Path) -> dict:
    """Wall time of ``cuig fit --config config`` on a fresh clone of ``commit`` with an empty anchor cache
    (what a new user runs), the evaluation seconds its log reports, and its log (stderr, not a terminal) as
    ``logs/default_job_<commit>.log`` with its line and carriage-return counts."""
    clone = scratch / f"clone-{commit}"
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", commit], check=True)
    sha = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], check=True,
                         capture_output=True, text=True).stdout.strip()
    env = {**os.environ, "CUIG_CACHE": str(scratch / f"cache-{commit}")}
    print(f"[evaluation-speed] timing the default job at {sha}", flush=True)
    measured = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    start = time.perf_counter()
    # python -m from the clone: its own package is imported (the working directory comes first on sys.path)
    done = subprocess.run([sys.executable, "-m", "cuig_lightning", "fit", "--config", config], cwd=clone, env=env,
                          capture_output=True)
    wall = time.perf_counter() - start
    log = done.stderr.decode(errors="replace")  # as written: text mode would turn the bars' "\r" into newlines
    if done.returncode != 0:
        raise RuntimeError(f"the default job at {sha} failed: {log.strip().splitlines()[-1:]}")
    metrics = json.loads((clone / "runs" / "seq12" / "metrics.json").read_text())
    shutil.rmtree(clone, ignore_errors=True)
    (logs / f"default_job_{sha}.log").write_bytes(done.stderr)
    return {"commit": sha, "measured": measured, "wall_s": wall, "evaluation_s": sum(int(s) for s in EVALUATION_LINE.findall(log)),
            "evaluation": describe_protocol(metrics[-1].get("evaluation")), "metrics": metrics,
            "log_lines": log.count("\n"), "log_carriage_returns": log.count("\r")}


def evaluation_speed(
    runs: dict[str, str] | None = None,
    requests: dict[str, list[int]] | None = None,
    job: str = "configs/seq12.yaml",
    candidates: list[dict] | None = None,
    seeds: list[int] | None = None,
    tolerance: float = 2.0,
    levers: bool = True,
    lever_images: int = 192,
    lever_batch_sizes: list[int] | None = None,
    compile_unet: bool = True,
    base_model: bool = True,
    time_commits: list[str] | None = None,
    output: str = "results",
    device: str = "cpu",
) -> None:
    """Faster evaluation protocols against the reported one on real runs, speed levers side by side, the base model.

    Args:
        runs: label -> run folder whose finished requests are evaluated under every protocol.
        requests: label -> the requests of that run to evaluate (default: every finished one).
        job: the job config whose ``trainer.evaluation`` section (retain sets, guidance) every protocol uses.
        candidates: the faster protocols (``sampler`` and ``steps`` each; default: the config's own).
        seeds: evaluation seeds of every protocol (default 188, 288, 588: the reported protocol's).
        tolerance: the equality rule's largest allowed difference (points).
        levers: measure images/s of each speed lever alone and together.
        lever_images: images each lever variant samples (the first of the default job's grid after request 4).
        lever_batch_sizes: sampling batch sizes measured as a lever (default 48 and 192).
        compile_unet: include ``torch.compile`` of the UNet among the levers.
        base_model: evaluate the base model over the full grid under every candidate (the old protocol's numbers
            are the instrument's: ``results/instrument.md``).
        time_commits: time the job (``job``, by default the default job) on a fresh clone of each of these commits of this
            repository, one after the other (e.g. ``[80cfd76, HEAD]``: before and after); run nothing else meanwhile.
        output: folder of ``evaluation_speed.md`` / ``.json`` and the cache of measured results.
        device: torch device.
    """
    import yaml

    config = yaml.safe_load(Path(job).read_text()) or {}
    evaluation_config = dict((config.get("trainer") or {}).get("evaluation") or {})
    if not evaluation_config:
        raise ValueError(f"{job} has no trainer.evaluation section (retain sets) to evaluate with")
    old = {"sampler": "ddim", "steps": 20}
    candidates = [dict(c) for c in candidates or [{k: evaluation_config.get(k) for k in ("sampler", "steps")}]]
    if any(set(c) != {"sampler", "steps"} or c["sampler"] not in SAMPLERS or not isinstance(c["steps"], int)
           or c["steps"] < 1 for c in candidates):
        raise ValueError(f"evaluation-speed: each candidate gives a sampler ({', '.join(SAMPLERS)}) and steps >= 1, "
                         f"got {candidates}")
    for key in ("seeds", "sampler", "steps"):
        evaluation_config.pop(key, None)
    seeds = list(seeds or [188, 288, 588])
    for run in (runs or {}).values():
        saved_config(run)  # a missing or foreign run folder is refused before anything is written
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(out / "evaluation_speed_cache.json")
    model = DiffusionModel.from_pretrained((config.get("model") or {}).get("model_path", "canvas-mini")).to(device)
    protocols = {"old": old, **{protocol_key(c): c for c in candidates}}
    result = {"command": "cuig evaluation-speed --job " + job, "old": old, "candidates": candidates,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "seeds": seeds, "tolerance": tolerance}
    if runs:
        rows = compare_protocols(model, {k: Path(v) for k, v in runs.items()}, evaluation_config, protocols, seeds,
                                 cache, requests)
        result["equality"] = rows
        holding = [c for c in candidates if largest_difference(rows, protocol_key(c)) <= tolerance]
        result["chosen_holds"] = bool(holding)
        result["chosen"] = min(holding, key=lambda c: c["steps"]) if holding else \
            min(candidates, key=lambda c: largest_difference(rows, protocol_key(c)))
    else:
        result["chosen"] = candidates[0]
    if base_model:
        # keyed by the model's fingerprint too: a retrained base model is measured again
        result["base"] = {key: cache.get(f"base|{model.name}|{protocol_key(p)}|{seeds[:2]}",
                                         lambda p=p: _base(model, evaluation_config, p, seeds[:2]))
                          for key, p in protocols.items() if key != "old"}
    if levers:
        probe = Evaluation(**evaluation_config, seeds=seeds[:1], save_samples=False)
        pairs = probe.grid(["Abstractionism", "Byzantine", "Cartoon", "Cold_Warm"], "style")[:lever_images]
        result["levers"] = measure_levers(model, pairs, old, candidates, result["chosen"],
                                          list(lever_batch_sizes or [48, 192]), compile_unet, seeds[:1])
        result["lever_images"] = len(pairs)
    if time_commits:
        with tempfile.TemporaryDirectory(prefix="cuig-timing-") as scratch:
            result["wall_times"] = {"command": f"cuig fit --config {job}", "runs": [
                cache.get(f"wall|{commit_id(c)}|{job}", lambda c=c: time_job(Path.cwd(), c, job, Path(scratch), out))
                for c in time_commits]}
    write_json(result, out / "evaluation_speed.json")
    text = render(result)
    atomic_write(out / "evaluation_speed.md", lambda tmp: Path(tmp).write_text(text))
    print(text)


def _base(model: DiffusionModel, evaluation_config: dict, protocol: dict, seeds: list[int]) -> dict:
    evaluation = Evaluation(**{**evaluation_config, **protocol}, seeds=seeds, save_samples=False)
    return {**evaluation.base_accuracy(model), "settings": evaluation.settings()}
