"""The instrument report: job settings from config + overlays, and the pass/fail column from the numbers."""

from __future__ import annotations

import json
import sys

import pytest

from cuig_lightning.canvas_mini.instrument import _job_settings, write_report
from tests.helpers import CONFIGS


def test_job_settings_merge_overlays():
    targets, retain, evaluation, domain = _job_settings([str(CONFIGS / "seq12.yaml")])
    assert targets[0] == "Abstractionism" and len(retain) == 12 and evaluation["guidance"] > 0 and domain == "style"
    v_targets, v_retain, v_eval, _ = _job_settings([str(CONFIGS / "seq12.yaml"),
                                                    str(CONFIGS / "paper" / "validation.yaml")])
    assert v_targets[0] == "Pop_Art" and not set(v_retain) & set(retain)
    assert v_eval["retain_objects"] == evaluation["retain_objects"]  # kept from the base config


def _report(first_below_50, sim_ra_i, r):
    seq = {"RA_I": [90.0, 70.0, 40.0], "UA": [95.0] * 3, "RA_C": [95.0] * 3, "first_below_50": first_below_50,
           "wall_minutes": 8.5}  # fmt: skip
    held = {"acc_clean": 1.0, "acc_noise": 0.99, "acc_blur": 1.0}
    return {
        "jobs": 1, "seeds": [42, 43],
        "base": {"style_accuracy": 97.0, "object_accuracy": 91.0, "neutral_accuracy": 100.0, "n_images": 1176},
        "classifiers": {"style": held, "object": held},
        "look_meaning": {"spearman": {"look_parameters": 0.2, "image_statistics": 0.11},
                         "mantel_p": {"look_parameters": 0.001, "image_statistics": 0.004}, "pairs": 1128,
                         "attribute_agreement": {"hue_base": 0.3}},
        "sequential": {"42": seq, "43": {**seq, "RA_I": [90.0, 60.0], "first_below_50": 4}},  # 43 stopped early
        "simultaneous": {"UA": 96.0, "RA_I": sim_ra_i, "RA_C": 90.0, "drift_rel": 0.1},
        "similarity_after_request_1": {"target": "Abstractionism", "domain": "style", "pearson_r": r,
                                       "per_seed_r": [r, r], "retained": {"Monet": {"cosine": 0.1, "accuracy": 90.0}}},
        "objects": None,  # no object job: its rows say "not run" (tests/unit/test_instrument_objects.py)
    }  # fmt: skip


def test_report_marks_each_check(tmp_path):
    path = tmp_path / "instrument.md"
    write_report(_report(3, 70.0, -0.6), path)
    rows = [line for line in path.read_text().splitlines() if line.startswith("| ") and "check" not in line]
    style, objects = [r for r in rows if "(objects)" not in r], [r for r in rows if "(objects)" in r]
    assert len(style) == 7 and all(row.endswith("| yes |") for row in style), rows
    assert len(objects) == 4 and all(row.endswith("| not run | not run |") for row in objects), rows
    assert json.loads(path.with_suffix(".json").read_text())["simultaneous"]["RA_I"] == 70.0

    write_report(_report(None, 40.0, -0.2), path)  # no collapse, simultaneous loses RA-I, weak similarity
    text = path.read_text()
    for check in ("sequential ConAbl", "simultaneous ConAbl", "after request 1"):
        assert next(line for line in text.splitlines() if check in line).endswith("| no |"), check


def test_report_shows_the_finer_damage_measure_and_an_undefined_r(tmp_path):
    report = _report(5, 70.0, None)
    report["similarity_after_request_1"]["probability"] = {"seeds": [188], "base": [0.95], "mean_drop": [0.25],
                                                           "pearson_r_drop": 0.7}  # fmt: skip
    write_report(report, tmp_path / "instrument.md")
    text = (tmp_path / "instrument.md").read_text()
    assert "undefined" in text and "Monet 0.950 → 0.700" in text and "r(text cosine, drop) = 0.7" in text


FAKE_FIT = """#!/usr/bin/env python3
# stands in for `python -m cuig_lightning fit ...`: one metrics row per request, RA-I collapsing at request 3;
# metrics.json replaced atomically, as cuig writes it (a poll never reads half a file)
import json, os, sys, time
from pathlib import Path
run = Path(sys.argv[sys.argv.index("--trainer.run_dir") + 1]); run.mkdir(parents=True, exist_ok=True)
for n in range(1, 13):
    rows = [{"request": k, "UA": 100.0, "RA_I": 100.0 - 30.0 * (k - 1), "RA_C": 90.0} for k in range(1, n + 1)]
    (run / "metrics.tmp").write_text(json.dumps(rows))
    os.replace(run / "metrics.tmp", run / "metrics.json")
    time.sleep(0.3)
"""


def test_sequential_runs_stop_after_the_collapse_and_are_then_reused(tmp_path, monkeypatch):
    from cuig_lightning.canvas_mini import instrument

    fake = tmp_path / "fake_fit"
    fake.write_text(FAKE_FIT)
    fake.chmod(0o755)
    monkeypatch.setattr(instrument.sys, "executable", str(fake))
    monkeypatch.setattr(instrument, "POLL_SECONDS", 0.05)
    job = [str(CONFIGS / "seq12.yaml")]
    rows, _ = instrument._fit(job, tmp_path / "seed43", 43, stop_after_collapse=True)
    assert 3 <= len(rows) < 12 and rows[2]["RA_I"] < 50  # ended soon after request 3, not after 12
    again, _ = instrument._fit(job, tmp_path / "seed43", 43, stop_after_collapse=True)
    assert again == rows  # reused: nothing ran
    full, wall = instrument._fit(job, tmp_path / "seed42", 42)
    assert len(full) == 12 and wall == wall  # the job's own seed runs through and is timed


def test_a_world_variant_points_every_job_at_its_model(tmp_path, monkeypatch):
    from cuig_lightning.canvas_mini import instrument

    fake = tmp_path / "fake_fit"
    fake.write_text("#!" + sys.executable + "\nimport json, sys\nfrom pathlib import Path\n"
                    "run = Path(sys.argv[sys.argv.index('--trainer.run_dir') + 1]); run.mkdir(parents=True)\n"
                    "(run / 'argv.json').write_text(json.dumps(sys.argv))\n"
                    "(run / 'metrics.json').write_text(json.dumps([{'request': 1, 'UA': 100.0, 'RA_I': 10.0}]))\n")
    fake.chmod(0o755)
    monkeypatch.setattr(instrument.sys, "executable", str(fake))
    monkeypatch.setattr(instrument, "POLL_SECONDS", 0.05)
    job = [str(CONFIGS / "seq12.yaml")]
    instrument._fit(job, tmp_path / "variant", 43, stop_after_collapse=True, model="runs/w3/model")
    instrument._fit(job, tmp_path / "shipped", 43, stop_after_collapse=True)
    argv = json.loads((tmp_path / "variant" / "argv.json").read_text())
    assert argv[argv.index("--model.model_path") + 1] == "runs/w3/model"
    assert "--model.model_path" not in json.loads((tmp_path / "shipped" / "argv.json").read_text())


def test_key_value_drift_after_request_1(tmp_path):
    """Against an independent computation: one key layer moved along the target's state, the others unchanged."""
    import torch
    from safetensors.torch import save_file

    from cuig_lightning.canvas_mini.instrument import key_value_drift
    from cuig_lightning.checkpoints import DELTA
    from cuig_lightning.models.diffusion import DiffusionModel

    target, retain = "Abstractionism", ["Greenfield", "Joy", "Monet"]
    model = DiffusionModel.from_pretrained("canvas-mini")
    start = {k: v.float() for k, v in model.unet.state_dict().items() if ".attn2.to_k." in k or ".attn2.to_v." in k}
    states = model.concept_embeddings([target, *retain], "style")
    moved = next(iter(start))
    t = torch.nn.functional.normalize(states[0], dim=0)
    trained = {**start, moved: start[moved] + 0.3 * torch.outer(torch.randn(start[moved].shape[0], generator=torch.Generator().manual_seed(0)), t)}
    run = tmp_path / "run" / "requests" / "01-Abstractionism"
    run.mkdir(parents=True)
    save_file(trained, str(run / DELTA))
    result = key_value_drift([tmp_path / "run"], target, retain)
    delta = trained[moved] - start[moved]
    expected = [float((delta @ c).norm() / (start[moved] @ c).norm()) / len(start) for c in states]
    assert result["target"] == pytest.approx(expected[0], abs=1e-4) and result["target"] > max(result["retained"].values())
    assert list(result["retained"].values()) == pytest.approx(expected[1:], abs=1e-4)
    assert result["runs"] == 1 and -1 <= result["pearson_r"] <= 1


def test_mantel_test_against_a_known_answer():
    import numpy as np
    import torch
    from torchmetrics.functional import spearman_corrcoef

    from cuig_lightning.canvas_mini.instrument import mantel_p

    rng = np.random.default_rng(1)
    points = rng.standard_normal((30, 3))
    text = points @ points.T  # a symmetric pair matrix with structure
    noisy = text + 2.0 * rng.standard_normal((30, 30))
    noisy = (noisy + noisy.T) / 2
    unrelated = rng.standard_normal((30, 30))
    unrelated = (unrelated + unrelated.T) / 2
    assert mantel_p(text, text, permutations=199) == 1 / 200  # no relabelling reaches a perfect correlation
    assert mantel_p(noisy, text, permutations=199) < 0.05
    assert mantel_p(unrelated, text, permutations=199) > 0.05
    assert mantel_p(-text, text, permutations=199) == 1.0  # one-sided: a negative correlation is no evidence
    iu = np.triu_indices(30, 1)
    rho = float(spearman_corrcoef(torch.tensor(noisy[iu]), torch.tensor(text[iu])))
    assert rho > 0.2  # the structure the test detects is really there
