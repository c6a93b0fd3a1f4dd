"""Exports load with one documented call and generate what the model generates, with the folder's own
scheduler class and no local paths."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch

from cuig_lightning.export import CanvasMiniPipeline, save_pipeline
from cuig_lightning.models.diffusion import DiffusionModel


def _pixel_space(tiny_sd, folder, scheduler_class=None):
    folder = shutil.copytree(tiny_sd, folder)
    shutil.rmtree(folder / "vae")  # pixel space, like Canvas-mini
    if scheduler_class:
        path = folder / "scheduler" / "scheduler_config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps(dict(config, _class_name=scheduler_class, skip_prk_steps=True)))
    return DiffusionModel.from_pretrained(folder)


def test_export_keeps_the_scheduler_class_and_config(tiny_sd, tmp_path):
    out = tmp_path / "export"
    save_pipeline(_pixel_space(tiny_sd, tmp_path / "model", "PNDMScheduler"), out)  # SD-1.5 ships PNDM
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "CanvasMiniPipeline" and index["scheduler"][1] == "PNDMScheduler"
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "PNDMScheduler" and saved["skip_prk_steps"] is True
    assert saved["clip_sample"] is False  # a key PNDM does not know, kept as the folder had it
    assert str(tmp_path) not in "".join(p.read_text() for p in out.rglob("*.json"))


def test_pixel_space_export_is_a_canvas_mini_pipeline(tiny_sd, tmp_path):
    model = _pixel_space(tiny_sd, tmp_path / "model")
    out = tmp_path / "export"
    save_pipeline(model, out)

    pipe = CanvasMiniPipeline.from_pretrained(out)
    got = pipe("A Circle image in Monet style.", num_inference_steps=3, guidance_scale=1.5, output_type="np",
               generator=torch.Generator().manual_seed(3)).images
    # the same as the model's own sampler and text encoding (DiffusionModel.encode_text / sample_cfg)
    cond, uncond = model.encode_text(["A Circle image in Monet style."]), model.encode_text([""])
    expected = model.decode(model.sample(cond, uncond, torch.Generator().manual_seed(3), steps=3, guidance=1.5))
    np.testing.assert_allclose(got, expected.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    assert len(pipe(["a", "b"], num_inference_steps=2).images) == 2
