"""Living with a run folder: evaluate and export from the folder alone, logs inside it, a bad config that
never locks it, and the reliability cases (a kill around the merge, tampered or foreign mid-request
checkpoints)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cuig_lightning.evaluation.protocol import SAMPLER_NAMES
from tests.helpers import cuig_process, deltas, run_cli, write_tiny_job


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_sd, cache_dir):
    """A fitted 2-request job, run from an empty working directory (to see what it writes outside run_dir)."""
    work = tmp_path_factory.mktemp("work")
    cfg = write_tiny_job(work / "job.yaml", tiny_sd, cache_dir, work / "run")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert run_cli("fit", "--config", str(cfg)) == 0
    finally:
        os.chdir(cwd)
    return work


def test_fit_writes_only_into_run_dir_with_logs_and_metrics(finished_run):
    assert sorted(os.listdir(finished_run)) == ["job.yaml", "run"]  # no ./lightning_logs
    run = finished_run / "run"
    lines = (run / "logs" / "01-Abstractionism" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert "request" in header and len(lines) == 1 + 3  # one row per step, the request named
    assert {row.split(",")[header.index("request")] for row in lines[1:]} == {"1.0"}
    assert [r["request"] for r in json.loads((run / "metrics.json").read_text())] == [1, 2]
    job = json.loads((run / "job.json").read_text())
    assert job["versions"]["torch"] == torch.__version__ and job["config"]["trainer"]["max_steps"] == 3


def test_evaluate_from_the_run_folder_alone(finished_run, capsys):
    run = finished_run / "run"
    capsys.readouterr()
    assert run_cli("evaluate", "--run_dir", str(run), "--request", "1",
                   "--trainer.evaluation.seeds", "[188, 288]") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["request"] == 1 and result["erased"] == ["Abstractionism"] and 0 <= result["UA"] <= 100
    # no evaluation section for a model that is not Canvas-mini: an error, not Canvas-mini's classifiers
    assert run_cli("evaluate", "--run_dir", str(run), "--request", "0", "--trainer.evaluation", "null") == 2
    assert "trainer.evaluation is null for model" in capsys.readouterr().err.splitlines()[-1]
    # evaluation, devices and progress settings are not part of the run identity: fit resumes (skips all)
    before = (run / "requests" / "02-Byzantine" / "manifest.json").read_bytes()
    assert run_cli("fit", "--config", str(finished_run / "job.yaml"), "--trainer.evaluation.seeds", "[7]",
                   "--trainer.enable_progress_bar", "true", "--trainer.log_every_n_steps", "5") == 0
    assert (run / "requests" / "02-Byzantine" / "manifest.json").read_bytes() == before


def test_the_evaluation_settings_are_recorded_beside_the_metrics_not_in_the_identity(finished_run, capsys):
    run = finished_run / "run"
    rows = json.loads((run / "metrics.json").read_text())
    # each request records what measured it: the job's sampler (seq12's), steps, guidance and seeds
    sampler = yaml.safe_load((finished_run / "job.yaml").read_text())["trainer"]["evaluation"]["sampler"]
    assert [r["evaluation"] for r in rows] == [{"sampler": sampler, "steps": 2, "guidance": 1.5, "seeds": [188],
                                                "bf16": True}] * 2
    assert f"Evaluation: {SAMPLER_NAMES[sampler]} 2 steps, guidance 1.5, seeds 188." in (run / "metrics.md").read_text()
    # another sampler evaluates the same folder (it is not part of the run identity) and says which it used
    capsys.readouterr()
    other = next(s for s in SAMPLER_NAMES if s != sampler)
    assert run_cli("evaluate", "--run_dir", str(run), "--request", "2", "--trainer.evaluation.sampler", other) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["evaluation"]["sampler"] == other and result["erased"] == ["Abstractionism", "Byzantine"]
    # and fit under it resumes the finished job untouched
    before = (run / "metrics.json").read_bytes()
    assert run_cli("fit", "--config", str(finished_run / "job.yaml"), "--trainer.evaluation.sampler", other) == 0
    assert (run / "metrics.json").read_bytes() == before
    # an unknown sampler is a one-line error
    assert run_cli("fit", "--config", str(finished_run / "job.yaml"), "--trainer.evaluation.sampler", "euler") == 2
    assert "sampler" in capsys.readouterr().err.splitlines()[-1]


def test_export_from_the_run_folder_loads_and_samples(finished_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "export"
    assert run_cli("export", "--run_dir", str(finished_run / "run"), "--output", str(out)) == 0
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    image = pipe("A Cats image in Monet style.", num_inference_steps=2, height=64, width=64,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDPMScheduler"
    card = (out / "README.md").read_text()
    assert "1. Abstractionism (style), 2. Byzantine (style)" in card and "UA" in card
    files = [p for p in out.rglob("*")]
    assert not any(p.is_symlink() for p in files)
    for p in files:
        if p.suffix in (".json", ".md", ".txt"):
            assert str(finished_run) not in p.read_text() and str(tmp_path) not in p.read_text(), p


def test_bad_callback_argument_never_locks_the_folder(tmp_path, tiny_sd, cache_dir, capsys):
    run = tmp_path / "run"
    bad = write_tiny_job(tmp_path / "bad.yaml", tiny_sd, cache_dir, run, requests=1, evaluation=False,
                         callbacks=[{"class_path": "callbacks.NormRegularizer", "init_args": {"wieght": 1.0}}])
    assert run_cli("fit", "--config", str(bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cuig: error: trainer.callbacks[0]") and "'wieght'" in err[-1] and "weight" in err[-1]
    assert not (run / "job.json").exists()
    # a command as a callback is refused before anything is created
    evil = write_tiny_job(tmp_path / "evil.yaml", tiny_sd, cache_dir, run, requests=1, evaluation=False,
                          callbacks=[{"class_path": "os.system", "init_args": {"command": f"touch {tmp_path}/owned"}}])
    assert run_cli("fit", "--config", str(evil)) == 2
    assert "not a lightning.pytorch.callbacks.callback.Callback subclass" in capsys.readouterr().err
    assert not (tmp_path / "owned").exists()
    # a job that fails after claiming, before its first checkpoint, releases the folder
    poison = write_tiny_job(tmp_path / "poison.yaml", tiny_sd, cache_dir, run, requests=1, evaluation=False,
                            callbacks=[{"class_path": "tests.helpers.PoisonWeights", "init_args": {"stage": 0, "step": 0}}])
    assert run_cli("fit", "--config", str(poison)) == 2
    assert "non-finite loss" in capsys.readouterr().err and not (run / "job.json").exists()
    good = write_tiny_job(tmp_path / "good.yaml", tiny_sd, cache_dir, run, requests=1, evaluation=False,
                          callbacks=[{"class_path": "callbacks.NormRegularizer", "init_args": {"weight": 1.0}}])
    assert run_cli("fit", "--config", str(good)) == 0
    assert len(deltas(run)) == 1


def test_kill_around_the_merge_and_tampered_checkpoints(tmp_path, tiny_sd, cache_dir, capsys):
    """ModelMerge: a SIGKILL after request 2's last step, before its merge, resumes to the uninterrupted
    result; a byte-flipped or foreign last.ckpt is refused first."""
    callbacks = [{"class_path": "tests.helpers.DieAt"},
                 {"class_path": "callbacks.ModelMerge", "init_args": {"density": 0.5}}]
    job = dict(requests=2, evaluation=False, schedule="independent", callbacks=callbacks, max_steps=4)
    ref = write_tiny_job(tmp_path / "ref.yaml", tiny_sd, cache_dir, tmp_path / "ref", **job)
    assert run_cli("fit", "--config", str(ref)) == 0

    run = tmp_path / "killed"
    cfg = write_tiny_job(tmp_path / "killed.yaml", tiny_sd, cache_dir, run, **job)
    proc = cuig_process("fit", "--config", str(cfg), env={"CUIG_TEST_DIE_AT": "1"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -9, out
    second = run / "requests" / "02-Byzantine"
    assert not (second / "manifest.json").exists() and (second / "partial" / "last.ckpt").is_file()
    saved = shutil.copytree(second / "partial", tmp_path / "saved_partial")

    last = second / "partial" / "last.ckpt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a tensor
    last.write_bytes(bytes(data))
    assert run_cli("fit", "--config", str(cfg)) == 2
    assert "corrupt mid-request checkpoint" in capsys.readouterr().err

    # request 2's (valid) checkpoint moved into request 1's folder, which is made to look unfinished
    shutil.rmtree(second / "partial")
    shutil.copytree(saved, second / "partial")
    first = run / "requests" / "01-Abstractionism"
    kept = first.with_name("kept")
    shutil.copytree(first, kept)
    (first / "manifest.json").unlink()
    shutil.copytree(saved, first / "partial")
    assert run_cli("fit", "--config", str(cfg)) == 2
    assert "belongs to another request" in capsys.readouterr().err
    shutil.rmtree(first)
    kept.rename(first)

    assert run_cli("fit", "--config", str(cfg)) == 0
    for a, b in zip(deltas(tmp_path / "ref"), deltas(run), strict=True):
        ta, tb = load_file(a), load_file(b)
        assert all(torch.equal(ta[k], tb[k]) for k in ta), f"{b} differs from the uninterrupted run"
    assert (second / "merge.json").is_file()


def test_long_steps_show_progress_and_the_bar_names_the_request(tmp_path, tiny_sd, capfd):
    """Anchor generation and evaluation have bars, the training bar names the request, Lightning's tips are silenced."""
    cfg = write_tiny_job(tmp_path / "job.yaml", tiny_sd, tmp_path / "fresh_cache", tmp_path / "run", requests=1,
                         enable_progress_bar=True)
    assert run_cli("fit", "--config", str(cfg)) == 0
    out = "".join(capfd.readouterr())
    for text in ("anchor images (", "evaluation (", "request 1/1 Abstractionism"):
        assert text in out, text
    assert "litlogger" not in out and "v_num" not in out


def test_curve_seeds_measure_retention_between_first_and_last_request_from_fewer_seeds(tmp_path, tiny_sd, cache_dir,
                                                                                       capsys):
    """``trainer.curve_seeds: 1`` with two evaluation seeds: requests 1 and 3 as the full evaluation, request 2's
    UA and drift as the full one's, its RA-I / RA-C as a one-seed evaluation's (marked ``RA_seeds``); the same
    run identity as without it."""
    cfg = write_tiny_job(tmp_path / "job.yaml", tiny_sd, cache_dir, tmp_path / "full", requests=3)
    two_seeds = ("--trainer.evaluation.seeds", "[188, 288]")
    assert run_cli("fit", "--config", str(cfg), *two_seeds) == 0
    assert run_cli("fit", "--config", str(cfg), f"--trainer.run_dir={tmp_path / 'one'}") == 0  # seed 188 alone
    curve_dir = tmp_path / "curve"
    assert run_cli("fit", "--config", str(cfg), *two_seeds, f"--trainer.run_dir={curve_dir}",
                   "--trainer.curve_seeds", "1") == 0
    full, one, curve = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("full", "one", "curve"))
    assert curve[0] == full[0] and curve[2] == full[2]
    assert (curve[1]["UA"], curve[1]["drift"]) == (full[1]["UA"], full[1]["drift"])
    assert (curve[1]["RA_I"], curve[1]["RA_C"], curve[1]["RA_seeds"]) == (one[1]["RA_I"], one[1]["RA_C"], 1)
    assert "unlearn" not in curve[1]["per_concept"]  # request 2's per-concept UA would be one seed's
    assert (curve_dir / "metrics.csv").read_text().splitlines()[0].endswith(",RA_seeds")
    assert run_cli("fit", "--config", str(cfg), *two_seeds, f"--trainer.run_dir={curve_dir}") == 0  # same identity
    capsys.readouterr()
    assert run_cli("fit", "--config", str(cfg), f"--trainer.run_dir={tmp_path / 'bad'}",
                   "--trainer.curve_seeds", "0") == 2
    assert "curve_seeds needs trainer.evaluation and must be >= 1" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "bad").exists()


def test_stop_below_ua_ends_the_job_and_a_later_run_continues_it(tmp_path, tiny_sd, cache_dir, capsys):
    """``trainer.stop_below_ua`` ends the job after a request under it; it is not part of the run's identity,
    so the same config without it continues the sequence where the stopped job ended."""
    cfg = write_tiny_job(tmp_path / "job.yaml", tiny_sd, cache_dir, tmp_path / "run", requests=2)
    assert run_cli("fit", "--config", str(cfg), "--trainer.stop_below_ua", "100.1") == 0  # UA <= 100 always
    run = tmp_path / "run"
    assert [r["request"] for r in json.loads((run / "metrics.json").read_text())] == [1]
    assert [p.parent.name for p in deltas(run)] == ["01-Abstractionism"]
    first = (run / "requests" / "01-Abstractionism" / "manifest.json").read_bytes()
    assert run_cli("fit", "--config", str(cfg)) == 0
    assert [r["request"] for r in json.loads((run / "metrics.json").read_text())] == [1, 2]
    assert (run / "requests" / "01-Abstractionism" / "manifest.json").read_bytes() == first
    capsys.readouterr()
    no_eval = write_tiny_job(tmp_path / "no_eval.yaml", tiny_sd, cache_dir, tmp_path / "run2", evaluation=False)
    assert run_cli("fit", "--config", str(no_eval), "--trainer.stop_below_ua", "85") == 2
    assert "stop_below_ua needs trainer.evaluation" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "run2").exists()


def test_retention_measured_after_the_last_request_only(tmp_path, tiny_sd, cache_dir):
    """``trainer.measure_retention: last_request`` samples only the erased concepts' prompts before the last
    request (UA and drift, the same values as the full grid's), the whole grid after it and where
    ``stop_below_ua`` ends the job; it is not part of the run identity, so a full run continues the folder."""
    cfg = write_tiny_job(tmp_path / "job.yaml", tiny_sd, cache_dir, tmp_path / "full", requests=3)
    assert run_cli("fit", "--config", str(cfg)) == 0
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    lean_dir = tmp_path / "lean"
    option = ("--trainer.measure_retention", "last_request")
    assert run_cli("fit", "--config", str(cfg), f"--trainer.run_dir={lean_dir}", *option) == 0
    lean = json.loads((lean_dir / "metrics.json").read_text())
    assert [sorted(k for k in ("RA_I", "RA_C") if k in r) for r in lean] == [[], [], ["RA_C", "RA_I"]]
    assert [(r["UA"], r["drift"]) for r in lean] == [(r["UA"], r["drift"]) for r in full]
    assert lean[-1] == full[-1]
    assert not (lean_dir / "requests" / "01-Abstractionism" / "samples.png").exists()

    chosen_dir = tmp_path / "chosen"  # a list: after those requests (and the last)
    assert run_cli("fit", "--config", str(cfg), f"--trainer.run_dir={chosen_dir}",
                   "--trainer.measure_retention", "[1]") == 0
    chosen = json.loads((chosen_dir / "metrics.json").read_text())
    assert [sorted(k for k in ("RA_I", "RA_C") if k in r) for r in chosen] == [["RA_C", "RA_I"], [], ["RA_C", "RA_I"]]
    assert (chosen[0], chosen[2]) == (full[0], full[2])
    assert run_cli("fit", "--config", str(cfg), f"--trainer.run_dir={tmp_path / 'bad'}",
                   "--trainer.measure_retention", "[0]") == 2

    stopped_dir = tmp_path / "stopped"
    assert run_cli("fit", "--config", str(cfg), f"--trainer.run_dir={stopped_dir}", *option,
                   "--trainer.stop_below_ua", "100.1") == 0  # stops after request 1: retention measured there
    assert json.loads((stopped_dir / "metrics.json").read_text()) == full[:1]
    assert run_cli("fit", "--config", str(cfg), f"--trainer.run_dir={stopped_dir}") == 0  # the same identity
    assert json.loads((stopped_dir / "metrics.json").read_text()) == full


def test_a_request_copied_in_from_another_run_is_neither_evaluated_nor_exported(finished_run, tmp_path, capsys,
                                                                               monkeypatch):
    """Issue 37.4: a request whose manifest names another run's identity was evaluated (rc 0) and half exported
    before export refused it. Export verifies before it writes and writes into a temporary folder renamed at
    the end: no output folder is left by any failure."""
    run = shutil.copytree(finished_run / "run", tmp_path / "copied")
    manifest_path = run / "requests" / "02-Byzantine" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["config_hash"] = "0123456789abcdef"  # as if the folder came from another run
    manifest_path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert run_cli("evaluate", "--run_dir", str(run), "--request", "2") == 2
    captured = capsys.readouterr()
    assert "02-Byzantine was written by a different config" in captured.err.splitlines()[-1] and captured.out == ""
    out = tmp_path / "export"
    assert run_cli("export", "--run_dir", str(run), "--output", str(out)) == 2  # the last request: request 2
    assert "02-Byzantine was written by a different config" in capsys.readouterr().err.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copied"]  # no output folder, no temporary one
    # request 1 is this run's own: exported
    assert run_cli("export", "--run_dir", str(run), "--request", "1", "--output", str(out)) == 0
    assert "1. Abstractionism (style)" in (out / "README.md").read_text() and (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copied", "export"]
    # a failure while writing leaves nothing either
    from cuig_lightning import export

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(export, "model_card", disk_full)
    assert run_cli("export", "--run_dir", str(run), "--request", "1", "--output", str(tmp_path / "again")) == 2
    assert "No space left on device" in capsys.readouterr().err.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copied", "export"]


def test_fit_tidies_what_a_kill_left_in_finished_requests(finished_run, tmp_path):
    """Issue 37.6: a kill right after a manifest leaves partial/, a kill inside an atomic write a .tmp file; the
    next fit, once every finished request is verified, removes them and keeps the request."""
    run = shutil.copytree(finished_run / "run", tmp_path / "killed")
    second = run / "requests" / "02-Byzantine"
    before = {p.name: p.read_bytes() for p in second.iterdir()}
    (second / "partial").mkdir()
    (second / "partial" / "last.ckpt").write_bytes(b"left over")
    (second / "partial" / "last.json").write_text("{}")
    (second / ".unet_delta.safetensors.k1ll3d.tmp").write_bytes(b"half a delta")
    assert run_cli("fit", "--config", str(finished_run / "job.yaml"), f"--trainer.run_dir={run}") == 0
    assert {p.name: p.read_bytes() for p in second.iterdir()} == before


def test_an_evaluation_without_retain_sets_is_refused_before_training(tmp_path, tiny_sd, cache_dir, capsys):
    """Issue 37.5: it was refused only after request 1 had trained."""
    cfg = write_tiny_job(tmp_path / "job.yaml", tiny_sd, cache_dir, tmp_path / "run", requests=2)
    assert run_cli("fit", "--config", str(cfg), "--trainer.evaluation.retain_objects", "[]") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("cuig: error: trainer.evaluation has no retain_objects: the evaluation after each request "
                       "needs both retain sets; set trainer.evaluation.retain_objects"), err[-1]
    assert not (tmp_path / "run").exists()


def test_training_progress_in_a_log_file_is_a_few_plain_lines(tmp_path, tiny_sd, cache_dir, capfd, monkeypatch):
    """Issue 37.8: with stderr not a terminal (a log file; capfd's is not), no bar redrawn every step: a plain line
    every 10% of the request's steps; on a terminal the bar stays."""
    cfg = write_tiny_job(tmp_path / "job.yaml", tiny_sd, cache_dir, tmp_path / "run", requests=2, evaluation=False,
                         enable_progress_bar=True, max_steps=20, checkpoint_every=50)
    assert run_cli("fit", "--config", str(cfg)) == 0
    err = capfd.readouterr().err
    for i, target in ((1, "Abstractionism"), (2, "Byzantine")):
        label = f"request {i}/2 {target}"
        assert not any(label in chunk for line in err.split("\n") for chunk in line.split("\r")[:-1]), err
        lines = [line for line in err.splitlines() if label in line]
        assert [line.split(": step ")[1].split(",")[0] for line in lines] == [f"{s}/20" for s in range(2, 21, 2)], lines
        assert all(line.startswith(f"{label}: step ") and ", loss/unlearn " in line for line in lines), lines
    from cuig_lightning.stage import RequestLogLines, RequestProgressBar, stage_callbacks

    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert isinstance(stage_callbacks([], None, "r", True)[-1], RequestProgressBar)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert isinstance(stage_callbacks([], None, "r", True)[-1], RequestLogLines)
