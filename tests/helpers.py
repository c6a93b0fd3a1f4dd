"""Callbacks used by tests through configs (importable as ``tests.helpers`` in subprocesses)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from cuig_lightning.checkpoints import save_tensors


class DumpRankWeights(L.Callback):
    """Save each rank's trainable weights at the end of every stage (to compare DDP ranks)."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        out = Path(self.folder) / f"stage{pl_module.stage.index}-rank{trainer.global_rank}.safetensors"
        save_tensors(pl_module.snapshot(), out)


class PoisonWeights(L.Callback):
    """Turn one trainable tensor into NaN at a given stage and step, to provoke a non-finite loss."""

    def __init__(self, stage: int = 1, step: int = 1):
        self.stage, self.step = stage, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.stage.index == self.stage and trainer.global_step == self.step:
            with torch.no_grad():
                next(iter(pl_module.trainable.values())).fill_(float("nan"))
