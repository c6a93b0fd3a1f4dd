"""The base class every regularizer shares: per-stage state, checkpointing, rank-0 broadcast, recorded files.

A continual job fits one stage per request with a fresh ``Trainer``; a regularizer's state belongs to one
stage. The base class

* resets it in ``setup`` (a new fit is a new stage; a checkpoint restore comes after),
* checkpoints it with the stage's index (:meth:`stage_state` / :meth:`load_stage_state`) and refuses a
  state saved for another stage (:meth:`check_stage`),
* broadcasts a value computed on rank 0 (:meth:`from_rank_zero`), so every DDP rank uses the same one,
* records a file into the request folder on rank 0 (:meth:`record`); the run folder lists it in the
  request's manifest,
* checks the module contract (:class:`callbacks.contract.RegularizedModule`) once, in ``on_fit_start``
  (as Lightning's ``BaseFinetuning`` checks its module), plus the subclass's own :meth:`check`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import lightning.pytorch as pl

from callbacks.contract import check_contract
from cuig_lightning.run_folder import record_file

T = TypeVar("T")


class Regularizer(pl.Callback):
    """Base of the regularizer callbacks (see the module docstring)."""

    _stage_index: int | None = None

    # -- per-stage state (override) ----------------------------------------------------------
    def reset(self) -> None:
        """Forget the previous stage's state."""

    def stage_state(self) -> dict[str, Any] | None:
        """This stage's checkpointed state (None: nothing yet)."""
        return None

    def load_stage_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`stage_state` returned."""

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Extra checks at the start of a fit (e.g. the schedule a regularizer needs)."""

    # -- Lightning ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = self.stage_state()
        return {} if state is None else {**state, "stage_index": self._stage_index}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.load_stage_state(state_dict)
            self._stage_index = state_dict.get("stage_index")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage_index = None
        self.reset()  # a new fit is a new stage; a checkpoint restore comes after

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_contract(pl_module, type(self).__name__)
        self.check(trainer, pl_module)

    # -- helpers -----------------------------------------------------------------------------
    def check_stage(self, pl_module: pl.LightningModule, what: str) -> bool:
        """True if a restored state exists (for this stage); raises if it was saved for another stage.
        Without a restored state, marks the state about to be made as this stage's."""
        index = getattr(getattr(pl_module, "stage", None), "index", None)
        if self.stage_state() is not None:
            if self._stage_index != index:
                raise ValueError(f"{type(self).__name__} {what} saved for stage {self._stage_index}, "
                                 f"but this is stage {index}")
            return True
        self._stage_index = index
        return False

    @staticmethod
    def from_rank_zero(trainer: pl.Trainer, make: Callable[[], T]) -> T:
        """``make()`` on rank 0, the same value on every rank."""
        value = make() if trainer.is_global_zero else None
        return trainer.strategy.broadcast(value, src=0)

    @staticmethod
    def record(trainer: pl.Trainer, pl_module: pl.LightningModule, name: str, data: Any) -> None:
        """Write ``data`` (a JSON-able object, or a dict of tensors for ``*.safetensors``) as ``name`` into
        the stage's request folder, on rank 0; the request's manifest lists it."""
        if trainer.is_global_zero:
            record_file(pl_module.stage, name, data)
