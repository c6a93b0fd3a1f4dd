"""Keep chosen elements of the trainable tensors bitwise unchanged through optimizer steps.

Zeroing their gradients is not enough: AdamW's weight decay and momentum still move them. So their
gradients are zeroed before the step (keeping the optimizer's moments for them clean) and their held
values are copied back after it. Used by SelFT (a fixed mask) and SculpMem's dynamic mask.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


class FrozenEntries:
    """Per trainable tensor: which entries are frozen, and the values they are held at (on the tensor's device)."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[Tensor, Tensor]] = {}

    def hold(self, params: Mapping[str, Tensor], frozen: Mapping[str, Tensor],
             values: Mapping[str, Tensor] | None = None) -> None:
        """Freeze ``frozen[n]`` (bool, same shape) entries of each ``params[n]`` at ``values[n]`` (default:
        their current values)."""
        held = {}
        for n, p in params.items():
            source = p if values is None else values[n]
            held[n] = (frozen[n].to(device=p.device, dtype=torch.bool),
                       source.detach().to(device=p.device, dtype=p.dtype, copy=True))
        self._held = held

    def zero_grads(self, params: Mapping[str, Tensor]) -> None:
        """Before the optimizer step: frozen entries get a zero gradient."""
        for n, p in params.items():
            if p.grad is not None and n in self._held:
                p.grad.masked_fill_(self._held[n][0], 0.0)

    @torch.no_grad()
    def restore(self, params: Mapping[str, Tensor]) -> None:
        """After the optimizer step: copy the held values back into the frozen entries."""
        for n, p in params.items():
            if n in self._held:
                frozen, values = self._held[n]
                p.copy_(torch.where(frozen, values, p))

    def clear(self) -> None:
        self._held = {}
