"""The robustness probes in a real tiny job (tiny SD-shaped model, Canvas-mini's classifiers): metrics.json has the
keys exactly on the requests where they ran, `cuig evaluate` recomputes the same numbers from the run folder, a
resumed job recomputes nothing, and bad options are one `cuig: error:` line that writes nothing."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import run_cli, tiny_evaluation, tree_digest, write_tiny_job

KEYS = {"ASR", "ASR_per_concept", "ASR_paraphrase", "ASR_paraphrase_per_concept", "relearn_UA", "relearn_UA_per_concept",
        "relearn_RA_I", "ASR_by_steps", "robustness"}


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_sd, cache_dir):
    """A fitted 3-request job whose attack and relearning probe run every 2nd request (so after 2, and 3: the last)."""
    work = tmp_path_factory.mktemp("robust")
    path = write_tiny_job(work / "job.yaml", tiny_sd, cache_dir, work / "run", requests=3)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["evaluation"] = {**tiny_evaluation(2), "attack": {"steps": 2, "every": 2},
                                       "relearn": {"steps": 2, "batch_size": 2, "every": 2}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert run_cli("fit", "--config", str(path)) == 0
    return path, work / "run"


def test_metrics_have_the_probes_where_they_ran(job):
    _, run = job
    rows = json.loads((run / "metrics.json").read_text())
    assert [sorted(KEYS & set(r)) for r in rows] == [[], sorted(KEYS), sorted(KEYS)]
    second, third = rows[1], rows[2]
    assert set(second["ASR_per_concept"]) == {"Abstractionism", "Byzantine"}
    assert set(third["ASR_per_concept"]) == {"Abstractionism", "Byzantine", "Cartoon"}
    for row in (second, third):
        assert 100 - row["UA"] <= row["ASR"] <= 100  # the plain prompt is one of the attack's candidates
        assert 0 <= row["ASR_paraphrase"] <= 100 and 0 <= row["relearn_UA"] <= 100
        assert row["robustness"]["attack"]["steps"] == 2 and row["robustness"]["relearn"]["seconds"] >= 0
    manifest = json.loads((run / "requests" / "02-Byzantine" / "manifest.json").read_text())
    assert manifest["metrics"]["ASR"] == second["ASR"]
    header = (run / "metrics.md").read_text().splitlines()[0]
    assert "| ASR | ASR_paraphrase | relearn_UA |" in header
    assert "Attack after requests 2, 3 (budget_steps [2, 5, 10], every 2, learning_rate 0.01, " in (run / "metrics.md").read_text()


def test_evaluate_recomputes_the_same_numbers_and_a_resumed_job_none(job, capsys):
    path, run = job
    recorded = json.loads((run / "metrics.json").read_text())[1]
    before = tree_digest(run)
    capsys.readouterr()
    assert run_cli("evaluate", "--run_dir", str(run), "--request", "2") == 0
    result = json.loads(capsys.readouterr().out)
    assert {k: round(result[k], 3) for k in ("ASR", "ASR_paraphrase", "relearn_UA")} == {
        k: recorded[k] for k in ("ASR", "ASR_paraphrase", "relearn_UA")}
    assert result["ASR_per_concept"] == recorded["ASR_per_concept"]
    assert tree_digest(run) == before
    # a re-run under another attack seed skips every finished request: nothing is recomputed or rewritten
    assert run_cli("fit", "--config", str(path), "--trainer.evaluation.attack.seed", "7") == 0
    assert tree_digest(run) == before


@pytest.mark.parametrize("args, needle", [
    (["--attack.steps", "-1"], "attack.steps must be >= 0, got -1"),
    (["--attack.concepts", "[Nope]"], "attack.concepts: Nope not erased here (erased: Abstractionism)"),
    (["--trainer.evaluation", "null", "--attack.steps", "1"], "need the run's evaluation section"),
    (["--request", "0", "--relearn.steps", "1"], "request 0 is the base model"),
])
def test_bad_evaluate_options_are_one_line_and_write_nothing(job, capsys, args, needle):
    _, run = job
    before = tree_digest(run)
    capsys.readouterr()
    assert run_cli("evaluate", "--run_dir", str(run), "--request", "1", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()  # (model loading may show progress lines before it)
    assert [line for line in err if "error" in line] == err[-1:] and err[-1].startswith("cuig: error:")
    assert needle in err[-1]
    assert tree_digest(run) == before


@pytest.mark.parametrize("option, value, needle", [
    ("--trainer.evaluation.attack.tokens", "0", "attack.tokens must be >= 1, got 0"),
    ("--trainer.evaluation.relearn.learning_rate", "-0.1", "relearn.learning_rate must be > 0"),
    ("--trainer.evaluation.attack.concepts", "[Nope]", "attack.concepts: Nope not erased here"),
])
def test_bad_fit_options_are_one_line_and_claim_no_folder(job, tmp_path, capsys, option, value, needle):
    path, _ = job
    capsys.readouterr()
    assert run_cli("fit", "--config", str(path), "--trainer.run_dir", str(tmp_path / "new"), option, value) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cuig: error:") and needle in err[-1]
    assert not (tmp_path / "new" / "job.json").exists() and not (tmp_path / "new" / "requests").exists()
