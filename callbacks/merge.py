"""Model merging for the ``independent`` schedule: every request is unlearned from θ0 on its own and
the task vectors τ_i = θ_i − θ0 of all requests so far are merged into one model θ0 + merged(τ)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from peft.utils.merge_utils import ties

from callbacks.base import Regularizer
from cuig_lightning.checkpoints import load_tensors

TASK_VECTOR = "task_vector.safetensors"
MERGE_JSON = "merge.json"
Method = Literal["ties", "task_arithmetic", "uniform"]


def _stack(task_vectors: Sequence[dict[str, Tensor]], name: str) -> Tensor:
    tensors = [tv[name] for tv in task_vectors]
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)  # merge at least in float32
    return torch.stack([t.to(dtype) for t in tensors])


def _per_tensor(task_vectors: Sequence[dict[str, Tensor]], merge: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    if not task_vectors:
        raise ValueError("nothing to merge: no task vectors given")
    names = set(task_vectors[0])
    for i, tv in enumerate(task_vectors[1:], start=2):
        if set(tv) != names:
            raise ValueError(f"task vector {i} has different tensors than task vector 1")
    return {n: merge(_stack(task_vectors, n)).to(task_vectors[0][n].dtype) for n in sorted(names)}


def ties_merge(task_vectors: Sequence[dict[str, Tensor]], density: float, lam: float) -> dict[str, Tensor]:
    """TIES per tensor (``peft.utils.merge_utils.ties``, majority sign by total): trim each τ_i to its
    top-``density`` magnitudes, elect the sign of the summed trimmed τ (a zero sum elects +), average the
    nonzero entries agreeing with it; then scale by ``lam`` (exactly peft's weights = [lam] * n when lam is
    a power of two)."""
    if density < 0:
        raise ValueError(f"TIES density must be >= 0, got {density}")

    def merge(stacked: Tensor) -> Tensor:
        ones = torch.ones(len(stacked), dtype=stacked.dtype, device=stacked.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns that density >= 1 prunes nothing
            return lam * ties(list(stacked), ones, density, majority_sign_method="total")

    return _per_tensor(task_vectors, merge)


def task_arithmetic(task_vectors: Sequence[dict[str, Tensor]], lam: float) -> dict[str, Tensor]:
    """``lam * Σ_i τ_i`` per tensor."""
    return _per_tensor(task_vectors, lambda stacked: lam * stacked.sum(dim=0))


def uniform(task_vectors: Sequence[dict[str, Tensor]], lam: float) -> dict[str, Tensor]:
    """``lam * (1/n) Σ_i τ_i`` per tensor (the plain average of the n task vectors, scaled)."""
    return _per_tensor(task_vectors, lambda stacked: lam * stacked.mean(dim=0))


def merge_task_vectors(
    task_vectors: Sequence[dict[str, Tensor]], method: Method, density: float, lam: float
) -> dict[str, Tensor]:
    if method == "ties":
        return ties_merge(task_vectors, density, lam)
    if method == "task_arithmetic":
        return task_arithmetic(task_vectors, lam)
    if method == "uniform":
        return uniform(task_vectors, lam)
    raise ValueError(f"unknown merge method {method!r}; use ties, task_arithmetic or uniform")


class ModelMerge(Regularizer):
    """At the end of each ``independent`` stage, saves this request's task vector and replaces the
    trainable weights by θ0 + merge(τ_1..τ_n) over all requests so far.

    As the paper's runs: request 1 keeps its single task vector as it is (``merge_single``: merge it
    too), and λ may grow with n (a list: the λ of request n is ``lam[n - 1]``, the last entry repeating).
    Only makes sense when every stage starts from θ0, hence the schedule check. Each rank merges its
    own in-memory τ_n with the earlier τ_i read from the finished request folders, so no rank waits
    for rank 0's write.
    """

    def __init__(self, method: Method = "ties", density: float = 0.5, lam: float | list[float] = 1.0,
                 merge_single: bool = False) -> None:
        if method not in ("ties", "task_arithmetic", "uniform"):
            raise ValueError(f"unknown merge method {method!r}; use ties, task_arithmetic or uniform")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"ModelMerge density must be in (0, 1], got {density}")
        if isinstance(lam, list) and not lam:
            raise ValueError("ModelMerge lam: give a number or a non-empty list (λ of request n = lam[n - 1])")
        self.method = method
        self.density = density
        self.lam = lam
        self.merge_single = merge_single

    def lam_at(self, n: int) -> float:
        """λ of the merge over the first ``n`` requests."""
        return float(self.lam[min(n, len(self.lam)) - 1]) if isinstance(self.lam, list) else float(self.lam)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        schedule = pl_module.stage.schedule
        if schedule != "independent":
            raise ValueError(
                f"ModelMerge needs the 'independent' schedule (each request unlearned from θ0), got {schedule!r}"
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = pl_module.stage
        params = pl_module.trainable
        base = pl_module.base_weights
        tau = {n: p.detach().cpu() - base[n].cpu() for n, p in params.items()}
        self.record(trainer, pl_module, TASK_VECTOR, tau)
        previous = [load_tensors(Path(d) / TASK_VECTOR) for d in stage.previous_dirs]
        n = len(previous) + 1
        dirs = [str(d) for d in stage.previous_dirs] + [str(stage.request_dir)]
        if n == 1 and not self.merge_single:  # the trained model is θ0 + τ_1 already
            self.record(trainer, pl_module, MERGE_JSON, {"method": None, "merged": dirs})
            return
        lam = self.lam_at(n)
        merged = merge_task_vectors([*previous, tau], self.method, self.density, lam)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_((base[name].to(merged[name].dtype) + merged[name]).to(device=p.device, dtype=p.dtype))
        pl_module.print(f"ModelMerge: {self.method} (density {self.density}, λ {lam}) over {n} requests")
        self.record(trainer, pl_module, MERGE_JSON,
                    {"method": self.method, "density": self.density, "lam": lam, "merged": dirs})
