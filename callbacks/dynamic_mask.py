"""SculpMem's dynamic mask: train a per-tensor fraction of the weights, chosen by gradient magnitude and
renewed during training (Sculpting Memory, Li et al., ICCV 2025)."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from callbacks.base import Regularizer
from callbacks.masking import FrozenEntries
from callbacks.selective_finetuning import topk_mask

DYNAMIC_MASK_JSON = "dynamic_mask.json"
Accumulate = Literal["abs", "signed"]


def turnover_at(step: int, max_steps: int, turnover: float) -> float:
    """Cosine decay from ``turnover`` (step 0) to 0 (``max_steps``): turnover · ½(1 + cos(π·step/max_steps))."""
    return turnover * 0.5 * (1.0 + math.cos(math.pi * step / max_steps))


def swap_mask(mask: Tensor, importance: Tensor, count: int) -> Tensor:
    """Deactivate the ``count`` active entries of lowest importance and activate the ``count`` inactive
    entries of highest importance (fewer if fewer are inactive); ties go to the earlier flat index."""
    flat_mask, flat_imp = mask.reshape(-1), importance.reshape(-1).float()
    active = flat_mask.nonzero().squeeze(1)
    inactive = (~flat_mask).nonzero().squeeze(1)
    count = min(count, active.numel(), inactive.numel())
    new = flat_mask.clone()
    if count > 0:
        drop = active[torch.sort(flat_imp[active], stable=True).indices[:count]]
        add = inactive[torch.sort(flat_imp[inactive], descending=True, stable=True).indices[:count]]
        new[drop] = False
        new[add] = True
    return new.reshape(mask.shape)


class DynamicMask(Regularizer):
    """Trains only a ``density`` fraction of every trainable tensor; the rest stays bitwise unchanged.

    * Warm-up: the first ``warmup_steps`` optimizer steps only accumulate gradient magnitudes and update
      nothing (no weight, no optimizer state), as the reference code, which skips ``optimizer.step()``
      during warm-up. After the last warm-up step each tensor's active set is its top
      ``round(density · numel)`` entries by accumulated importance.
    * Importance accumulated per element: Σ|g| over steps (``accumulate="abs"``) or |Σg| (``"signed"``,
      what the reference code does), g the gradient as this callback sees it in
      ``on_before_optimizer_step`` (after DDP averaging, before clipping, after callbacks listed
      before it, e.g. SelFT's zeroing or GradProj's projection; list this callback last). It is reset
      after every mask change.
    * Swaps: after step s (s counted from 1, warm-up included) with s % swap_every == 0,
      warmup_steps < s < stop_fraction · max_steps, each tensor swaps its round(turnover_s · |active|)
      weakest active entries for its strongest inactive ones, turnover_s = turnover · ½(1 + cos(π s / max_steps)).
    * Inactive entries get a zero gradient and are copied back after each optimizer step, so AdamW's
      weight decay and momentum cannot move them; an entry swapped out keeps the value it had then.

    Mask, accumulated importance and swap history are the callback state (resume is bitwise). At the
    end of a stage the swap history is written to ``dynamic_mask.json`` in the request folder.
    """

    def __init__(self, density: float = 0.5, warmup_steps: int = 50, swap_every: int = 100, turnover: float = 0.2,
                 stop_fraction: float = 0.8, accumulate: Accumulate = "abs") -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"DynamicMask density must be in (0, 1], got {density}")
        if warmup_steps < 1:
            raise ValueError(f"DynamicMask warmup_steps must be >= 1 (the mask comes from warm-up gradients), "
                             f"got {warmup_steps}")
        if swap_every < 1:
            raise ValueError(f"DynamicMask swap_every must be >= 1, got {swap_every}")
        if not 0.0 <= turnover <= 1.0:
            raise ValueError(f"DynamicMask turnover must be in [0, 1], got {turnover}")
        if not 0.0 <= stop_fraction <= 1.0:
            raise ValueError(f"DynamicMask stop_fraction must be in [0, 1], got {stop_fraction}")
        if accumulate not in ("abs", "signed"):
            raise ValueError(f"DynamicMask accumulate must be 'abs' or 'signed', got {accumulate!r}")
        self.density, self.warmup_steps, self.swap_every = density, warmup_steps, swap_every
        self.turnover, self.stop_fraction, self.accumulate = turnover, stop_fraction, accumulate
        self.reset()

    # -- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        self.mask: dict[str, Tensor] | None = None  # bool, True = active (trained)
        self.importance: dict[str, Tensor] | None = None  # float32, accumulated since the last mask change
        self.history: list[dict] = []  # one entry per mask change
        self._frozen = FrozenEntries()
        self._last_step = -1

    def stage_state(self) -> dict[str, Any] | None:
        if self.importance is None:
            return None
        state: dict[str, Any] = {
            "importance": {n: t.detach().cpu() for n, t in self.importance.items()},
            "history": [dict(h) for h in self.history],
        }
        if self.mask is not None:
            state["mask"] = {n: m.cpu() for n, m in self.mask.items()}
        return state

    def load_stage_state(self, state: dict[str, Any]) -> None:
        self.importance = {n: t.float() for n, t in state["importance"].items()}
        self.mask = {n: m.to(torch.bool) for n, m in state["mask"].items()} if "mask" in state else None
        self.history = [dict(h) for h in state.get("history", [])]

    # -- hooks -------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = pl_module.trainable
        if not self.check_stage(pl_module, "state was"):
            self.importance = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
        else:
            self.importance = {n: t.to(params[n].device) for n, t in self.importance.items()}
        for state in (self.importance, self.mask) if self.mask is not None else (self.importance,):
            if set(state) != set(params) or any(state[n].shape != params[n].shape for n in state):
                raise ValueError("DynamicMask state does not match the trainable tensors of this module")
        if self.mask is not None:
            # Inactive entries equal their held values after every step, so the current weights are the values to hold.
            self.mask = {n: m.to(params[n].device) for n, m in self.mask.items()}
            self._frozen.hold(params, {n: ~m for n, m in self.mask.items()})
        self._last_step = trainer.global_step
        if trainer.max_steps is not None and 0 < trainer.max_steps <= self.warmup_steps:
            rank_zero_warn(f"DynamicMask: warm-up ({self.warmup_steps} steps) covers the whole stage "
                           f"({trainer.max_steps} steps): nothing will be trained")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        params = pl_module.trainable
        with torch.no_grad():
            for n, p in params.items():
                if p.grad is not None:
                    g = p.grad.float()
                    self.importance[n].add_(g.abs() if self.accumulate == "abs" else g)
        if self.mask is None:  # warm-up: update nothing, not even the optimizer state
            for p in params.values():
                p.grad = None
            if trainer.global_step + 1 >= self.warmup_steps:
                self.mask = {n: topk_mask({n: self._scores(n)}, self.density)[n] for n in params}
                self._frozen.hold(params, {n: ~m for n, m in self.mask.items()})
                self._record(trainer.global_step + 1, "init", 0.0, 0, pl_module)
        else:
            self._frozen.zero_grads(params)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:  # no optimizer step (gradient accumulation)
            return
        self._last_step = step = trainer.global_step
        if self.mask is None:
            return
        params = pl_module.trainable
        self._frozen.restore(params)
        if self._swap_due(step, trainer.max_steps):
            turnover = turnover_at(step, trainer.max_steps, self.turnover)
            moved = 0
            for n in params:
                count = round(turnover * int(self.mask[n].sum()))
                new = swap_mask(self.mask[n], self._scores(n), count)
                moved += int((new & ~self.mask[n]).sum())
                self.mask[n] = new
            self._frozen.hold(params, {n: ~m for n, m in self.mask.items()})
            self._record(step, "swap", turnover, moved, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record(trainer, pl_module, DYNAMIC_MASK_JSON, {
            "density": self.density, "warmup_steps": self.warmup_steps, "swap_every": self.swap_every,
            "turnover": self.turnover, "stop_fraction": self.stop_fraction, "accumulate": self.accumulate,
            "history": self.history})

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._frozen.clear()

    # -- helpers -----------------------------------------------------------------------------
    def _scores(self, name: str) -> Tensor:
        return self.importance[name].abs()

    def _swap_due(self, step: int, max_steps: int) -> bool:
        return (step % self.swap_every == 0 and step > self.warmup_steps
                and max_steps is not None and max_steps > 0 and step < self.stop_fraction * max_steps)

    def _record(self, step: int, kind: str, turnover: float, moved: int, pl_module: pl.LightningModule) -> None:
        for t in self.importance.values():
            t.zero_()
        active = sum(int(m.sum()) for m in self.mask.values())
        total = sum(m.numel() for m in self.mask.values())
        self.history.append({"step": step, "kind": kind, "turnover": turnover, "moved": moved, "active": active})
        pl_module.print(f"DynamicMask: {kind} after step {step}: {active} of {total} active"
                        + (f", {moved} swapped (turnover {turnover:.4f})" if kind == "swap" else ""))
