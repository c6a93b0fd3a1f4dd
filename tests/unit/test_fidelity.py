"""``cuig fidelity``'s plan and report (issue 33) on fake run folders: which runs, and the table and findings
they give."""

from __future__ import annotations

import json

import pytest
import yaml

from cuig_lightning.benchmark.fidelity import StudyJob, cells, findings, write_fidelity
from tests.helpers import CONFIGS

BASE = [str(CONFIGS / "seq12.yaml"), str(CONFIGS / "paper" / "validation.yaml")]
REQUESTS = yaml.safe_load((CONFIGS / "paper" / "validation.yaml").read_text())["trainer"]["requests"]
RETAIN = yaml.safe_load((CONFIGS / "paper" / "validation.yaml").read_text())["trainer"]["evaluation"]["retain_styles"]


def _job(tmp_path, rows=None) -> StudyJob:
    rows = rows or [
        {"name": "sequential", "items": [1], "overlay": {"model": {"learning_rate": 2e-5}},
         "variants": {"today": {"model": {"method": {"class_path": "cuig_lightning.methods.ConAbl",
                                                     "init_args": {"detach_first_token": False}}}}, "paper": {}}},
        {"name": "simultaneous", "items": [5], "simultaneous": True, "overlay": {"trainer": {"schedule": "simultaneous"}},
         "variants": {"today": {"trainer": {"until_ua": 95}}, "paper": {"trainer": {"until_ua": 99}}}},
    ]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, "seed": 0, "output": str(tmp_path / "runs"),
                                    "report": str(tmp_path / "report"), "after": [1, 2], "rows": rows}, sort_keys=False))
    return StudyJob(path)


def _row(request: int, ra_i: float, targets: str, retain: dict | None = None) -> dict:
    row = {"request": request, "targets": targets, "UA": 100.0, "RA_I": ra_i, "RA_C": 90.0, "drift": 1.0,
           "drift_rel": 0.01 * request, "steps": 60}
    if retain is not None:
        row["per_concept"] = {"unlearn": {targets: 0.0}, "retain": retain}
    return row


def _write(run, rows: list[dict]) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "metrics.json").write_text(json.dumps(rows))


def test_the_plan_is_one_run_per_variant_and_one_per_n_for_a_simultaneous_row(tmp_path):
    job = _job(tmp_path)
    runs = job.runs()
    assert list(runs) == [("sequential", "today", None), ("sequential", "paper", None),
                          ("simultaneous", "today", 1), ("simultaneous", "today", 2),
                          ("simultaneous", "paper", 1), ("simultaneous", "paper", 2)]
    seq = runs[("sequential", "paper", None)]
    assert seq.configs == [*BASE, str(tmp_path / "runs/sequential/row.yaml"), str(tmp_path / "runs/sequential/paper.yaml")]
    assert seq.run_dir == tmp_path / "runs/sequential/paper/seed0" and seq.overrides == []
    args = runs[("simultaneous", "paper", 2)].arguments()  # writes the overlays
    assert f"--trainer.requests={json.dumps(REQUESTS[:2])}" in args and "--seed_everything=0" in args
    assert yaml.safe_load((tmp_path / "runs/simultaneous/paper.yaml").read_text()) == {"trainer": {"until_ua": 99}}
    assert runs[("simultaneous", "paper", 2)].planned_stages() == 1


def test_the_report_reads_each_run_and_says_what_changed(tmp_path):
    job = _job(tmp_path)
    runs = job.runs()
    target = REQUESTS[0]["target"]
    even = {s: 100.0 for s in RETAIN}
    later = [{**_row(n, 0.0, REQUESTS[n - 1]["target"]), "RA_I": None} for n in range(3, len(REQUESTS) + 1)]
    for row in later:  # UA alone after the requests the table does not read
        del row["RA_I"], row["RA_C"]
    _write(runs[("sequential", "today", None)], [_row(1, 90.0, target, even), _row(2, 40.0, REQUESTS[1]["target"])]
           + later)
    _write(runs[("sequential", "paper", None)], [_row(1, 95.0, target, even), _row(2, 60.0, REQUESTS[1]["target"])]
           + later)
    _write(runs[("simultaneous", "paper", 1)], [_row(1, 97.0, target)])  # today's simultaneous runs never ran
    found = cells(job, runs)
    assert found[("sequential", "today")]["collapse"] == 2 and found[("sequential", "paper")]["collapse"] is None
    assert found[("sequential", "paper")]["after"][2]["RA_I"] == 60.0
    assert found[("simultaneous", "paper")]["after"] == {1: {"UA": 100.0, "RA_I": 97.0, "RA_C": 90.0}}
    assert ("simultaneous", "today") not in found
    # a sequential run that has not reached its last request is not reported (its curve would be partial)
    _write(runs[("sequential", "paper", None)], [_row(1, 95.0, target, even), _row(2, 60.0, REQUESTS[1]["target"])])
    assert ("sequential", "paper") not in cells(job, job.runs())
    _write(runs[("sequential", "paper", None)], [_row(1, 95.0, target, even), _row(2, 60.0, REQUESTS[1]["target"])]
           + later)

    text = write_fidelity(job, runs).read_text()
    assert "| sequential | today | 100.0 | 100.0 | 90.0 | 40.0 | 90.0 | 90.0 | 100.0 | 2 | 0.1200 | – |" in text
    assert "| simultaneous | today | – | – | – | – | – | – | – | – | – | – |" in text
    assert "RA-I after request 2, 40.0 → 60.0 (20.0 points)" in text  # the largest change of the row
    assert "**simultaneous**: not measured yet" in text
    saved = json.loads((tmp_path / "report" / "fidelity.json").read_text())
    assert saved["sequential/paper"]["r"] is None  # every retained style kept the same accuracy: no r


def test_findings_say_when_damage_follows_text_similarity(tmp_path):
    job = _job(tmp_path)
    found = {("sequential", "today"): {"after": {1: {"UA": 100, "RA_I": 90, "RA_C": 90}}, "collapse": None, "r": -0.8,
                                       "worst_UA": 100.0},
             ("sequential", "paper"): {"after": {1: {"UA": 100, "RA_I": 92, "RA_C": 90}}, "collapse": None, "r": -0.1,
                                       "worst_UA": 95.0}}
    text = findings(job, found)
    assert "follows text similarity (r ≤ −0.5) for sequential/today (r = -0.80)" in text
    assert "**sequential** (item 1): worst UA 100.0 → 95.0" in text
    found[("sequential", "today")]["r"] = 0.2
    assert "for no variant" in findings(job, found)
    for cell in found.values():
        cell["r"] = None
    assert "no r to compute" in findings(job, found)


def test_a_bad_job_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, "rows": []}))
    with pytest.raises(ValueError, match="lacks output, report"):
        StudyJob(path)
    with pytest.raises(ValueError, match="row names repeat"):
        _job(tmp_path, rows=[{"name": "a", "variants": {"x": {}}}, {"name": "a", "variants": {"y": {}}}])
    with pytest.raises(ValueError, match="needs a name and variants"):
        _job(tmp_path, rows=[{"name": "a"}])


def test_the_committed_job_parses_and_every_overlay_is_a_config(tmp_path):
    job = StudyJob(CONFIGS / "paper" / "fidelity.yaml")
    assert [row["name"] for row in job.rows][:2] == ["sequential", "gradproj"]
    assert all("paper" in row["variants"] for row in job.rows)
    assert sum("today" in row["variants"] for row in job.rows) == len(job.rows) - 1  # all but the names row
    assert len(job.runs()) == sum(len(r["variants"]) * (len(job.simultaneous_n(r)) if r.get("simultaneous") else 1)
                                  for r in job.rows)
    with pytest.raises(ValueError, match="must be among the job's"):
        job.simultaneous_n({"name": "s", "after": [3]})


def test_the_committed_report_is_what_its_command_rebuilds(tmp_path, monkeypatch):
    """results/fidelity.md is `cuig fidelity --job configs/paper/fidelity.yaml --report_only true` on the committed
    runs' metrics (here written into a temporary folder)."""
    monkeypatch.chdir(CONFIGS.parent)  # the job's paths are relative to the repository
    job = StudyJob(CONFIGS / "paper" / "fidelity.yaml")
    job.report = tmp_path
    rebuilt = write_fidelity(job, job.runs()).read_text()
    assert rebuilt == (CONFIGS.parent / "results" / "fidelity.md").read_text()
    assert "| gradproj | paper |" in rebuilt and "not measured yet" not in rebuilt  # every compared row has its runs
