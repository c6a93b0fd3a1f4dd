"""``cuig benchmark --launcher slurm``: the runs as submitit jobs. With submitit's local executor (real processes,
no SLURM) a tiny plan runs, a job killed after its first request resumes from it and ends as its uninterrupted twin,
and a finished plan submits nothing; without submitit, or with resources / a partition the cluster refuses, the
command ends with one ``cuig: error:`` line and touches nothing already written; configs/slurm/benchmark.yaml goes
after the paper's plan."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from cuig_lightning.benchmark import plan, run_benchmark
from cuig_lightning.benchmark.slurm import Slurm
from tests.helpers import CONFIGS, deltas, run_cli, tree_digest, write_tiny_benchmark_base


def _cli_error(capsys, *args: str) -> tuple[int, list[str]]:
    code = run_cli("benchmark", *args)
    return code, capsys.readouterr().err.splitlines()


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """``srun`` and ``sbatch`` on PATH; sbatch refuses the partition, as a cluster does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: "
                                    "Invalid partition name specified' >&2\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir), prepend=os.pathsep)
    return bin_dir


def test_a_refused_submission_is_one_line_and_keeps_what_is_written(tmp_path, capsys, fake_slurm, monkeypatch):
    output, report = tmp_path / "runs", tmp_path / "results"
    finished = output / "conabl" / "sequential" / "seed0"  # a finished run of the plan: 12 requests, 12 rows
    finished.mkdir(parents=True)
    (finished / "metrics.json").write_text(json.dumps([{"targets": "T", "UA": 100.0}] * 12))
    report.mkdir()
    (report / "main_table.md").write_text("the last report\n")
    before = tree_digest(finished), tree_digest(report)
    common = ["--base", str(CONFIGS / "seq12.yaml"), "--methods", json.dumps({"conabl": str(CONFIGS / "canvas_mini")}),
              "--rows", "[sequential, l2]", "--seeds", "[0]", "--output", str(output), "--report", str(report)]

    code, err = _cli_error(capsys, *common, "--launcher", "slurm", "--slurm", "{slurm_partition: nope}")
    assert code == 2 and len(err) == 1, err
    assert err[0] == ("cuig: error: sbatch refused cuig-conabl-l2-0 (sbatch: error: Batch job submission failed: "
                      "Invalid partition name specified); finished runs are kept, a rerun resumes")
    assert (tree_digest(finished), tree_digest(report)) == before

    code, err = _cli_error(capsys, *common, "--launcher", "slurm", "--slurm", "{partitio: gpu}")  # not a name
    assert code == 2 and len(err) == 1 and err[0].startswith("cuig: error: slurm resources") and "partitio" in err[0]
    code, err = _cli_error(capsys, *common, "--slurm", "{slurm_partition: gpu}")  # resources, but launched here
    assert code == 2 and err == [
        "cuig: error: slurm resources are given but the launcher is local: add --launcher slurm"]
    monkeypatch.setitem(sys.modules, "submitit", None)  # the extra not installed
    code, err = _cli_error(capsys, *common, "--launcher", "slurm")
    assert code == 2 and err == ["cuig: error: the slurm launcher needs submitit: pip install 'cuig[cluster]'"]
    assert (tree_digest(finished), tree_digest(report)) == before


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _lock_frees(run_dir: Path, wait_s: float = 10.0) -> bool:
    """Whether the run folder's lock (held by the one `cuig fit` on it) is free within ``wait_s``."""
    deadline = time.time() + wait_s
    with open(run_dir / ".lock", "a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.time() > deadline:
                    return False
                time.sleep(0.1)
                continue
            fcntl.flock(lock, fcntl.LOCK_UN)
            return True


@pytest.mark.slow
def test_local_executor_runs_the_plan_and_a_killed_run_resumes(tmp_path, tiny_sd, cache_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = write_tiny_benchmark_base(tmp_path / "base.yaml", tiny_sd, cache_dir, requests=2)
    rows = tmp_path / "rows"  # two rows with the same overlay: "twin" is "sequential" run without interruption
    rows.mkdir()
    for row in ("sequential", "twin"):
        shutil.copy(CONFIGS / "canvas_mini" / "sequential.yaml", rows / f"{row}.yaml")
    output, report = tmp_path / "runs", tmp_path / "results"
    kwargs = dict(base=[str(base)], methods={"conabl": str(rows)}, rows=["sequential", "twin"], seeds=[0],
                  output=str(output), report=str(report))
    launcher = Slurm({"gpus_per_node": 0, "timeout_min": 10}, output / ".submitit", cluster="local")

    # the first job is killed once its first request is written
    killed = next(r for r in plan(kwargs["base"], kwargs["methods"], kwargs["rows"], [0], output).runs
                  if r.key[1] == "sequential")
    job = launcher.start(killed)
    deadline = time.time() + 150
    while not _rows(killed.run_dir) and not job.done() and time.time() < deadline:
        time.sleep(0.2)
    launcher.stop(job)
    while not job.done():
        time.sleep(0.2)
    first = _rows(killed.run_dir)
    assert _lock_frees(killed.run_dir), "a `cuig fit` process is still working on the killed run's folder"
    assert len(first) == len(_rows(killed.run_dir)) == 1, f"killed too late or never started: {first}"
    request_1 = deltas(killed.run_dir)[0]
    written = request_1.read_bytes(), request_1.stat().st_mtime_ns
    assert not killed.finished

    # the benchmark submits the killed run again (it resumes) and its twin; both finish, the report is written
    run_benchmark(**kwargs, launcher=launcher)
    resumed, twin = (output / "conabl" / row / "seed0" for row in ("sequential", "twin"))
    assert len(_rows(resumed)) == len(_rows(twin)) == 2
    assert (request_1.read_bytes(), request_1.stat().st_mtime_ns) == written  # request 1 was not trained again
    assert _rows(resumed)[0] == first[0]
    log = resumed.with_suffix(".log").read_text()
    assert "request 1/2 (" in log and "finished earlier, skipped" in log
    for got, reference in zip(deltas(resumed), deltas(twin), strict=True):  # as if never interrupted
        assert got.read_bytes() == reference.read_bytes(), got
    for got, reference in zip(_rows(resumed), _rows(twin), strict=True):
        assert {k: got[k] for k in ("UA", "RA_I", "RA_C")} == {k: reference[k] for k in ("UA", "RA_I", "RA_C")}
    table = (report / "main_table.md").read_text()
    assert "| conabl | sequential | 1 |" in table and "| conabl | twin | 1 |" in table

    # everything finished: a relaunch submits nothing
    jobs = sorted((output / ".submitit").iterdir())
    run_benchmark(**kwargs, launcher=launcher)
    assert sorted((output / ".submitit").iterdir()) == jobs


def test_the_cluster_config_goes_after_the_plan(tmp_path, capsys):
    """configs/slurm/benchmark.yaml after the paper's plan: the plan as it is, the slurm launcher, resources
    submitit knows."""
    plan_file, cluster_file = CONFIGS / "paper" / "main_table.yaml", CONFIGS / "slurm" / "benchmark.yaml"
    assert run_cli("benchmark", "--config", str(plan_file), "--config", str(cluster_file), "--print_config") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["launcher"] == "slurm" and printed["slurm"]["gpus_per_node"] == 1
    assert {k: printed[k] for k in ("rows", "seeds", "tuning")} == {
        k: yaml.safe_load(plan_file.read_text())[k] for k in ("rows", "seeds", "tuning")}
    Slurm(printed["slurm"], tmp_path, cluster="local")  # submitit takes every name (slurm_* checked, then ignored)
