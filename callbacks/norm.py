"""L1 / L2 penalty pulling the trainable weights towards their values at the start of the stage."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from torch import Tensor

from callbacks.base import Regularizer


def norm_penalty(params: Mapping[str, Tensor], reference: Mapping[str, Tensor], p: int, weight: float) -> Tensor:
    """``weight * sum_d |params[d] - reference[d]|^p / N`` over all elements of ``params``.

    Dividing by the element count N keeps the reference weights (L1 50, L2 25000) independent of
    how many tensors are trainable. ``reference`` must hold a tensor of the same shape per key, on
    the same device. Differentiable with respect to ``params``.
    """
    if p not in (1, 2):
        raise ValueError(f"norm penalty p must be 1 or 2, got {p}")
    if not params:
        raise ValueError("norm penalty needs at least one trainable tensor")
    total = sum(t.numel() for t in params.values())
    terms = []
    for name, theta in params.items():
        diff = theta - reference[name]
        terms.append(diff.abs().sum() if p == 1 else diff.pow(2).sum())
    return weight * torch.stack(terms).sum() / total


class NormRegularizer(Regularizer):
    """Adds ``l{p}`` = weight * mean |θ − θ(n-1)*|^p to the loss, so a stage forgets its target with
    the smallest move away from where the previous stage left the model.

    With ``weight == 0`` no term is registered at all, so the run is bitwise the run without it.
    """

    def __init__(self, p: int = 2, weight: float = 25000.0) -> None:
        if p not in (1, 2):
            raise ValueError(f"NormRegularizer p must be 1 or 2, got {p}")
        if weight < 0:
            raise ValueError(f"NormRegularizer weight must be >= 0, got {weight}")
        self.p = p
        self.weight = float(weight)
        self._reference: dict[str, Tensor] | None = None

    @property
    def name(self) -> str:
        return f"l{self.p}"

    def reset(self) -> None:
        self._reference = None  # a new fit is a new stage: θ(n-1)* changes

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.weight > 0:
            pl_module.add_loss_term(self.name, lambda: self._penalty(pl_module))

    def _penalty(self, pl_module: pl.LightningModule) -> Tensor:
        params = pl_module.trainable
        if self._reference is None:  # moved to the parameters' device/dtype once per stage
            self._reference = {
                n: pl_module.start_weights[n].detach().to(device=t.device, dtype=t.dtype) for n, t in params.items()
            }
        return norm_penalty(params, self._reference, self.p, self.weight)
