"""The command line: help, --print_config round trip, and one-line errors that change nothing."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from cuig_lightning import commands
from tests.helpers import REPO, run_cli, tree_digest



def test_help_and_fit_help():
    for args in (["--help"], ["fit", "--help"], ["export", "--help"]):
        out = subprocess.run([sys.executable, "-m", "cuig_lightning", *args], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, out.stderr
        assert "usage: cuig" in out.stdout or "usage:" in out.stdout
    assert "--trainer.requests" in out.stdout or "requests" in out.stdout


def test_print_config_round_trips(make_config, tmp_path, capsys):
    cfg = make_config(requests=[{"target": "Van_Gogh"}])
    assert run_cli("fit", "--config", str(cfg), "--print_config") == 0
    printed = capsys.readouterr().out
    parsed = yaml.safe_load(printed)
    assert parsed["trainer"]["requests"][0]["target"] == "Van_Gogh"
    assert parsed["model"]["method"] == {"class_path": "cuig_lightning.methods.ConAbl",
                                         "init_args": {"trainable": "xattn_kv", "variant": "model",
                                                       "anchor_preservation": 0.0, "detach_first_token": True}}
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    assert run_cli("fit", "--config", str(again)) == 0
    assert (tmp_path / "run" / "requests" / "01-Van_Gogh" / "manifest.json").is_file()


def _fails_with(capsys, args, *needles) -> None:
    code = run_cli(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) >= 1 and err[-1].startswith("cuig: error:"), err
    for needle in needles:
        assert needle.lower() in err[-1].lower(), err[-1]


@pytest.mark.parametrize(
    "requests, needle",
    [
        ([], "empty"),
        ([{"target": ""}], "empty target"),
        ([{"target": "Rembrandt"}], "unknown style concept 'Rembrandt'"),
        ([{"target": "Van_Gogh"}, {"target": "Van_Gogh"}], "requested twice"),
        ([{"target": "Dogs", "domain": "object"}], "needs an anchor"),
    ],
)
def test_bad_requests(make_config, capsys, tmp_path, requests, needle):
    _fails_with(capsys, ["fit", "--config", str(make_config(requests=requests))], needle)
    assert not (tmp_path / "run").exists()


def test_unknown_config_key(make_config, capsys, tmp_path):
    cfg = make_config(model={"learning_rat": 1.0})
    _fails_with(capsys, ["fit", "--config", str(cfg)], "learning_rat")


def test_missing_model_path(make_config, capsys, tmp_path):
    cfg = make_config(model={"model_path": str(tmp_path / "nowhere")})
    _fails_with(capsys, ["fit", "--config", str(cfg)], "nowhere")


def test_foreign_run_folder_and_corrupt_delta_change_nothing(make_config, capsys, tmp_path):
    first = make_config("a.yaml", requests=[{"target": "Van_Gogh"}, {"target": "Picasso"}])
    assert run_cli("fit", "--config", str(first)) == 0
    run_dir = tmp_path / "run"
    before = tree_digest(run_dir)

    other = make_config("b.yaml", requests=[{"target": "Monet"}])
    _fails_with(capsys, ["fit", "--config", str(other)], "different config")
    assert tree_digest(run_dir) == before

    delta = run_dir / "requests" / "01-Van_Gogh" / "unet_delta.safetensors"
    data = bytearray(delta.read_bytes())
    data[-1] ^= 0xFF
    delta.write_bytes(bytes(data))
    tampered = tree_digest(run_dir)
    _fails_with(capsys, ["fit", "--config", str(first)], "sha256", "01-Van_Gogh")
    assert tree_digest(run_dir) == tampered


def test_corrupt_mid_request_checkpoint(make_config, capsys, tmp_path):
    cfg = make_config(requests=[{"target": "Van_Gogh"}, {"target": "Picasso"}])
    assert run_cli("fit", "--config", str(cfg)) == 0
    second = tmp_path / "run" / "requests" / "02-Picasso"
    for f in second.iterdir():  # make request 2 look interrupted, with a damaged last.ckpt
        f.unlink()
    partial = second / "partial" / "last.ckpt"
    partial.parent.mkdir()
    partial.write_bytes(b"not a checkpoint")
    before = tree_digest(tmp_path / "run")
    _fails_with(capsys, ["fit", "--config", str(cfg)], "corrupt mid-request checkpoint", "last.ckpt")
    assert tree_digest(tmp_path / "run") == before


def test_run_folder_without_owner_is_refused(make_config, capsys, tmp_path):
    cfg = make_config(requests=[{"target": "Van_Gogh"}])
    (tmp_path / "run" / "requests" / "01-Van_Gogh").mkdir(parents=True)
    _fails_with(capsys, ["fit", "--config", str(cfg)], "no job.json")


def test_nan_loss_stops_and_keeps_previous_request(make_config, capsys, tmp_path):
    poison = [{"class_path": "tests.helpers.PoisonWeights", "init_args": {"stage": 1, "step": 1}}]
    cfg = make_config(requests=[{"target": "Van_Gogh"}, {"target": "Picasso"}], trainer={"callbacks": poison})
    _fails_with(capsys, ["fit", "--config", str(cfg)], "non-finite loss", "request 2")
    first = tmp_path / "run" / "requests" / "01-Van_Gogh"
    assert (first / "manifest.json").is_file()
    from cuig_lightning.checkpoints import read_manifest

    read_manifest(first, verify=True)
    assert not (tmp_path / "run" / "requests" / "02-Picasso" / "manifest.json").exists()


@pytest.mark.parametrize("args, needle", [
    (["--trainer.schedule", "foo"], "sequential"),
    (["--model.method", "Foo"], "Foo"),
    (["--model.learning_rate", "abc"], "float"),
    (["--trainer.precision", "7"], "precision"),
    (["--trainer.max_steps", "-2"], "max_steps"),
    (["--trainer.checkpoint_every", "0"], "checkpoint_every"),
    (["--trainer.max_step", "3"], "unrecognized arguments: --trainer.max_step"),  # no prefix matching
    (["--trainer.evaluation.seeds", "[]"], "seeds is empty"),
    (["--trainer.logger", "os.system"], "not a lightning.pytorch.loggers"),
])
def test_config_errors_say_why_in_one_line(make_config, capsys, tmp_path, args, needle):
    cfg = make_config(requests=[{"target": "Van_Gogh"}])
    code = run_cli("fit", "--config", str(cfg), *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("cuig: error:"), err
    assert needle.lower() in err[-1].lower() and not err[-1].rstrip().endswith(":"), err[-1]
    assert not (tmp_path / "run" / "job.json").exists()


@pytest.mark.parametrize("args, needle", [
    (["pretrain", "--steps", "abc"], 'key "steps"'),
    (["instrument", "--seedz", "1"], "unrecognized arguments: --seedz"),
    (["train-classifier", "--kind", "colour"], "kind"),
])
def test_function_command_errors_are_one_line(capsys, args, needle):
    assert run_cli(*args) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [captured.err.strip()] and needle in captured.err
    assert captured.err.startswith("cuig: error:") and "usage:" not in captured.out + captured.err


def test_truncated_model_weights_are_one_line(tiny_sd, make_config, capsys, tmp_path):
    import shutil

    broken = shutil.copytree(tiny_sd, tmp_path / "broken")
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    cfg = make_config(model={"model_path": str(broken)})
    _fails_with(capsys, ["fit", "--config", str(cfg)], "broken")


def test_help_lists_every_command_and_documents_every_key():
    out = subprocess.run([sys.executable, "-m", "cuig_lightning", "--help"], capture_output=True, text=True, cwd=REPO)
    for command in ("fit", "evaluate", "export", "benchmark", "pretrain", "evaluate-base", "train-classifier"):
        assert command in out.stdout
    fit = subprocess.run([sys.executable, "-m", "cuig_lightning", "fit", "--help"], capture_output=True, text=True,
                         cwd=REPO).stdout
    assert "docs/method.md" not in fit
    # every cuig key (model, data, evaluation, the continual trainer's own) says more than its type and default
    blocks = re.split(r"\n  (?=--)", fit)
    ours = ("--model.", "--data.", "--trainer.evaluation.", "--trainer.requests", "--trainer.schedule",
            "--trainer.run_dir", "--trainer.checkpoint_every")
    checked = 0
    for block in blocks:
        name = block.split()[0]
        if not name.startswith(ours) or name.endswith((".help", "CONFIG")) or "." not in name[2:]:
            continue
        text = re.sub(r"\(type:.*?\)|\(default:.*?\)|\(required.*?\)", "", " ".join(block.split()[1:]), flags=re.S)
        text = re.sub(r"^[A-Z_]+|\{[^}]*\}", "", text).strip()
        assert len(text) > 10, f"no help text for {name}: {block}"
        checked += 1
    assert checked > 15


def test_run_folders_made_before_later_options_keep_their_identity(capsys):
    """A job.json written before an option existed lacks its key; the same job resolved by today's CLI has it
    at its default (e.g. ``data.style_templates: null``). Both must hash alike, or `cuig evaluate --run_dir` and
    resumes refuse every older run folder as foreign."""
    from cuig_lightning.run_folder import LATER_OPTIONS, identity_hash

    assert run_cli("fit", "--config", str(REPO / "configs" / "seq12.yaml"), "--print_config") == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    older = yaml.safe_load(yaml.safe_dump(resolved))
    for section, key in LATER_OPTIONS:
        assert key in resolved[section], (section, key)  # the test sees every later option resolved...
        older[section].pop(key)  # ...and an older job.json without it
    assert identity_hash(older) == identity_hash(resolved)
    changed = yaml.safe_load(yaml.safe_dump(resolved))
    changed["data"]["style_templates"] = ["{prompt}, by {style}."]  # a real change still counts
    assert identity_hash(changed) != identity_hash(resolved)


def test_every_shipped_benchmark_config_parses(capsys):
    """The benchmark configs go through the real CLI (types included: a λ schedule is a list value in the grid)."""
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    benchmarks = [c for c in configs if "methods" in (yaml.safe_load(c.read_text()) or {})]
    assert REPO / "configs" / "paper" / "main_table.yaml" in benchmarks
    for config in benchmarks:
        assert run_cli("benchmark", "--config", str(config), "--print_config") == 0, config
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["tuning"] is None or printed["tuning"]["grid"], config
    main = yaml.safe_load((REPO / "configs" / "paper" / "main_table.yaml").read_text())
    assert any(isinstance(v, list) for v in main["tuning"]["grid"]["merge"]["ModelMerge"]["lam"])


def test_instrument_with_a_missing_model_folder_writes_nothing(tmp_path, capsys):
    assert run_cli("instrument", "--model", str(tmp_path / "missing"), "--runs_dir", str(tmp_path / "runs"),
                   "--output", str(tmp_path / "instrument.md")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"cuig: error: model folder {tmp_path / 'missing'} does not exist"
    assert sorted(tmp_path.iterdir()) == []


def test_benchmark_with_no_jobs_is_an_error_before_anything_runs(tmp_path, capsys):
    assert run_cli("benchmark", "--config", str(REPO / "configs" / "paper" / "main_table.yaml"), "--jobs", "0",
                   "--output", str(tmp_path / "runs"), "--report", str(tmp_path / "report")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "cuig: error: jobs must be >= 1, got 0"
    assert sorted(tmp_path.iterdir()) == []


def test_benchmark_rows_none_is_the_whole_table_and_empty_is_none(monkeypatch):
    """`--rows '[]'` plans no rows (e.g. the simultaneous curve alone); it used to mean all ten."""
    planned = []
    monkeypatch.setattr(commands, "run_benchmark", lambda base, methods, rows, *args, **kwargs: planned.append(rows))
    commands.benchmark()
    commands.benchmark(rows=[])
    commands.benchmark(rows=["simultaneous"])
    assert planned == [commands.MAIN_TABLE_ROWS, [], ["simultaneous"]]
    assert len(commands.MAIN_TABLE_ROWS) == 10


def _one_error_line(capsys) -> str:
    """A failed command's stderr ends in its one ``cuig: error:`` line, with no traceback before it (progress
    bars of model loading may come first)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("cuig: error: "), err
    assert sum("error" in line.lower() for line in err) == 1 and not any("Traceback" in line for line in err), err
    return err[-1]


@pytest.mark.parametrize("callback, needle", [
    ({"class_path": "callbacks.GradientProjection", "init_args": {"k": 0}}, "GradientProjection k must be >= 1, got 0"),
    ({"class_path": "callbacks.SelectiveFineTuning", "init_args": {"topk": 0}}, "topk must be in (0, 1], got 0"),
    ({"class_path": "callbacks.SelectiveFineTuning", "init_args": {"topk": 1.5}}, "topk must be in (0, 1], got 1.5"),
    ({"class_path": "callbacks.ModelMerge", "init_args": {"density": -1}}, "density must be in (0, 1], got -1"),
])
def test_a_callback_that_refuses_its_arguments_is_one_line(make_config, capsys, tmp_path, callback, needle):
    """Issue 37.1: it used to pass parsing and die inside Lightning ('Namespace' object has no attribute
    'on_exception') with the run folder claimed and locked."""
    cfg = make_config(requests=[{"target": "Van_Gogh"}], trainer={"callbacks": [callback]})
    assert run_cli("fit", "--config", str(cfg)) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"cuig: error: trainer.callbacks[0] ({callback['class_path']}): ") and needle in line, line
    assert not (tmp_path / "run").exists()  # nothing written, nothing locked


@pytest.mark.parametrize("key", ["images_per_prompt", "sample_steps", "batch_size"])
def test_data_sizes_below_one_are_one_line(make_config, capsys, tmp_path, key):
    """Issue 37.2: images_per_prompt 0 was a RuntimeError traceback, sample_steps 0 a ZeroDivisionError."""
    cfg = make_config(requests=[{"target": "Van_Gogh"}], data={key: 0})
    assert run_cli("fit", "--config", str(cfg)) == 2
    assert f"data.{key} must be an integer >= 1, got 0" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, needle", [
    (b"", "is empty"),
    (b"# nothing but a comment\n", "is empty"),
    (b"\x80\x81binary\x00", "is not a UTF-8 text file (byte 0x80 at position 0)"),
    (b"- a\n- b\n", "holds a list, not a mapping of config keys"),
    (b"trainer: [1\n", "is not valid YAML: expected ',' or ']'"),
])
@pytest.mark.parametrize("command", ["fit", "benchmark"])
def test_a_bad_config_file_is_named_with_what_is_wrong(capsys, tmp_path, content, needle, command):
    """Issue 37.3: an empty file said only 'Unexpected config:', a binary one "'utf-8' codec can't decode
    byte 0x80" without naming the file."""
    bad = tmp_path / "job.yaml"
    bad.write_bytes(content)
    assert run_cli(command, "--config", str(bad)) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"cuig: error: config file {bad} ") and needle in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


def test_a_full_disk_while_writing_a_delta_is_one_line(make_config, capsys, tmp_path, monkeypatch):
    """Issue 37.7: safetensors' SafetensorError (No space left on device) was a traceback. The failed write
    leaves no temporary file, no manifest, and a resumable folder that a later run finishes."""
    from safetensors import SafetensorError

    from cuig_lightning import checkpoints

    real = checkpoints.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if "unet_delta" in str(filename):
            real(tensors, filename, *args, **kwargs)  # a part is written, then the disk is full
            raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_file", full_disk)
    cfg = make_config(requests=[{"target": "Van_Gogh"}])
    assert run_cli("fit", "--config", str(cfg)) == 2
    line = _one_error_line(capsys)
    request = tmp_path / "run" / "requests" / "01-Van_Gogh"
    assert f"cannot write {request / 'unet_delta.safetensors'}" in line and "No space left on device" in line, line
    assert sorted(p.name for p in request.iterdir()) == ["partial"]  # no delta, no .tmp, no manifest
    monkeypatch.setattr(checkpoints, "save_file", real)
    assert run_cli("fit", "--config", str(cfg)) == 0  # resumed from partial/last.ckpt
    assert (request / "manifest.json").is_file() and not (request / "partial").exists()


def test_a_finished_command_leaves_no_model_alive(make_config, tmp_path):
    """Commands run in one process one after another (the benchmark's fits with jobs 1, cuig smoke) must not keep the
    previous command's model: jsonargparse leaves its last parser, which holds the CLI, in a context variable
    (4-5 GB more at SD-1.5 size). cli.main runs each command line in a copied context."""
    import gc

    from cuig_lightning.module import UnlearningModule

    def alive() -> int:
        gc.collect()
        return sum(isinstance(o, UnlearningModule) for o in gc.get_objects())

    before = alive()
    assert run_cli("fit", "--config", str(make_config(requests=[{"target": "Van_Gogh", "domain": "style"}],
                                                      trainer={"max_steps": 1}))) == 0
    assert run_cli("export", "--run_dir", str(tmp_path / "run"), "--output", str(tmp_path / "export")) == 0
    assert alive() == before
