"""Regularizer callbacks on the real module and continual trainer: DDP, resume, composition."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import cuig_process, deltas, run_cli

GRADPROJ = {"class_path": "callbacks.GradientProjection", "init_args": {"k": 2}}
SELFT = {"class_path": "callbacks.SelectiveFineTuning", "init_args": {"topk": 0.1, "num_timesteps": 3, "masking": "held"}}
MERGE = {"class_path": "callbacks.ModelMerge", "init_args": {"method": "ties", "density": 0.5, "lam": 1.5}}
L2 = {"class_path": "callbacks.NormRegularizer", "init_args": {"p": 2, "weight": 10.0}}


def test_ddp_with_gradproj_and_selft_ranks_bitwise_equal(make_config, tmp_path):
    """The paper's order under DDP: SculpMem's dynamic mask and SelFT's mask in backward (each rank's own gradient),
    GradProj after them; every rank must end with the same weights (SculpMem's importance summed over ranks)."""
    dump = {"class_path": "tests.helpers.DumpRankWeights", "init_args": {"folder": str(tmp_path / "ranks")}}
    selft = {**SELFT, "init_args": {**SELFT["init_args"], "masking": "backward"}}
    sculpmem = {"class_path": "cuig_lightning.methods.SculpMem",
                "init_args": {"density": 0.5, "warmup_steps": 2, "swap_every": 2, "turnover": 0.5}}
    cfg = make_config(requests=[{"target": "Van_Gogh"}, {"target": "Picasso"}], model={"method": sculpmem},
                      trainer={"strategy": "ddp", "devices": 2, "max_steps": 5, "callbacks": [GRADPROJ, selft, dump]})
    proc = cuig_process("fit", "--config", str(cfg))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    for stage in (0, 1):
        r0 = load_file(tmp_path / "ranks" / f"stage{stage}-rank0.safetensors")
        r1 = load_file(tmp_path / "ranks" / f"stage{stage}-rank1.safetensors")
        assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert (tmp_path / "run" / "requests" / "02-Picasso" / "gradient_projection.json").is_file()


def test_selft_keeps_unselected_elements_in_a_real_stage(make_config, tmp_path, tiny_sd):
    from cuig_lightning.models.diffusion import DiffusionModel

    cfg = make_config(requests=[{"target": "Van_Gogh"}], trainer={"callbacks": [SELFT]})
    assert run_cli("fit", "--config", str(cfg)) == 0
    base = dict(DiffusionModel.from_pretrained(tiny_sd).unet.named_parameters())
    delta = load_file(deltas(tmp_path / "run")[0])
    changed = sum(int((delta[k] != base[k].detach()).sum()) for k in delta)
    total = sum(v.numel() for v in delta.values())
    assert 0 < changed <= round(0.1 * total)


def test_kill_and_resume_in_a_merge_run_is_bitwise(make_config, tmp_path):
    import signal
    import time

    steps = {"schedule": "independent", "max_steps": 30, "checkpoint_every": 5, "callbacks": [MERGE]}
    requests = [{"target": "Van_Gogh"}, {"target": "Picasso"}, {"target": "Monet"}]
    ref = make_config("ref.yaml", requests=requests, trainer=steps, run_dir=tmp_path / "ref")
    assert run_cli("fit", "--config", str(ref)) == 0
    cfg = make_config("killed.yaml", requests=requests, trainer=steps, run_dir=tmp_path / "killed")
    proc = cuig_process("fit", "--config", str(cfg))
    partial = tmp_path / "killed" / "requests" / "02-Picasso" / "partial" / "last.ckpt"
    deadline = time.time() + 240
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists() and not (partial.parent.parent / "manifest.json").exists()
    resumed = cuig_process("fit", "--config", str(cfg))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    for a, b in zip(deltas(tmp_path / "ref"), deltas(tmp_path / "killed"), strict=True):
        x, y = load_file(a), load_file(b)
        assert all(torch.equal(x[k], y[k]) for k in x)
    # the request result is the merge, and the independent task vectors are kept beside it
    last = tmp_path / "killed" / "requests" / "03-Monet"
    assert (last / "task_vector.safetensors").is_file() and (last / "merge.json").is_file()
    import json

    assert "task_vector.safetensors" in json.loads((last / "manifest.json").read_text())["files"]


def test_merge_requires_independent_schedule(make_config, capsys):
    cfg = make_config(requests=[{"target": "Van_Gogh"}], trainer={"callbacks": [MERGE]})
    assert run_cli("fit", "--config", str(cfg)) != 0


@pytest.mark.parametrize("combo", [[MERGE, GRADPROJ], [GRADPROJ, SELFT], [L2, SELFT]])
def test_combinations_run(make_config, tmp_path, combo):
    schedule = "independent" if MERGE in combo else "sequential"
    cfg = make_config(requests=[{"target": "Van_Gogh"}, {"target": "Picasso"}],
                      trainer={"schedule": schedule, "callbacks": combo, "max_steps": 2})
    assert run_cli("fit", "--config", str(cfg)) == 0
    assert len(deltas(tmp_path / "run")) == 2
