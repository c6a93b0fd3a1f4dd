"""SculpMem (ConAbl loss under its dynamic mask) and ESD as base methods in whole jobs, alone and with every
regularizer."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from cuig_lightning.models.diffusion import DiffusionModel, trainable_names
from tests.helpers import CONFIGS, deltas, run_cli, write_smoke_overlay

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*LightningModule.*has parameters that were not"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]


# ------------------------------------------------------------------------------ whole jobs through the CLI
# SculpMem with its mask held (masking held, frozen warm-up) so that the bound below is exact; "sculpmem_paper" is
# the paper's code (the defaults: dense warm-up, masked entries moved by AdamW)
METHODS = {
    "sculpmem": {"class_path": "cuig_lightning.methods.SculpMem",
                 "init_args": {"trainable": "xattn", "density": 0.5, "warmup_steps": 2, "swap_every": 2, "turnover": 0.5,
                               "masking": "held", "warmup": "frozen"}},
    "sculpmem_paper": {"class_path": "cuig_lightning.methods.SculpMem",
                       "init_args": {"trainable": "xattn", "density": 0.5, "warmup_steps": 2, "swap_every": 2,
                                     "turnover": 0.5}},
    "esd": {"class_path": "cuig_lightning.methods.ESD", "init_args": {"trainable": "xattn", "trajectory_steps": 4}},
}
L2 = {"class_path": "callbacks.NormRegularizer", "init_args": {"p": 2, "weight": 10.0}}
SELFT = {"class_path": "callbacks.SelectiveFineTuning", "init_args": {"topk": 0.1, "num_timesteps": 2, "masking": "held"}}
MERGE = {"class_path": "callbacks.ModelMerge", "init_args": {"method": "ties", "density": 0.5, "lam": 1.5}}
GRADPROJ = {"class_path": "callbacks.GradientProjection", "init_args": {"k": 2}}


@pytest.mark.parametrize("method", list(METHODS))
def test_three_sequential_requests(make_config, tmp_path, tiny_sd, method):
    cfg = make_config(model={"method": METHODS[method]}, trainer={"max_steps": 6})
    assert run_cli("fit", "--config", str(cfg)) == 0
    found = deltas(tmp_path / "run")
    assert [p.parent.name for p in found] == ["01-Van_Gogh", "02-Picasso", "03-Dogs"]
    unet = DiffusionModel.from_pretrained(tiny_sd).unet
    keys = trainable_names(unet, "xattn")
    previous = {k: v.detach() for k, v in unet.named_parameters() if k in keys}
    for path in found:
        delta = load_file(path)
        assert sorted(delta) == keys
        changed = sum(int((delta[k] != previous[k]).sum()) for k in keys)
        total = sum(v.numel() for v in delta.values())
        assert changed > 0
        if method == "sculpmem":  # at most the active half plus what the one swap (after step 4 < 0.8 * 6) brought in
            history = json.loads((path.parent / "dynamic_mask.json").read_text())["history"]
            assert [(h["kind"], h["step"]) for h in history] == [("init", 2), ("swap", 4)]
            assert changed <= history[0]["active"] + history[1]["moved"] < total
        if method == "sculpmem_paper":  # the dense warm-up step trains every element; AdamW keeps moving them
            assert changed > 0.9 * total
        previous = delta


@pytest.mark.parametrize("regularizer", ["l2", "selft", "merge", "gradproj"])
@pytest.mark.parametrize("method", ["sculpmem", "esd"])
def test_each_method_with_each_regularizer(make_config, tmp_path, tiny_sd, method, regularizer):
    reg = {"l2": L2, "selft": SELFT, "merge": MERGE, "gradproj": GRADPROJ}[regularizer]
    schedule = "independent" if regularizer == "merge" else "sequential"
    cfg = make_config(requests=[{"target": "Van_Gogh"}, {"target": "Picasso"}], model={"method": METHODS[method]},
                      trainer={"schedule": schedule, "max_steps": 3, "callbacks": [reg]})
    assert run_cli("fit", "--config", str(cfg)) == 0
    found = deltas(tmp_path / "run")
    assert len(found) == 2
    second = tmp_path / "run" / "requests" / "02-Picasso"
    if regularizer == "merge":
        assert (second / "task_vector.safetensors").is_file() and (second / "merge.json").is_file()
    if regularizer == "gradproj":
        assert (second / "gradient_projection.json").is_file()
    if regularizer == "selft":  # SelFT's 10% bound holds inside the base method too
        base = {k: v.detach() for k, v in DiffusionModel.from_pretrained(tiny_sd).unet.named_parameters()}
        first = load_file(found[0])
        changed = sum(int((first[k] != base[k]).sum()) for k in first)
        assert 0 < changed <= round(0.1 * sum(v.numel() for v in first.values()))


def test_a_dynamic_mask_listed_by_an_old_config_is_replaced_by_the_methods(make_config, tmp_path):
    old = {"class_path": "callbacks.DynamicMask", "init_args": {"warmup_steps": 1, "swap_every": 1}}
    cfg = make_config(requests=[{"target": "Van_Gogh"}], model={"method": METHODS["sculpmem"]},
                      trainer={"max_steps": 6, "callbacks": [L2, old]})
    assert run_cli("fit", "--config", str(cfg)) == 0
    history = json.loads((tmp_path / "run" / "requests" / "01-Van_Gogh" / "dynamic_mask.json").read_text())
    assert history["warmup_steps"] == 2  # Lightning lets the module's callback replace the trainer's of its type


@pytest.mark.parametrize("row", ["sequential", "merge_gradproj"])
def test_sculpmem_row_smoke(row, tmp_path, tiny_sd, cache_dir):
    smoke = write_smoke_overlay(tmp_path, tiny_sd, cache_dir, max_steps=8)
    overlay = CONFIGS / "canvas_mini_sculpmem" / f"{row}.yaml"
    args = ("--config", str(CONFIGS / "seq12.yaml"), "--config", str(overlay), "--config", str(smoke))
    assert run_cli("fit", *args) == 0
    assert len(list((tmp_path / "run" / "requests").glob("*/manifest.json"))) == 2
