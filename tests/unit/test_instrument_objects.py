"""The instrument's object checks (6-9), with fake runs: ``_fit`` and the style-only measures are replaced, so
nothing trains and no model is loaded; the verdicts, the similarity r and the report are checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from cuig_lightning.canvas_mini import instrument, objects, world
from cuig_lightning.canvas_mini.instrument_measures import compare_gradproj, similarity_after_request_1
from tests.helpers import CONFIGS

STYLE_JOB, OBJECT_JOB = [str(CONFIGS / "seq12.yaml")], [str(CONFIGS / "seq12_object.yaml")]
GRADPROJ = str(CONFIGS / "canvas_mini" / "gradproj.yaml")
SIMULTANEOUS = str(CONFIGS / "canvas_mini" / "simultaneous.yaml")


def _cosine(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, 4))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


OBJECT_COSINE, STYLE_COSINE = _cosine(len(world.OBJECTS), 0), _cosine(len(world.STYLES), 1)


def _metric_rows(configs, collapse_at, ra_i_gain=0.0, ua_drop=0.0, cosine=None, n=12):
    """Fake metric rows: RA-I 90 until ``collapse_at``, 40 from there; after request 1 each retained concept's
    accuracy falls with its text cosine to the target (r = -1 against ``cosine``)."""
    targets, retain, _, domain = instrument._job_settings(configs)
    names = world.OBJECTS if domain == "object" else world.STYLES
    cos = {r: cosine[names.index(targets[0]), names.index(r)] for r in retain}
    return [{"request": k, "UA": 96.0 - ua_drop, "RA_I": (90.0 if k < collapse_at else 40.0) + ra_i_gain,
             "RA_C": 90.0, "per_concept": {"retain": {r: 80.0 - 30.0 * c for r, c in cos.items()}}}
            for k in range(1, n + 1)]  # fmt: skip


@pytest.fixture
def fake_world(tmp_path, monkeypatch):
    """instrument() with fake fits, base check, classifiers and style measures; returns the fits it asked for and
    the fake runs' settings (object sequential collapse, GradProj's RA-I gain and UA drop)."""
    from cuig_lightning.models.diffusion import DiffusionModel

    calls, settings = [], {"collapse_at": 5, "gain": 10.0, "ua_drop": 0.0}

    def fit(configs, run_dir, seed, threads=None, stop_after_collapse=False, model="canvas-mini"):
        calls.append({"configs": configs, "run_dir": run_dir, "seed": seed, "stop": stop_after_collapse})
        obj = "objects" in run_dir.parts
        if "simultaneous" in run_dir.parts:
            return [{"request": 1, "UA": 97.0, "RA_I": 70.0, "RA_C": 90.0, "steps": 200}], 3.0
        gp = "gradproj" in run_dir.parts
        return _metric_rows(configs, settings["collapse_at"] if obj else 4, settings["gain"] if gp else 0.0,
                            settings["ua_drop"] if gp else 0.0, OBJECT_COSINE if obj else STYLE_COSINE), 5.0

    held = {"held_out": {"acc_clean": 1.0, "acc_noise": 0.99, "acc_blur": 1.0}}
    for kind in ("style", "object"):
        (tmp_path / f"{kind}.json").write_text(json.dumps(held))
    _, retain, _, _ = instrument._job_settings(STYLE_JOB)
    monkeypatch.setattr(DiffusionModel, "from_pretrained", staticmethod(lambda *a, **k: None))
    monkeypatch.setattr(instrument, "DEFAULT_DIR", tmp_path)
    monkeypatch.setattr(instrument, "_fit", fit)
    monkeypatch.setattr(instrument.looks, "style_text_cosine", lambda *a: STYLE_COSINE)
    monkeypatch.setattr(objects, "object_text_cosine", lambda *a: OBJECT_COSINE)
    monkeypatch.setattr(instrument, "look_meaning", lambda cosine: {
        "spearman": {"look_parameters": 0.2}, "mantel_p": {"look_parameters": 0.001}, "pairs": 1128,
        "closest_pairs": 112, "attribute_agreement": {"hue_base": 0.3}})
    monkeypatch.setattr(instrument, "_base_check", lambda *a: {
        "style_accuracy": 97.0, "object_accuracy": 92.0, "neutral_accuracy": 100.0, "n_images": 1960})
    monkeypatch.setattr(instrument, "_style_probability", lambda *a, **k: {
        "seeds": [188], "base": [0.9] * len(retain), "after": {"seed42": [0.8] * len(retain)}})
    monkeypatch.setattr(instrument, "key_value_drift", lambda *a: {
        "target": 0.5, "retained": {r: 0.1 for r in retain}, "pearson_r": None, "runs": 1})
    return calls, settings


def _run(tmp_path, **kwargs):
    output = tmp_path / "out" / "instrument.md"
    report = instrument.instrument(job=STYLE_JOB, simultaneous=SIMULTANEOUS, output=str(output),
                                   runs_dir=str(tmp_path / "runs"),
                                   **{"seeds": [42], "object_job": OBJECT_JOB, "gradproj": GRADPROJ, **kwargs})
    lines = output.read_text().splitlines()
    row = lambda check: next(line for line in lines if line.startswith("| (objects) " + check))  # noqa: E731
    return report, output, row


@pytest.mark.parametrize("collapse_at, holds", [(2, "no"), (5, "yes")])
def test_object_sequential_collapse_is_due_within_requests_3_to_8(tmp_path, fake_world, collapse_at, holds):
    fake_world[1]["collapse_at"] = collapse_at
    report, _, row = _run(tmp_path)
    assert report["objects"]["sequential"]["42"]["first_below_50"] == collapse_at
    assert row("sequential ConAbl").endswith(f"| 3-8 | {collapse_at} | {holds} |")


def test_object_checks_run_under_runs_dir_objects_and_hold(tmp_path, fake_world):
    calls, _ = fake_world
    report, output, row = _run(tmp_path)
    runs = tmp_path / "runs" / "objects"
    fits = {c["run_dir"]: c for c in calls}
    assert {runs / "sequential" / "seed42", runs / "simultaneous" / "seed42", runs / "gradproj" / "seed42"} <= set(fits)
    assert fits[runs / "gradproj" / "seed42"]["configs"] == [*OBJECT_JOB, GRADPROJ]
    assert fits[runs / "simultaneous" / "seed42"]["configs"] == [*OBJECT_JOB, SIMULTANEOUS]
    assert not fits[runs / "sequential" / "seed42"]["stop"]  # GradProj is compared with its every request
    assert len(calls) == 5  # style sequential + simultaneous, object sequential + simultaneous + GradProj
    obj = report["objects"]
    r1 = obj["similarity_after_request_1"]
    assert r1["target"] == "Bears" and r1["pearson_r"] == -1
    assert set(r1["retained"]) == set(instrument._job_settings(OBJECT_JOB)[1])
    object_lr = yaml.safe_load((CONFIGS / "seq12_object.yaml").read_text())["model"]["learning_rate"]
    assert obj["gradproj"]["learning_rate"] == object_lr and obj["gradproj"]["request"] == 12
    for check in ("sequential ConAbl", "simultaneous ConAbl", "after request 1 (Bears)", "GradProj"):
        assert row(check).endswith("| yes |"), row(check)
    text = output.read_text()
    assert "## Objects" in text and "| 12 (Waterfalls) | 96.0 / 50.0 / 90.0 | 96.0 / 40.0 / 90.0 |" in text
    assert json.loads(output.with_suffix(".json").read_text())["objects"]["gradproj"]["holds"] is True


def test_objects_run_one_seed_unless_given(tmp_path, fake_world):
    calls, _ = fake_world
    _run(tmp_path, seeds=[42, 43])
    runs = tmp_path / "runs" / "objects"
    assert sorted(c["run_dir"].relative_to(runs).as_posix() for c in calls if "objects" in c["run_dir"].parts) == [
        "gradproj/seed42", "sequential/seed42", "simultaneous/seed42"]
    calls.clear()
    report, _, _ = _run(tmp_path / "given", seeds=[42], object_seeds=[43, 44])
    stops = {c["run_dir"].relative_to(tmp_path / "given" / "runs" / "objects").as_posix(): c["stop"]
             for c in calls if "objects" in c["run_dir"].parts}
    assert stops == {"sequential/seed43": False, "sequential/seed44": True,  # 43: GradProj's comparison
                     "simultaneous/seed43": False, "gradproj/seed43": False}  # fmt: skip
    assert report["objects"]["seeds"] == [43, 44] and report["objects"]["gradproj"]["seed"] == 43


def test_gradproj_needs_matched_forgetting(tmp_path, fake_world):
    fake_world[1].update(gain=10.0, ua_drop=20.0)  # more RA-I, bought with 20 points less UA
    report, _, row = _run(tmp_path)
    assert report["objects"]["gradproj"]["holds"] is False
    assert row("GradProj").endswith("RA-I 50.0 vs 40.0, UA 76.0 vs 96.0 (GradProj vs sequential) | no |")


def test_skipping_the_object_job_shows_not_run(tmp_path, fake_world):
    calls, _ = fake_world
    report, output, row = _run(tmp_path, object_job=None)
    assert report["objects"] is None and not any("objects" in c["run_dir"].parts for c in calls)
    for check in ("sequential ConAbl", "simultaneous ConAbl", "after request 1", "GradProj"):
        assert row(check).endswith("| not run | not run |"), row(check)
    assert json.loads(output.with_suffix(".json").read_text())["objects"] is None


def test_an_overlay_that_changes_the_learning_rate_is_refused(tmp_path, fake_world):
    overlay = tmp_path / "gradproj_lr.yaml"
    overlay.write_text("model:\n  learning_rate: 1.0e-4\n")
    with pytest.raises(ValueError, match="learning rate"):
        _run(tmp_path, gradproj=str(overlay))
    assert fake_world[0] == []  # refused before any run
    assert instrument._training_rate([*OBJECT_JOB, GRADPROJ]) == instrument._training_rate(OBJECT_JOB)


def test_object_job_settings():
    targets, retain, evaluation, domain = instrument._job_settings(OBJECT_JOB)
    assert domain == "object" and targets[0] == "Bears" and len(targets) == 12
    assert retain == evaluation["retain_objects"] and len(retain) == 8 and not set(retain) & set(targets)


@pytest.mark.parametrize("domain", ["object", "style"])
def test_similarity_after_request_1_is_pearson_r(domain):
    """Against numpy, on noisy accuracies of two runs; the cosine matrix of the domain's own order."""
    job = OBJECT_JOB if domain == "object" else STYLE_JOB
    targets, retain, _, _ = instrument._job_settings(job)
    names, cosine = (world.OBJECTS, OBJECT_COSINE) if domain == "object" else (world.STYLES, STYLE_COSINE)
    rng = np.random.default_rng(3)
    cos = np.array([cosine[names.index(targets[0]), names.index(r)] for r in retain])
    acc = 70.0 - 20.0 * cos + 10.0 * rng.standard_normal((2, len(retain)))
    rows = [{"per_concept": {"retain": dict(zip(retain, a))}} for a in acc]
    result = similarity_after_request_1(rows, targets[0], retain, domain, cosine)
    assert result["pearson_r"] == pytest.approx(np.corrcoef(cos, acc.mean(0))[0, 1], abs=1e-3)
    assert result["per_seed_r"] == pytest.approx([np.corrcoef(cos, a)[0, 1] for a in acc], abs=1e-3)
    assert list(result["retained"]) == retain and result["domain"] == domain
    flat = similarity_after_request_1([{"per_concept": {"retain": dict.fromkeys(retain, 90.0)}}], targets[0], retain,
                                      domain, cosine)  # fmt: skip
    assert flat["pearson_r"] is None  # no damage to correlate


def test_similarity_after_request_1_reads_the_objects_text_cosine(monkeypatch):
    monkeypatch.setattr(objects, "object_text_cosine", lambda *a: OBJECT_COSINE)
    retain = ["Horses", "Sea", "Trees"]
    rows = [{"per_concept": {"retain": {"Horses": 10.0, "Sea": 90.0, "Trees": 50.0}}}]
    result = similarity_after_request_1(rows, "Bears", retain, "object")
    bears = world.OBJECTS.index("Bears")
    assert [v["cosine"] for v in result["retained"].values()] == pytest.approx(
        [OBJECT_COSINE[bears, world.OBJECTS.index(r)] for r in retain], abs=1e-3)


def test_compare_gradproj_at_the_last_request_both_have():
    seq = [{"request": k, "UA": 95.0, "RA_I": 60.0 - k, "RA_C": 90.0} for k in range(1, 13)]
    gp = [{**r, "RA_I": r["RA_I"] + 5} for r in seq[:7]]  # a GradProj run that stopped after request 7
    result = compare_gradproj(gp, seq)
    assert result["request"] == 7 and result["holds"] is True
    assert result["compared"] == {"gradproj": {"UA": 95.0, "RA_I": 58.0, "RA_C": 90.0},
                                  "sequential": {"UA": 95.0, "RA_I": 53.0, "RA_C": 90.0}}  # fmt: skip
    assert compare_gradproj([{**r, "UA": 89.0} for r in gp], seq)["holds"] is False  # UA 6 points lower
    assert compare_gradproj([{**r, "UA": 90.0} for r in gp], seq)["holds"] is True  # within 5
    assert compare_gradproj([], seq)["holds"] is None
