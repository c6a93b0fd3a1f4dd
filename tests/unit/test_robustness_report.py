"""``cuig robustness``'s plan and report (issue 36) on fake run folders: the runs, the tables and the findings."""

from __future__ import annotations

import json

import numpy as np
import yaml

from cuig_lightning.benchmark.fidelity import StudyJob
from cuig_lightning.benchmark.robustness import cells, findings, write_robustness
from tests.helpers import CONFIGS

BASE = [str(CONFIGS / "seq12.yaml"), str(CONFIGS / "paper" / "robustness_probes.yaml")]
TARGETS = [r["target"] for r in yaml.safe_load((CONFIGS / "seq12.yaml").read_text())["trainer"]["requests"]]


def _job(tmp_path) -> StudyJob:
    rows = [{"name": "sequential", "variants": {"conabl": {}}},
            {"name": "gradproj", "variants": {"conabl": {}}},
            {"name": "simultaneous", "simultaneous": True, "overlay": {"trainer": {"schedule": "simultaneous"}},
             "variants": {"conabl": {}}}]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, "seed": 0, "output": str(tmp_path / "runs"),
                                    "report": str(tmp_path / "report"), "after": [1, 2], "rows": rows}))
    return StudyJob(path, kind="robustness")


def _row(request: int, erased: list[str], ra_i: float, asr: dict, relearned: dict) -> dict:
    return {"request": request, "targets": erased[-1], "UA": 100.0, "RA_I": ra_i, "RA_C": 90.0,
            "ASR": sum(asr.values()) / len(asr), "ASR_per_concept": asr,
            "ASR_by_steps": {"2": ra_i / 4, "5": ra_i / 2, "20": sum(asr.values()) / len(asr)},
            "ASR_paraphrase": 0.0, "relearn_UA": sum(relearned.values()) / len(relearned), "relearn_RA_I": 99.0,
            "relearn_UA_per_concept": relearned}


def _write(run, rows) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "metrics.json").write_text(json.dumps(rows))


def test_the_tables_and_findings_come_from_the_runs(tmp_path):
    job = _job(tmp_path)
    runs = job.runs()
    assert list(runs) == [("sequential", "conabl", None), ("gradproj", "conabl", None),
                          ("simultaneous", "conabl", 1), ("simultaneous", "conabl", 2)]
    assert runs[("sequential", "conabl", None)].key[0] == "robustness"
    a, b = TARGETS[:2]
    first = _row(1, [a], 90.0, {a: 100.0}, {a: 100.0})
    _write(runs[("sequential", "conabl", None)], [first] + [_row(n, TARGETS[:n], 20.0, {a: 100.0, b: 50.0},
                                                                {a: 75.0, b: 100.0}) for n in range(2, 13)])
    _write(runs[("gradproj", "conabl", None)], [dict(first, RA_I=95.0)] + [
        _row(n, TARGETS[:n], 60.0, {a: 0.0, b: 50.0}, {a: 100.0, b: 100.0}) for n in range(2, 13)])
    _write(runs[("simultaneous", "conabl", 2)], [_row(1, [a, b], 80.0, {a: 100.0, b: 100.0}, {a: 100.0, b: 100.0})])
    found = cells(job, runs)
    assert set(found) == {("sequential", "conabl"), ("gradproj", "conabl")}  # simultaneous n = 1 has not run
    assert list(found[("sequential", "conabl")]) == [1, 2]
    text = findings(job, found)
    assert ("**sequential** (after 1, 2): ASR 100, 75; within 2 steps 22, 5; RA-I 90, 20; after relearning "
            "UA 100, 88 and RA-I 99, 99.") in text
    kept, small, whole = [90.0, 55.0, 92.5, 75.0], [22.5, 5.0, 22.5, 15.0], [100.0, 75.0, 100.0, 25.0]
    r_small, r_whole = np.corrcoef(kept, small)[0, 1], np.corrcoef(kept, whole)[0, 1]
    assert (f"Over the 4 (row, request) points, retention ((RA-I + RA-C) / 2) against ASR: Pearson r = "
            f"{r_small:.2f} within 2 steps, {r_whole:.2f} with the whole budget (a model that keeps more is easier "
            "to attack).") in text
    assert "sequential: of the 1 targets probed before request 2, ASR at 2 is higher than at their first probe " \
           "for 0 and lower for 0; UA after relearning fell for 1." in text
    assert "gradproj: of the 1 targets probed before request 2, ASR at 2 is higher than at their first probe " \
           "for 0 and lower for 1; UA after relearning fell for 0." in text
    report = write_robustness(job, runs).read_text()
    assert ("| row | variant | after | UA | RA-I | RA-C | ASR | ASR ≤2 steps | ASR ≤5 steps | ASR para. | UA relearned "
            "| RA-I relearned |") in report
    assert "| sequential | conabl | 2 | 100.0 | 20.0 | 90.0 | 75.0 | 5.0 | 10.0 | 0.0 | 87.5 | 99.0 |" in report
    assert f"| gradproj | 2 | 0 / 100 | 50 / 100 |" in report
    saved = json.loads((tmp_path / "report" / "robustness.json").read_text())
    assert saved["gradproj/conabl"]["2"]["ASR_per_concept"] == {a: 0.0, b: 50.0}


def test_the_committed_job_plans_every_row():
    job = StudyJob(CONFIGS / "paper" / "robustness.yaml", kind="robustness")
    assert [row["name"] for row in job.rows] == ["sequential", "gradproj", "merge", "merge_gradproj", "simultaneous"]
    runs = job.runs()
    assert len(runs) == 4 + 4  # four sequential-style rows, one simultaneous run per n of after
    probes = yaml.safe_load((CONFIGS / "paper" / "robustness_probes.yaml").read_text())["trainer"]["evaluation"]
    assert probes["attack"]["every"] == probes["relearn"]["every"] == job.after


def test_the_committed_report_is_what_its_command_rebuilds(tmp_path, monkeypatch):
    """results/robustness.md is `cuig robustness --job configs/paper/robustness.yaml --report_only true` on the
    committed runs' metrics (here written into a temporary folder), with every row and n of the job."""
    monkeypatch.chdir(CONFIGS.parent)  # the job's paths are relative to the repository
    job = StudyJob(CONFIGS / "paper" / "robustness.yaml", kind="robustness")
    job.report = tmp_path
    rebuilt = write_robustness(job, job.runs()).read_text()
    assert rebuilt == (CONFIGS.parent / "results" / "robustness.md").read_text()
    for row in job.rows:
        for n in job.after:
            assert f"| {row['name']} | conabl | {n} |" in rebuilt
