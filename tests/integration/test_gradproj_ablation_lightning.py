"""The GradProj ablation inside a real ``lightning.Trainer`` (issue 14): stages of the real module on tiny SD with
GradProj and the KeyValueDrift probe, under SGD and AdamW; the probe changes no weight; C from bare names; the
ablation's config cells parse and one runs through ``cuig fit``."""

from __future__ import annotations

import json
import shutil

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from callbacks import GradientProjection, KeyValueDrift
from callbacks.gradient_projection import bare_name_embeddings
from cuig_lightning.benchmark.ablation import CELLS, CONFIG_DIR, gradproj_ablation_dir, write_gradproj_ablation
from cuig_lightning.module import UnlearningModule
from cuig_lightning.requests import Request, Stage
from tests.helpers import CONFIGS, REPO, printed_config, run_cli, tiny_evaluation, write_smoke_overlay

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]

VOCABULARY = {"style": ["Van_Gogh", "Picasso", "Monet"], "object": ["Dogs", "Cats", "Animals"]}
CAPTIONS = ["A Dogs image.", "A picture of a Cats.", "Two Animals shapes.", "A small house.", "A boat at sea.",
            "A plain Dogs image in the middle."]
# tiny SD's ConAbl gradients are ~1e-5: SGD needs a large rate for a visible step; AdamW's step is ~lr per weight
LR = {"sgd": 200.0, "adamw": 1e-3}


class FixedBatches(UnlearningModule):
    """The real module (optimizer option included), fed fixed ConAbl batches."""

    def train_dataloader(self):
        d, g, n = self.diffusion, torch.Generator().manual_seed(0), 2
        cond = d.encode_text(["A Dogs image in Van Gogh style.", "A Dogs image."])
        batches = [{"latents": torch.randn(n, *d.latent_shape, generator=g),
                    "noise": torch.randn(n, *d.latent_shape, generator=g),
                    "timesteps": torch.randint(0, 1000, (n,), generator=g),
                    "cond_target": cond[:1].expand(n, -1, -1), "cond_anchor": cond[1:].expand(n, -1, -1)}
                   for _ in range(4)]
        return DataLoader(batches, batch_size=None)


def stage(tiny_sd, tmp_path, name: str, callbacks: list, optimizer: str = "sgd", steps: int = 3,
          ckpt_path=None) -> FixedBatches:
    """One fitted stage erasing Van_Gogh (weight decay off: only the optimizer's own rescaling is compared)."""
    module = FixedBatches(model_path=str(tiny_sd), optimizer=optimizer, learning_rate=LR[optimizer], scale_lr=False,
                          weight_decay=0.0)
    erase = Stage(0, [Request("Van_Gogh")], [], VOCABULARY, "sequential", tmp_path / name)
    module.begin_stage(erase, module.base_weights)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=callbacks)
    trainer.fit(module, ckpt_path=ckpt_path, weights_only=True)  # as the continual trainer resumes
    module.fitted = trainer
    return module


def record(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / name / "kv_drift.json").read_text())


def test_under_sgd_c_keeps_its_keys_and_values_while_the_target_moves_and_adamw_breaks_it(tiny_sd, tmp_path):
    for optimizer in ("sgd", "adamw"):
        stage(tiny_sd, tmp_path, optimizer, [GradientProjection(source="captions", captions=CAPTIONS), KeyValueDrift()],
              optimizer)
    sgd, adamw = record(tmp_path, "sgd"), record(tmp_path, "adamw")
    assert (sgd["optimizer"], sgd["c_source"], adamw["optimizer"]) == ("SGD", "captions", "AdamW")
    assert sgd["series"]["step"] == [1, 2, 3] and len(sgd["layers"]) == len(sgd["last"]["C"]) > 0
    assert sgd["columns"] == {"C": 6, "retained": 2 * 3 * 77, "target": 3 * 77}  # Picasso, Monet × 3 objects
    assert sgd["prompts"]["target"][0] == "A Dogs image in Van Gogh style."
    assert sgd["final"]["C"] < 1e-4 < sgd["final"]["target"]
    assert sgd["final"]["weights"] > 0
    assert adamw["final"]["C"] > 100 * sgd["final"]["C"]  # though SGD moved the weights more:
    assert sgd["final"]["weights"] > adamw["final"]["weights"]


def test_the_probe_changes_no_weight(tiny_sd, tmp_path):
    runs = [stage(tiny_sd, tmp_path, name, [GradientProjection(source="captions", captions=CAPTIONS), *probe], "adamw")
            for name, probe in (("with", [KeyValueDrift()]), ("without", []))]
    assert all(torch.equal(p, runs[1].trainable[n]) for n, p in runs[0].trainable.items())
    assert any(not torch.equal(p, runs[0].base_weights[n]) for n, p in runs[0].trainable.items())  # it trained


def test_bare_names_protect_the_names_embedded_alone(tiny_sd, tmp_path):
    gp = GradientProjection(source="bare_names", k=2)
    module = stage(tiny_sd, tmp_path, "bare", [gp, KeyValueDrift(every=2)], steps=3)
    assert gp.neighbours and len(gp.neighbours) == 2
    torch.testing.assert_close(gp.C, bare_name_embeddings(module.diffusion, gp.neighbours).double().T)
    probe = record(tmp_path, "bare")
    assert probe["c_source"] == "bare_names" and probe["series"]["step"] == [2, 3]  # every 2, and the last step
    assert probe["final"]["C"] < 1e-4


def test_a_resumed_stage_continues_the_probe_series(tiny_sd, tmp_path):
    first = stage(tiny_sd, tmp_path, "resumed", [KeyValueDrift()], steps=2)
    first.fitted.save_checkpoint(tmp_path / "mid.ckpt")
    stage(tiny_sd, tmp_path, "resumed", [KeyValueDrift()], steps=4, ckpt_path=tmp_path / "mid.ckpt")
    stage(tiny_sd, tmp_path, "whole", [KeyValueDrift()], steps=4)
    resumed, straight = record(tmp_path, "resumed"), record(tmp_path, "whole")
    assert resumed["series"]["step"] == [1, 2, 3, 4] and "C" not in resumed["final"]  # no GradProj: no C
    # the first two rows come from the checkpoint (the fixed batch list restarts on resume, so later ones differ)
    assert all(resumed["series"][g][:2] == straight["series"][g][:2] for g in ("retained", "target", "weights"))


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("cell", CELLS)
def test_ablation_cells_parse(capsys, cell):
    config = printed_config(capsys, CONFIGS / "seq12.yaml", REPO / CONFIG_DIR / f"{cell}.yaml")
    optimizer, source = cell.split("-")
    model, callbacks = config["model"], config["trainer"]["callbacks"]
    assert model["optimizer"] == optimizer and model["learning_rate"] == (0.03 if optimizer == "sgd" else 1e-5)
    assert model["weight_decay"] == (0.0 if optimizer == "sgd" else 0.01)
    sources = [c["init_args"]["source"] for c in callbacks if c["class_path"] == "callbacks.GradientProjection"]
    assert sources == ([] if source == "none" else [source])
    (probe,) = [c["init_args"] for c in callbacks if c["class_path"] == "callbacks.KeyValueDrift"]
    assert probe["retain"] == config["trainer"]["evaluation"]["init_args"]["retain_styles"]
    assert config["trainer"]["run_dir"] == f"runs/gradproj_ablation/{cell}"


def test_an_ablation_cell_runs_through_cuig_fit(tmp_path, tiny_sd, cache_dir):
    smoke = write_smoke_overlay(tmp_path, tiny_sd, cache_dir, max_steps=2)
    evaluated = tmp_path / "evaluated.yaml"  # a tiny evaluation: the report reads the runs' metrics rows
    evaluated.write_text(yaml.safe_dump({"trainer": {"evaluation": tiny_evaluation(2)}}))
    cell = REPO / CONFIG_DIR / "sgd-bare_names.yaml"
    assert run_cli("fit", "--config", str(CONFIGS / "seq12.yaml"), "--config", str(cell), "--config", str(smoke),
                   "--config", str(evaluated)) == 0
    folders = sorted((tmp_path / "run" / "requests").glob("*"))
    assert len(folders) == 2
    for folder in folders:
        probe = json.loads((folder / "kv_drift.json").read_text())
        assert (probe["optimizer"], probe["c_source"], probe["series"]["step"]) == ("SGD", "bare_names", [1, 2])
        assert "kv_drift.json" in json.loads((folder / "manifest.json").read_text())["files"]
    # the benchmark's report reads this real run as its cell (the folder where the benchmark would put it)
    shutil.copytree(tmp_path / "run", gradproj_ablation_dir(tmp_path / "runs", "sgd-bare_names"))
    text = write_gradproj_ablation(tmp_path / "runs", tmp_path / "report").read_text()
    assert "| sgd-bare_names | SGD | bare_names | 1 | 2 |" in text
