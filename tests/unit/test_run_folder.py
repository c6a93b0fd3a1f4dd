"""The run folder's rules without training: run identity, job.json, the lock, manifests that must vouch
for their delta, config class checks, one-line errors, and ``--run_dir`` for evaluate / export."""

from __future__ import annotations

import json

import pytest
import torch

from callbacks import NormRegularizer
from cuig_lightning.checkpoints import DELTA, CheckpointError, read_manifest, save_tensors, write_manifest
from cuig_lightning.cli import from_run_folder, one_line
from cuig_lightning.config_checks import ConfigError, check_classes
from cuig_lightning.evaluation.protocol import Evaluation
from cuig_lightning.requests import DEFAULT_STYLE_TEMPLATES
from cuig_lightning.run_folder import JOB, RunFolder, RunFolderError, identity_hash, read_job, saved_config
from lightning.pytorch.callbacks import Callback

CONFIG = {"seed_everything": 1, "model": {"model_path": "m", "learning_rate": 1e-5},
          "data": {"batch_size": 2, "cache_dir": "/a"},
          "trainer": {"requests": [{"target": "A"}], "max_steps": 4, "run_dir": "r", "devices": 1,
                      "evaluation": {"seeds": [188], "guidance": 1.5}, "enable_progress_bar": False,
                      "logger": None, "log_every_n_steps": 1, "checkpoint_every": 2}}


def _changed(section: str, key: str, value) -> dict:
    config = json.loads(json.dumps(CONFIG))
    config[section][key] = value
    return config


@pytest.mark.parametrize("section, key, value", [
    ("trainer", "run_dir", "elsewhere"), ("trainer", "devices", 4), ("trainer", "evaluation", None),
    ("trainer", "evaluation", {"seeds": [188], "guidance": 1.5, "sampler": "dpm_solver", "steps": 5}),
    ("trainer", "enable_progress_bar", True), ("trainer", "logger", False), ("trainer", "log_every_n_steps", 50),
    ("trainer", "checkpoint_every", 3), ("data", "cache_dir", "/b"),
    # options added later, at the value that trains as before they existed (finished runs stay theirs)
    ("trainer", "until_ua", None), ("trainer", "until_ua_every", 20), ("data", "style_templates", DEFAULT_STYLE_TEMPLATES),
])
def test_identity_ignores_what_does_not_change_the_weights(section, key, value):
    assert identity_hash(_changed(section, key, value)) == identity_hash(CONFIG)


@pytest.mark.parametrize("section, key, value", [
    ("trainer", "max_steps", 5), ("trainer", "requests", [{"target": "B"}]), ("trainer", "precision", "bf16-mixed"),
    ("trainer", "callbacks", [{"class_path": "callbacks.NormRegularizer"}]), ("model", "learning_rate", 1e-4),
    ("data", "batch_size", 4), ("seed_everything", None, None), ("trainer", "until_ua", 95.0),
    ("data", "style_templates", ["In {style} style, {prompt}."]),
])
def test_identity_counts_what_decides_the_weights(section, key, value):
    changed = dict(CONFIG, seed_everything=2) if section == "seed_everything" else _changed(section, key, value)
    assert identity_hash(changed) != identity_hash(CONFIG)


@pytest.mark.parametrize("text, needle", [("{not json", "is corrupt"), ("[1, 2]", "not a cuig job file"),
                                          ('{"x": 1}', "not a cuig job file")])
def test_bad_job_json_is_named(tmp_path, text, needle):
    (tmp_path / JOB).write_text(text)
    with pytest.raises(RunFolderError, match=needle) as err:
        RunFolder(tmp_path, CONFIG).check_owner()
    assert str(tmp_path / JOB) in str(err.value)


def test_claim_stores_config_and_versions_and_release_undoes_it(tmp_path):
    run = RunFolder(tmp_path / "run", CONFIG)
    assert run.claim({"torch": "x"}) and not run.claim()
    job = read_job(run.root)
    assert job["versions"] == {"torch": "x"} and saved_config(run.root) == CONFIG
    (run.root / "requests" / "01-A").mkdir(parents=True)
    run.release()  # nothing resumable yet: the folder is free again
    assert not (run.root / JOB).exists() and not (run.root / "requests").exists()
    run.check_owner()
    RunFolder(run.root, _changed("trainer", "max_steps", 9)).check_owner()


def test_second_process_on_a_run_folder_is_refused(tmp_path):
    run = RunFolder(tmp_path / "run", CONFIG)
    with run.lock():
        with pytest.raises(RunFolderError, match="in use by another cuig process"):
            with RunFolder(tmp_path / "run", CONFIG).lock():
                pass
    with run.lock():  # released
        pass


@pytest.mark.parametrize("files", [None, {}, {"other.json": "00"}])
def test_manifest_must_list_the_delta(tmp_path, files):
    save_tensors({"w": torch.ones(2)}, tmp_path / DELTA)
    manifest = write_manifest(tmp_path, [DELTA], index=1)
    read_manifest(tmp_path, required=(DELTA,))
    if files is None:
        del manifest["files"]
    else:
        manifest["files"] = files
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="vouches for nothing|does not cover"):
        read_manifest(tmp_path, required=(DELTA,))


def test_class_checks_before_instantiation(tmp_path):
    check_classes([{"class_path": "callbacks.NormRegularizer", "init_args": {"weight": 1.0}}], Callback, "cb")
    check_classes([NormRegularizer()], Callback, "cb")
    with pytest.raises(ConfigError, match=r"unknown argument 'wieght'; accepted: p, weight"):
        check_classes([{"class_path": "callbacks.NormRegularizer", "init_args": {"wieght": 1.0}}], Callback, "cb")
    with pytest.raises(ConfigError, match="is not a .*Callback subclass"):
        check_classes([{"class_path": "os.system", "init_args": {"command": "true"}}], Callback, "cb")
    with pytest.raises(ConfigError, match="is not a .*Callback subclass"):
        check_classes("builtins.print", Callback, "cb")
    with pytest.raises(ConfigError, match="cannot import"):
        check_classes([{"class_path": "callbacks.Nope"}], Callback, "cb")


def test_one_line_keeps_the_reason():
    err = ValueError('Parser key "model.method":\n\n  - Expected a path but Foo\n  - Expected a dot import path')
    assert one_line(err) == 'Parser key "model.method": Expected a path but Foo; Expected a dot import path'
    assert "\n" not in one_line(OSError(28, "No space left on device", "/x/y"))
    assert "/x/y" in one_line(OSError(28, "No space left on device", "/x/y"))


def test_empty_evaluation_seeds_is_an_error():
    with pytest.raises(ValueError, match="seeds is empty"):
        Evaluation(seeds=[])
    assert Evaluation().guidance == 1.5  # the configs' value: a run fitted without evaluation scores the same way


def test_run_dir_replaces_the_config(tmp_path):
    RunFolder(tmp_path / "run", CONFIG).claim()
    args = from_run_folder(["evaluate", "--run_dir", str(tmp_path / "run"), "--request", "1"], str(tmp_path))
    assert args[:2] == ["evaluate", "--config"] and args[3:] == ["--trainer.run_dir", str(tmp_path / "run"),
                                                               "--request", "1"]
    assert "max_steps: 4" in open(args[2]).read()
    assert from_run_folder(["fit", "--config", "x"], str(tmp_path)) == ["fit", "--config", "x"]
    with pytest.raises(RunFolderError, match="not a cuig run folder"):
        from_run_folder(["export", "--run_dir=" + str(tmp_path / "none")], str(tmp_path))


def test_pictures_are_labelled(tmp_path, monkeypatch):
    import matplotlib.axes

    from cuig_lightning.evaluation.protocol import save_image_grid
    from cuig_lightning.evaluation.report import plot_metrics

    seen = {}
    original = matplotlib.axes.Axes.set_yticks

    def spy(self, ticks, labels=None, **kw):
        seen["rows"] = list(labels or [])
        return original(self, ticks, labels, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_yticks", spy)
    save_image_grid(torch.rand(6, 3, 8, 8), ["Monet", "Picasso"], ["Circle", "Square", "Star"], tmp_path / "g.png",
                    erased=["Monet"])
    assert seen["rows"] == ["Monet (erased)", "Picasso"] and (tmp_path / "g.png").stat().st_size > 1000
    monkeypatch.undo()
    rows = [{"request": i, "UA": 50.0, "RA_I": 90.0, "RA_C": 80.0, "drift_rel": 0.01 * i} for i in (1, 2, 3)]
    plot_metrics(rows, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 1000


def test_model_fingerprint_follows_weight_contents(tmp_path):
    """Caches are keyed by the model: a retrained model of the same architecture (same file sizes) is another model."""
    from cuig_lightning.models.diffusion import fingerprint

    for name, byte in (("a", 1), ("b", 2)):
        (tmp_path / name / "unet").mkdir(parents=True)
        (tmp_path / name / "unet" / "config.json").write_text("{}")
        (tmp_path / name / "unet" / "weights.safetensors").write_bytes(bytes([byte]) * 1000)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "unet").symlink_to(tmp_path / "a" / "unet")
    assert fingerprint(tmp_path / "a") != fingerprint(tmp_path / "b")
    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "c")  # links are followed: same contents


def test_the_check_interval_counts_only_with_the_stop_rule():
    with_rule = _changed("trainer", "until_ua", 95.0)
    assert identity_hash(with_rule) != identity_hash(dict(with_rule, trainer={**with_rule["trainer"], "until_ua_every": 40}))
    assert identity_hash(_changed("trainer", "until_ua_every", 40)) == identity_hash(CONFIG)


def test_a_full_disk_while_saving_tensors_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from cuig_lightning import checkpoints

    def full_disk(tensors, filename, *args, **kwargs):
        open(filename, "wb").write(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    save_tensors({"w": torch.ones(2)}, tmp_path / DELTA)
    before = (tmp_path / DELTA).read_bytes()
    monkeypatch.setattr(checkpoints, "save_file", full_disk)
    with pytest.raises(OSError, match=rf"cannot write {tmp_path / DELTA}: .*No space left on device"):
        save_tensors({"w": torch.zeros(2)}, tmp_path / DELTA)
    assert sorted(p.name for p in tmp_path.iterdir()) == [DELTA] and (tmp_path / DELTA).read_bytes() == before


def _finished_request(root, config=CONFIG, name="01-A"):
    folder = root / "requests" / name
    save_tensors({"w": torch.ones(2)}, folder / DELTA)
    write_manifest(folder, [DELTA], index=1, config_hash=RunFolder(root, config).hash)
    return folder


def test_a_request_copied_in_from_another_run_is_not_loaded(tmp_path):
    """Issue 37.4: load_request (evaluate / export) checks the manifest's run identity as finished() does."""
    run = RunFolder(tmp_path, CONFIG)
    run.claim()
    folder = _finished_request(tmp_path, _changed("model", "learning_rate", 1.0))  # another run's request

    class Model:
        def load_trainable(self, weights):
            self.loaded = weights

    model = Model()
    with pytest.raises(RunFolderError, match="was written by a different config"):
        run.load_request(model, 1)
    assert not hasattr(model, "loaded")
    write_manifest(folder, [DELTA], index=1, config_hash=run.hash)  # this run's own: loaded
    assert run.load_request(model, 1)["index"] == 1 and torch.equal(model.loaded["w"], torch.ones(2))


def test_tidy_removes_what_a_kill_leaves_in_a_finished_request(tmp_path):
    """Issue 37.6: partial/ (a kill right after the manifest) and *.tmp files (a kill inside an atomic write)."""
    run = RunFolder(tmp_path, CONFIG)
    folder = _finished_request(tmp_path)
    (folder / "partial").mkdir()
    (folder / "partial" / "last.ckpt").write_bytes(b"ckpt")
    (folder / f".{DELTA}.abc123.tmp").write_bytes(b"half")
    (folder / ".manifest.json.x.tmp").write_bytes(b"{")
    manifest = run.finished(folder)
    run.tidy(folder, manifest)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", DELTA]
    assert run.finished(folder) == manifest
