"""``cuig evaluation-speed`` on a tiny finished run: the report's parts, the cache that makes it resumable."""

from __future__ import annotations

import json

from tests.helpers import run_cli, write_tiny_job


def test_protocol_comparison_report_and_resume(tmp_path, tiny_sd, cache_dir, capsys):
    cfg = write_tiny_job(tmp_path / "job.yaml", tiny_sd, cache_dir, tmp_path / "run", requests=2)
    assert run_cli("fit", "--config", str(cfg)) == 0
    out = tmp_path / "report"
    args = ["evaluation-speed", "--job", str(cfg), "--runs", json.dumps({"tiny": str(tmp_path / "run")}),
            "--requests", json.dumps({"tiny": [2]}), "--seeds", "[188, 288]",
            "--candidates", "[{sampler: dpm_solver, steps: 2}, {sampler: unipc, steps: 3}]",
            "--lever_batch_sizes", "[4]", "--compile_unet", "false", "--base_model", "false", "--output", str(out)]
    assert run_cli(*args) == 0
    result = json.loads((out / "evaluation_speed.json").read_text())
    [row] = result["equality"]  # request 2 only
    assert (row["run"], row["request"], row["targets"]) == ("tiny", 2, "Byzantine")
    for key in ("old", "dpm_solver-2", "unipc-3"):
        assert len(row[key]["per_seed"]) == 2  # each seed evaluated alone; the mean is the 2-seed value
        assert row[key]["UA"] == sum(p["UA"] for p in row[key]["per_seed"]) / 2
    assert result["chosen"] in result["candidates"]
    assert [r["lever"] for r in result["levers"]][:2] == ["reference", "bf16 autocast"]
    assert result["levers"][0]["speedup"] == 1.0
    text = (out / "evaluation_speed.md").read_text()
    assert "Equality on real runs" in text and "| tiny | 2 | Byzantine |" in text
    # resumable: every (run, request, protocol, seed) result is cached; a rerun measures none of them again
    cached = json.loads((out / "evaluation_speed_cache.json").read_text())
    assert len([k for k in cached if k.startswith("tiny|")]) == 3 * 2
    assert run_cli(*args, "--levers", "false") == 0
    assert json.loads((out / "evaluation_speed.json").read_text())["equality"] == result["equality"]


def test_a_config_without_evaluation_is_a_one_line_error(tmp_path, tiny_sd, cache_dir, capsys):
    cfg = write_tiny_job(tmp_path / "job.yaml", tiny_sd, cache_dir, tmp_path / "run", evaluation=False)
    assert run_cli("evaluation-speed", "--job", str(cfg), "--output", str(tmp_path / "out")) == 2
    assert "has no trainer.evaluation section" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_the_base_model_result_is_cached_per_model(tmp_path, tiny_sd, cache_dir, monkeypatch):
    """A retrained base model (another fingerprint) is measured again, not read from another model's entry."""
    from cuig_lightning.benchmark import evaluation_speed as module
    from cuig_lightning.models.diffusion import fingerprint

    cfg = write_tiny_job(tmp_path / "job.yaml", tiny_sd, cache_dir, tmp_path / "run")
    out = tmp_path / "report"
    out.mkdir()
    settings = {"sampler": "dpm_solver", "steps": 2, "guidance": 1.5, "seeds": [188, 288]}
    stale = {"settings": settings, "style_accuracy": 1.0, "object_accuracy": 1.0, "n_images": 1}
    (out / "evaluation_speed_cache.json").write_text(json.dumps({
        "base|dpm_solver-2|[188, 288]": stale,  # the key before the fingerprint was part of it
        "base|another-model|dpm_solver-2|[188, 288]": stale}))
    measured = {"settings": settings, "style_accuracy": 99.0, "object_accuracy": 98.0, "n_images": 4}
    calls = []
    monkeypatch.setattr(module, "_base", lambda *args: calls.append(args) or measured)
    args = ["evaluation-speed", "--job", str(cfg), "--candidates", "[{sampler: dpm_solver, steps: 2}]",
            "--levers", "false", "--output", str(out)]
    assert run_cli(*args) == 0
    assert len(calls) == 1
    assert json.loads((out / "evaluation_speed.json").read_text())["base"] == {"dpm_solver-2": measured}
    cached = json.loads((out / "evaluation_speed_cache.json").read_text())
    assert cached[f"base|{fingerprint(tiny_sd)}|dpm_solver-2|[188, 288]"] == measured
    assert run_cli(*args) == 0 and len(calls) == 1  # the same model again: read from the cache


def test_a_missing_run_folder_is_a_one_line_error_before_anything_is_written(tmp_path, tiny_sd, cache_dir, capsys):
    cfg = write_tiny_job(tmp_path / "job.yaml", tiny_sd, cache_dir, tmp_path / "run")
    args = ["evaluation-speed", "--job", str(cfg), "--runs", json.dumps({"x": str(tmp_path / "nope")}),
            "--output", str(tmp_path / "out")]
    assert run_cli(*args) == 2
    assert "is not a cuig run folder" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "out").exists()
