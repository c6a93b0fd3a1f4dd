"""The module's side of the regularizer contract, written down once.

Every regularizer (and base-method callback) talks to the LightningModule only through these members;
:class:`cuig_lightning.module.UnlearningModule` and the tests' ``FakeUnlearning`` both satisfy it, and
:class:`callbacks.base.Regularizer` checks it once, in ``on_fit_start``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class RegularizedModule(Protocol):
    """What a regularizer may read and call on the module.

    Attributes:
        trainable: name -> parameter of the trained group (the only tensors a regularizer touches).
        start_weights: CPU copy of the trainable tensors at the start of this stage (θ(n-1)*).
        base_weights: CPU copy of the pretrained trainable tensors (θ0).
        stage: the :class:`cuig_lightning.requests.Stage` being fitted (targets, schedule, request folder).
    """

    trainable: dict[str, Tensor]
    start_weights: dict[str, Tensor]
    base_weights: dict[str, Tensor]
    stage: Any

    def add_loss_term(self, name: str, fn: Callable[[], Tensor]) -> None:
        """Add ``fn()`` to every training step's loss."""

    def unlearning_loss(self, batch: Any) -> Tensor:
        """The base method's loss of one batch."""

    def trajectory_batches(self, num_timesteps: int) -> Iterator[Any]:
        """Batches walking a DDIM trajectory on the stage's target prompts (SelFT's importance)."""

    def concept_embeddings(self, names: list[str]) -> Tensor:
        """One text-embedding vector per concept name, shape (len(names), d) (GradProj)."""

    def snapshot(self) -> dict[str, Tensor]:
        """A CPU copy of the trainable tensors."""


def check_contract(module: Any, who: str) -> None:
    """Raise a ``TypeError`` naming the missing members if ``module`` does not satisfy :class:`RegularizedModule`."""
    if isinstance(module, RegularizedModule):
        return
    members = [m for m in ("trainable", "start_weights", "base_weights", "stage", "add_loss_term", "unlearning_loss",
                           "trajectory_batches", "concept_embeddings", "snapshot") if not hasattr(module, m)]
    raise TypeError(f"{who} needs a module with the regularizer contract (callbacks.contract.RegularizedModule); "
                    f"{type(module).__name__} lacks {', '.join(sorted(members)) or 'some of its members'}")
