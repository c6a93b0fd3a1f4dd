"""``cuig smoke --size tiny``: the full-size smoke's CPU dry run (every fit row, evaluate, export, a diffusers load and
one image) through the real commands and the shipped UnlearnCanvas configs, and the report it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cuig_lightning.smoke import ROWS, overrides
from tests.helpers import CONFIGS, REPO, run_cli

#: What the smoke may change in a shipped job: paths and sizes (and the device), nothing that is trained differently.
PATHS_AND_SIZES = {
    "trainer": {"run_dir", "requests", "max_steps", "accelerator", "devices", "enable_progress_bar", "evaluation",
                "precision", "callbacks"},
    "model": {"model_path"},
    "data": {"prompts", "images_per_prompt", "batch_size", "sample_steps", "cache_dir"},
}


def test_tiny_smoke_runs_every_command_and_reports_each(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    assert run_cli("smoke", "--size", "tiny", "--output", str(out), "--workdir", str(work)) == 0
    printed = capsys.readouterr().out
    assert (out / "tiny_cpu.md").read_text() == printed
    result = json.loads((out / "tiny_cpu.json").read_text())
    steps = [r["step"] for r in result["commands"]]
    assert steps == ["build", *(f"fit {row}" for row in ROWS), "evaluate", "export", "generate"]
    for r in result["commands"]:
        assert r["ok"] and r["wall_s"] > 0 and r["peak_rss_gib"] > 0 and r["peak_gpu_gib"] is None, r
        assert f"| {r['step']} " in printed
    for row in ROWS:  # two requests trained in each row's run folder
        assert len(sorted((work / "runs" / row / "requests").glob("*/unet_delta.safetensors"))) == 2, row
    assert [m["request"] for m in json.loads((work / "runs" / "sequential" / "metrics.json").read_text())] == [1, 2]
    assert (work / "export" / "model_index.json").is_file() and (out / "tiny_cpu.png").is_file()
    assert "cuig fit --config configs/unlearncanvas/seq12_object.yaml --config configs/canvas_mini/gradproj.yaml" in printed


def test_the_overrides_are_paths_and_sizes_only(tmp_path):
    classifiers = {"style": "s.pth", "object": "o.pth"}
    for row in ROWS:
        config = overrides(row, tmp_path, tmp_path / "model", classifiers, 2, 2, "cpu", None)
        for section, keys in config.items():
            assert set(keys) <= PATHS_AND_SIZES[section], (row, section)
        assert len(config["trainer"]["requests"]) == 2 and config["data"]["batch_size"] == 1
        assert (config["trainer"]["evaluation"] is None) == (row != "sequential")  # only the sequential fit evaluates
    gradproj = overrides("gradproj", tmp_path, tmp_path / "model", classifiers, 2, 2, "cuda", "bf16-mixed")
    assert gradproj["trainer"]["requests"][0]["domain"] == "object"  # C from the object requests' caption set
    assert gradproj["trainer"]["accelerator"] == "gpu" and gradproj["trainer"]["precision"] == "bf16-mixed"
    selft = overrides("selft", tmp_path, tmp_path / "model", classifiers, 2, 2, "cpu", None)["trainer"]["callbacks"]
    assert selft == [{"class_path": "callbacks.SelectiveFineTuning", "init_args": {"topk": 0.2, "num_timesteps": 2}}]


def test_the_gpu_check_script_dry_runs_on_the_cpu(tmp_path):
    """configs/speed/gpu_check.sh tiny: the GPU check's both parts with the test model, as subprocesses."""
    env = dict(os.environ, CUIG=f"{sys.executable} -m cuig_lightning", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(CONFIGS / "speed" / "gpu_check.sh"), "tiny", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    speed = json.loads((out / "speed.json").read_text())
    assert speed["meta"]["settings"]["variants"] == ["fp32", "bf16"] and "partial" not in speed["meta"]
    assert speed["meta"]["settings"]["groups"] == ["xattn_kv", "full"] and speed["peer"] is not None
    smoke = json.loads((out / "tiny_cpu.json").read_text())
    assert smoke["meta"]["precision"] == "bf16-mixed" and all(r["ok"] for r in smoke["commands"])
    assert (out / "speed.md").is_file() and (out / "tiny_cpu.png").is_file()


def test_bad_arguments_are_one_line_before_anything_is_built(tmp_path, capsys):
    (tmp_path / "used" / "runs").mkdir(parents=True)
    for args, needle in ((["--bpe_vocab", str(tmp_path / "nowhere.whl")], "does not exist"),
                         (["--device", "tpu"], "tpu"), (["--steps", "0"], "steps"),
                         (["--workdir", str(tmp_path / "used")], "is not empty")):
        assert run_cli("smoke", "--size", "tiny", "--output", str(tmp_path / "out"), *args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cuig: error:") and needle in err[0], err
    assert not (tmp_path / "out").exists()
