"""SelFT: unfreeze only the trainable elements that matter most for the target, freeze the rest bitwise."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from callbacks.base import Regularizer
from callbacks.masking import MASKINGS, GradientMask, Masking


def topk_mask(importance: Mapping[str, Tensor], fraction: float) -> dict[str, Tensor]:
    """One global top-k over every element of every tensor: k = round(fraction * N) ``True`` entries.

    Ties are broken deterministically in favour of the earlier element, walking the tensors in
    sorted-name order and each tensor in flat (row-major) order.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"top-k fraction must be in [0, 1], got {fraction}")
    names = sorted(importance)
    if not names:
        raise ValueError("top-k mask needs at least one tensor")
    flat = torch.cat([importance[n].detach().reshape(-1).float() for n in names])
    k = round(fraction * flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices
    selected = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    selected[order[:k]] = True
    masks, offset = {}, 0
    for n in names:
        size = importance[n].numel()
        masks[n] = selected[offset : offset + size].reshape(importance[n].shape)
        offset += size
    return masks


class SelectiveFineTuning(Regularizer):
    """Trains only the top ``topk`` fraction of trainable elements by importance |g · θ(n-1)*|.

    g is the unlearning-loss gradient summed over ``num_timesteps`` batches walking a DDIM
    trajectory on the target prompts. The mask is computed once per stage on rank 0 and broadcast,
    and it is part of the callback state so a resumed stage reuses it.

    ``masking`` (:mod:`callbacks.masking`): ``backward`` (the paper's code) masks the gradient during backward,
    so with GradProj the projection comes after the mask and may re-densify it (unselected elements then move),
    and AdamW's weight decay still moves unselected elements; ``held`` masks after the callbacks listed before
    it and copies unselected elements back from the stage start after every step (bitwise unchanged).
    """

    def __init__(self, topk: float = 0.05, num_timesteps: int = 50, masking: Masking = "backward") -> None:
        if not 0.0 < topk <= 1.0:
            raise ValueError(f"SelectiveFineTuning topk must be in (0, 1], got {topk}")
        if num_timesteps < 1:
            raise ValueError(f"SelectiveFineTuning num_timesteps must be >= 1, got {num_timesteps}")
        if masking not in MASKINGS:
            raise ValueError(f"unknown SelectiveFineTuning masking {masking!r}; use backward or held")
        self.topk = topk
        self.num_timesteps = num_timesteps
        self.masking = masking
        self.mask: dict[str, Tensor] | None = None  # bool, CPU; the state that is checkpointed
        self._gradient_mask = GradientMask(masking)

    # -- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        self.mask = None
        self._gradient_mask.clear()

    def stage_state(self) -> dict[str, Any] | None:
        return None if self.mask is None else {"mask": {n: m.cpu() for n, m in self.mask.items()}}

    def load_stage_state(self, state: dict[str, Any]) -> None:
        self.mask = {n: m.to(torch.bool) for n, m in state["mask"].items()}

    # -- hooks -------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.check_stage(pl_module, "mask was"):
            self.mask = self.from_rank_zero(trainer, lambda: self._compute_mask(pl_module))
        self._check_mask(pl_module)
        self._gradient_mask.attach(pl_module.trainable)
        self._gradient_mask.set(pl_module.trainable, self.mask, pl_module.start_weights)
        selected = sum(int(m.sum()) for m in self.mask.values())
        total = sum(m.numel() for m in self.mask.values())
        pl_module.print(f"SelFT: training {selected} of {total} trainable elements ({self.topk:.2%})")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self._gradient_mask.before_step(pl_module.trainable)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self._gradient_mask.after_step(pl_module.trainable)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._gradient_mask.clear()

    # -- helpers -----------------------------------------------------------------------------
    def _compute_mask(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        params = pl_module.trainable
        for p in params.values():
            p.grad = None
        with torch.enable_grad():
            for batch in pl_module.trajectory_batches(self.num_timesteps):
                pl_module.unlearning_loss(batch).backward()
        importance = {}
        for n, p in params.items():
            start = pl_module.start_weights[n].detach().to(device=p.device, dtype=torch.float32)
            grad = p.grad.float() if p.grad is not None else torch.zeros_like(start)
            importance[n] = (grad * start).abs()
        for p in params.values():
            p.grad = None
        return {n: m.cpu() for n, m in topk_mask(importance, self.topk).items()}

    def _check_mask(self, pl_module: pl.LightningModule) -> None:
        params = pl_module.trainable
        if set(self.mask) != set(params) or any(self.mask[n].shape != p.shape for n, p in params.items()):
            raise ValueError("SelectiveFineTuning mask does not match the trainable tensors of this module")
