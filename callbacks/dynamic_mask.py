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
from callbacks.masking import MASKINGS, GradientMask, Masking
from callbacks.selective_finetuning import topk_mask

DYNAMIC_MASK_JSON = "dynamic_mask.json"
Accumulate = Literal["abs", "signed"]
Warmup = Literal["dense", "frozen"]


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
    """Trains only a ``density`` fraction of every trainable tensor, the fraction renewed during training.

    Defaults are the paper's code (CUIG ``train_sculpmem.py`` + ``src/dynamic_masking.py``); the other values
    are cuig's behaviour before issue 33.

    * Importance per element, accumulated since the last mask change: |Σg| (``accumulate="signed"``, the
      reference) or Σ|g| (``"abs"``). With ``masking="backward"`` g is the raw gradient, read by the gradient
      hook in backward before the mask (and before any projection or clipping; summed over DDP ranks when a
      mask is made); with ``"held"`` it is the gradient as ``on_before_optimizer_step`` sees it, after the
      callbacks listed before this one (e.g. GradProj's projection).
    * Warm-up (``warmup_steps`` optimizer steps): ``"dense"`` (the reference) updates every weight for the
      first ``warmup_steps − 1`` steps; after step ``warmup_steps`` each tensor's active set is its top
      ``round(density · numel)`` entries by importance, and that step's gradient is dropped (the reference
      zeroes it when it makes the mask). ``"frozen"`` updates nothing during the warm-up (no weight, no
      optimizer state).
    * Swaps: after step s (s counted from 1, warm-up included) with s % swap_every == 0,
      warmup_steps < s < stop_fraction · max_steps, each tensor swaps its round(turnover_s · |active|)
      weakest active entries for its strongest inactive ones, turnover_s = turnover · ½(1 + cos(π s / max_steps)).
    * Inactive entries (:mod:`callbacks.masking`): ``masking="backward"`` zeroes their gradient in backward, so
      a later projection may re-densify it and AdamW's momentum and weight decay still move them (the
      reference); ``"held"`` zeroes it at the optimizer step and copies them back after it (bitwise unchanged;
      an entry swapped out keeps the value it had then).

    Mask, accumulated importance and swap history are the callback state (resume is bitwise). At the
    end of a stage the swap history is written to ``dynamic_mask.json`` in the request folder.
    """

    def __init__(self, density: float = 0.5, warmup_steps: int = 50, swap_every: int = 100, turnover: float = 0.2,
                 stop_fraction: float = 0.8, accumulate: Accumulate = "signed", masking: Masking = "backward",
                 warmup: Warmup = "dense") -> None:
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
        if masking not in MASKINGS:
            raise ValueError(f"DynamicMask masking must be 'backward' or 'held', got {masking!r}")
        if warmup not in ("dense", "frozen"):
            raise ValueError(f"DynamicMask warmup must be 'dense' or 'frozen', got {warmup!r}")
        self.density, self.warmup_steps, self.swap_every = density, warmup_steps, swap_every
        self.turnover, self.stop_fraction, self.accumulate = turnover, stop_fraction, accumulate
        self.masking, self.warmup = masking, warmup
        self.reset()

    # -- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        self.mask: dict[str, Tensor] | None = None  # bool, True = active (trained)
        self.importance: dict[str, Tensor] | None = None  # float32, accumulated since the last mask change
        self.history: list[dict] = []  # one entry per mask change
        if not hasattr(self, "_gradient_mask"):
            self._gradient_mask = GradientMask(self.masking)
        self._gradient_mask.clear()
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
        self._gradient_mask.attach(params, self._observe if self.masking == "backward" else None)
        if self.mask is not None:
            # Inactive entries equal their held values after every step, so the current weights are the values to hold.
            self.mask = {n: m.to(params[n].device) for n, m in self.mask.items()}
            self._gradient_mask.set(params, self.mask)
        self._last_step = trainer.global_step
        if trainer.max_steps is not None and 0 < trainer.max_steps <= self.warmup_steps:
            rank_zero_warn(f"DynamicMask: warm-up ({self.warmup_steps} steps) covers the whole stage "
                           f"({trainer.max_steps} steps): " + ("nothing will be trained" if self.warmup == "frozen"
                                                              else "every weight is trained, no mask is made"))

    def _observe(self, name: str, grad: Tensor) -> None:
        """Accumulate one gradient into the importance (``held``: at the optimizer step; ``backward``: the raw
        gradient in backward, before the mask)."""
        with torch.no_grad():
            g = grad.float()
            self.importance[name].add_(g.abs() if self.accumulate == "abs" else g)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        params = pl_module.trainable
        if self.masking == "held":
            for n, p in params.items():
                if p.grad is not None:
                    self._observe(n, p.grad)
        if self.mask is None:
            last = trainer.global_step + 1 >= self.warmup_steps
            if self.warmup == "frozen" or last:  # frozen: update nothing, not even the optimizer state
                for p in params.values():
                    p.grad = None
            if last:
                scores = self._scores(trainer)
                self.mask = {n: topk_mask({n: scores[n]}, self.density)[n] for n in params}
                self._gradient_mask.set(params, self.mask)
                self._record(trainer.global_step + 1, "init", 0.0, 0, pl_module)
        else:
            self._gradient_mask.before_step(params)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:  # no optimizer step (gradient accumulation)
            return
        self._last_step = step = trainer.global_step
        if self.mask is None:
            return
        params = pl_module.trainable
        self._gradient_mask.after_step(params)
        if self._swap_due(step, trainer.max_steps):
            turnover = turnover_at(step, trainer.max_steps, self.turnover)
            scores, moved = self._scores(trainer), 0
            for n in params:
                count = round(turnover * int(self.mask[n].sum()))
                new = swap_mask(self.mask[n], scores[n], count)
                moved += int((new & ~self.mask[n]).sum())
                self.mask[n] = new
            self._gradient_mask.set(params, self.mask)
            self._record(step, "swap", turnover, moved, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record(trainer, pl_module, DYNAMIC_MASK_JSON, {
            "density": self.density, "warmup_steps": self.warmup_steps, "swap_every": self.swap_every,
            "turnover": self.turnover, "stop_fraction": self.stop_fraction, "accumulate": self.accumulate,
            "masking": self.masking, "warmup": self.warmup, "history": self.history})

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._gradient_mask.clear()

    # -- helpers -----------------------------------------------------------------------------
    def _scores(self, trainer: pl.Trainer) -> dict[str, Tensor]:
        """|importance| per tensor; ``backward`` read each rank's own gradients, so their sums are added up."""
        scores = {}
        for n, t in self.importance.items():
            if self.masking == "backward" and trainer.world_size > 1:
                t = trainer.strategy.reduce(t.clone(), reduce_op="sum")
            scores[n] = t.abs()
        return scores

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
