"""End-to-end continual jobs on a tiny random-init SD-shaped model."""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from cuig_lightning.checkpoints import sha256_file
from cuig_lightning.models.diffusion import DiffusionModel, trainable_names
from tests.helpers import cuig_process, deltas, run_cli



def test_three_sequential_requests_write_verified_deltas(make_config, tiny_sd, tmp_path):
    cfg = make_config()
    assert run_cli("fit", "--config", str(cfg)) == 0
    run_dir = tmp_path / "run"
    folders = sorted((run_dir / "requests").iterdir())
    assert [f.name for f in folders] == ["01-Van_Gogh", "02-Picasso", "03-Dogs"]

    base = DiffusionModel.from_pretrained(tiny_sd).unet
    expected_keys = set(trainable_names(base, "xattn_kv"))
    assert expected_keys and all(("attn2.to_k" in k or "attn2.to_v" in k) and k.endswith("weight") for k in expected_keys)
    base_params = dict(base.named_parameters())
    previous = {k: base_params[k].detach() for k in expected_keys}
    for folder in folders:
        manifest = json.loads((folder / "manifest.json").read_text())
        delta = load_file(folder / "unet_delta.safetensors")
        assert set(delta) == expected_keys
        assert manifest["trainable_keys"] == sorted(expected_keys)
        for name, digest in manifest["files"].items():
            assert sha256_file(folder / name) == digest
        assert not (folder / "partial").exists()
        # every request really moved the weights it trains
        assert any(not torch.equal(delta[k], previous[k]) for k in expected_keys)
        previous = delta


@pytest.mark.parametrize("schedule", ["independent", "simultaneous"])
def test_other_schedules(make_config, tiny_sd, tmp_path, schedule):
    requests = [{"target": "Van_Gogh"}, {"target": "Picasso"}]
    cfg = make_config(requests=requests, trainer={"schedule": schedule})
    assert run_cli("fit", "--config", str(cfg)) == 0
    names = [p.parent.name for p in deltas(tmp_path / "run")]
    assert names == (["01-all-2"] if schedule == "simultaneous" else ["01-Van_Gogh", "02-Picasso"])
    if schedule == "independent":  # both start from θ0, so request 2's result does not contain request 1's
        a, b = (load_file(p) for p in deltas(tmp_path / "run"))
        assert any(not torch.equal(a[k], b[k]) for k in a)


def test_sigkill_during_request_two_resumes_bitwise(make_config, tmp_path):
    steps = {"max_steps": 40, "checkpoint_every": 5}
    reference = make_config("ref.yaml", trainer=steps, run_dir=tmp_path / "ref")
    assert run_cli("fit", "--config", str(reference)) == 0

    cfg = make_config("killed.yaml", trainer=steps, run_dir=tmp_path / "killed")
    run_dir = tmp_path / "killed"
    proc = cuig_process("fit", "--config", str(cfg))
    partial = run_dir / "requests" / "02-Picasso" / "partial" / "last.ckpt"
    deadline = time.time() + 240
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run_dir / "requests" / "01-Van_Gogh" / "manifest.json").exists()
    assert not (run_dir / "requests" / "02-Picasso" / "manifest.json").exists(), "killed too late"
    assert partial.exists()

    resumed = cuig_process("fit", "--config", str(cfg))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resuming from" in out
    for ref, got in zip(deltas(tmp_path / "ref"), deltas(run_dir), strict=True):
        a, b = load_file(ref), load_file(got)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{got} differs from the uninterrupted run"


def test_fit_on_saved_pipeline_and_export(make_config, tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = make_config(requests=[{"target": "Van_Gogh"}])
    assert run_cli("fit", "--config", str(cfg)) == 0
    out = tmp_path / "exported"
    assert run_cli("export", "--config", str(cfg), "--output", str(out)) == 0
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    delta = load_file(deltas(tmp_path / "run")[0])
    params = dict(pipe.unet.named_parameters())
    assert all(torch.equal(params[k].detach(), v) for k, v in delta.items())
    image = pipe("A dog image in Van Gogh style.", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape[0] == 1
    # exporting again into the same folder is refused, the export stays intact
    assert run_cli("export", "--config", str(cfg), "--output", str(out)) == 2


def test_ddp_two_cpu_processes_end_identical(make_config, tmp_path):
    dump = tmp_path / "ranks"
    callbacks = [{"class_path": "tests.helpers.DumpRankWeights", "init_args": {"folder": str(dump)}}]
    cfg = make_config(requests=[{"target": "Van_Gogh"}],
                      trainer={"strategy": "ddp", "devices": 2, "max_steps": 3, "callbacks": callbacks})
    proc = cuig_process("fit", "--config", str(cfg))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    r0, r1 = load_file(dump / "stage0-rank0.safetensors"), load_file(dump / "stage0-rank1.safetensors")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    saved = load_file(deltas(tmp_path / "run")[0])
    assert all(torch.equal(r0[k], saved[k]) for k in r0)


def test_bf16_mixed_precision_on_cpu(make_config, tmp_path, tiny_sd):
    cfg = make_config(requests=[{"target": "Van_Gogh"}], trainer={"precision": "bf16-mixed"},
                      model={"frozen_dtype": "bfloat16"})
    assert run_cli("fit", "--config", str(cfg)) == 0
    delta = load_file(deltas(tmp_path / "run")[0])
    base = dict(DiffusionModel.from_pretrained(tiny_sd).unet.named_parameters())
    assert all(torch.isfinite(v).all() for v in delta.values())
    assert any(not torch.equal(v, base[k].detach()) for k, v in delta.items())
