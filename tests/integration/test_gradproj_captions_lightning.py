"""GradProj with ``source: captions`` inside a real ``lightning.Trainer``: a stage of the real module on tiny SD
(caption states from its text encoder, SGD), the rank guard, and resuming from a checkpoint."""

from __future__ import annotations

import json
import zlib

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks import GradientProjection
from callbacks.gradient_projection import dedup_indices, is_projected
from cuig_lightning.module import UnlearningModule
from cuig_lightning.requests import Request, Stage
from tests.helpers import D, FakeUnlearning, fit, make_stage

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*LightningModule.*has parameters that were not"),
    pytest.mark.filterwarnings("ignore:You.re resuming from a checkpoint that ended before the epoch ended"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]

VOCABULARY = {"style": ["Van_Gogh", "Picasso", "Monet"], "object": ["Dogs", "Cats", "Animals"]}
CAPTIONS = ["A Dogs image.", "A picture of a Cats.", "Two Animals shapes.", "A small house.", "A boat at sea.",
            "A plain Dogs image in the middle."]
LR = 200.0  # tiny SD's ConAbl gradients are ~1e-5: a visible step, far above float32's rounding of the weights


class SGDModule(UnlearningModule):
    """The real module on plain SGD (GradProj is exact only there), fed fixed ConAbl batches."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.trainable.values(), lr=LR)

    def train_dataloader(self):
        d, g, n = self.diffusion, torch.Generator().manual_seed(0), 2
        cond = d.encode_text(["A Dogs image in Van Gogh style.", "A Dogs image."])
        batches = []
        for _ in range(4):
            batches.append({"latents": torch.randn(n, *d.latent_shape, generator=g),
                            "noise": torch.randn(n, *d.latent_shape, generator=g),
                            "timesteps": torch.randint(0, 1000, (n,), generator=g),
                            "cond_target": cond[:1].expand(n, -1, -1), "cond_anchor": cond[1:].expand(n, -1, -1)})
        return DataLoader(batches, batch_size=None)  # a plain list would read as a list of loaders


def _run(tiny_sd, tmp_path, callbacks, name: str, steps: int = 3) -> SGDModule:
    module = SGDModule(model_path=str(tiny_sd))
    stage = Stage(0, [Request("Van_Gogh")], [], VOCABULARY, "sequential", tmp_path / name)
    module.begin_stage(stage, module.base_weights)
    pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
               callbacks=callbacks).fit(module)
    return module


def test_a_captions_stage_moves_to_k_to_v_orthogonally_to_the_caption_states(tiny_sd, tmp_path, capsys):
    free = _run(tiny_sd, tmp_path, [], "free")
    proj = _run(tiny_sd, tmp_path, [GradientProjection(source="captions", captions=CAPTIONS)], "proj")

    record = json.loads((tmp_path / "proj" / "gradient_projection.json").read_text())
    assert (record["source"], record["captions"], record["columns"], record["rank"], record["width"]) == (
        "captions", 6, 6, 6, 32)
    assert record["kept"] == CAPTIONS
    assert "C has 6 columns, rank 6 of width 32" in capsys.readouterr().out

    vectors = proj.caption_embeddings(CAPTIONS).double()
    C = vectors[dedup_indices(vectors)].T  # (32, 6): the text states the projection protects
    for n, p in proj.trainable.items():
        if not is_projected(n):
            continue
        delta, free_delta = (p - proj.base_weights[n]).double(), (free.trainable[n] - free.base_weights[n]).double()
        along = lambda update: ((update @ C).norm() / (update.norm() * C.norm())).item()  # noqa: E731
        assert delta.norm() > 0.1 * free_delta.norm() > 0  # to_k / to_v still train
        assert along(delta) < 1e-4 and along(free_delta) > 0.1  # but not along the caption states (~2e-6 here)


def test_the_rank_guard_stops_a_stage_whose_captions_span_the_text_width(tiny_sd, tmp_path):
    """The default captions (51 over 3 objects) and a text encoder whose final LayerNorm has a bias off the
    hyperplane its normalised states lie in, as a trained one has (random-init tiny CLIP has a zero bias, and its
    states span only 31 of the 32 dimensions): C reaches rank 32, the width."""
    module = SGDModule(model_path=str(tiny_sd))
    bias = next(p for n, p in module.diffusion.text_encoder.named_parameters() if n.endswith("final_layer_norm.bias"))
    with torch.no_grad():
        bias.normal_(mean=0.5, std=0.5, generator=torch.Generator().manual_seed(0))
    stage = Stage(0, [Request("Van_Gogh")], [], VOCABULARY, "sequential", tmp_path / "r")
    module.begin_stage(stage, module.base_weights)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[GradientProjection(source="captions", caption_set="generic")])
    with pytest.raises(ValueError, match="rank 32, the whole text width 32"):
        trainer.fit(module)
    assert all(torch.equal(p, module.base_weights[n]) for n, p in module.trainable.items())  # no step taken


# ------------------------------------------------------------------------------------------ resume


class CaptionFake(FakeUnlearning):
    """The fake module plus per-caption vectors (a fixed pseudo-random vector per caption text)."""

    def caption_embeddings(self, captions: list[str], token: str = "content") -> torch.Tensor:
        return torch.stack([torch.randn(D, generator=torch.Generator().manual_seed(zlib.crc32(c.encode())))
                            for c in captions])


def test_a_resume_must_see_the_same_caption_set(tmp_path):
    stage = make_stage(tmp_path, 1, erased=["Erased"])
    gp = GradientProjection(source="captions", captions=["A dog.", "A cat.", "A house."])
    trainer = fit(CaptionFake(stage, lr=0.01), [gp], max_steps=2)
    state = gp.state_dict()
    assert set(state) == {"captions_sha256", "stage_index"} and state["stage_index"] == 1
    trainer.save_checkpoint(tmp_path / "mid.ckpt")

    same = GradientProjection(source="captions", captions=["A dog.", "A cat.", "A house."])
    fit(CaptionFake(stage, lr=0.01), [same], max_steps=4, ckpt_path=tmp_path / "mid.ckpt")
    assert same.captions_sha256 == state["captions_sha256"]
    other = GradientProjection(source="captions", captions=["A dog.", "A cat.", "A boat."])
    with pytest.raises(ValueError, match="another caption set"):
        fit(CaptionFake(stage, lr=0.01), [other], max_steps=4, ckpt_path=tmp_path / "mid.ckpt")
    with pytest.raises(ValueError, match="another source"):
        fit(CaptionFake(stage, lr=0.01), [GradientProjection(k=2)], max_steps=4, ckpt_path=tmp_path / "mid.ckpt")


def test_captions_need_the_module_hook(tmp_path):
    with pytest.raises(TypeError, match="caption_embeddings"):
        fit(FakeUnlearning(make_stage(tmp_path)), [GradientProjection(source="captions", captions=["A dog."])], 1)
