"""Train only chosen entries of the trainable tensors: the mask shared by SelFT and SculpMem's dynamic mask.

A mask is one boolean tensor per trainable tensor (True: trained). Two ways to apply it (``masking``):

* ``backward`` (the paper's code: ``Regularizers/SelFT/selft.py``, ``SculpMem/src/dynamic_masking.py``): a
  gradient hook multiplies each gradient by the mask while backward runs, so everything after it (DDP
  averaging, GradProj's projection in ``on_before_optimizer_step``, clipping) sees the masked gradient. A
  projection can therefore re-densify it, and AdamW's weight decay and momentum still move masked entries.
* ``held`` (cuig before issue 33): at the optimizer step, after the callbacks listed before this one (list
  GradProj first: it projects, then the mask zeroes), masked gradients are zeroed, and masked entries are
  copied back after the step: bitwise unchanged, whatever the optimizer does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor

Masking = Literal["backward", "held"]
MASKINGS = ("backward", "held")


class GradientMask:
    """Applies a per-tensor mask to the trainable tensors' gradients (see the module docstring).

    Call :meth:`attach` when a stage starts (``backward`` registers the gradient hooks; ``observe(name, grad)``,
    if given, sees each raw gradient before it is masked), :meth:`set` whenever the mask changes,
    :meth:`before_step` in ``on_before_optimizer_step``, :meth:`after_step` after the optimizer step, and
    :meth:`clear` when the stage ends (removes the hooks).
    """

    def __init__(self, masking: Masking = "backward") -> None:
        if masking not in MASKINGS:
            raise ValueError(f"unknown masking {masking!r}; use backward or held")
        self.masking = masking
        self._multipliers: dict[str, Tensor] = {}  # backward: the mask in each gradient's dtype
        self._held: dict[str, tuple[Tensor, Tensor]] = {}  # held: (masked entries, their values)
        self._handles: list = []

    def attach(self, params: Mapping[str, Tensor],
               observe: Callable[[str, Tensor], None] | None = None) -> None:
        """``backward``: hook every tensor's gradient (``observe`` first, then the mask, once :meth:`set`)."""
        self.clear()
        if self.masking != "backward":
            return
        for name, p in params.items():
            self._handles.append(p.register_hook(self._hook(name, observe)))

    def _hook(self, name: str, observe: Callable[[str, Tensor], None] | None):
        def hook(grad: Tensor) -> Tensor:
            if observe is not None:
                observe(name, grad)
            mask = self._multipliers.get(name)
            return grad if mask is None else grad * mask.to(grad.dtype)
        return hook

    def set(self, params: Mapping[str, Tensor], active: Mapping[str, Tensor],
            values: Mapping[str, Tensor] | None = None) -> None:
        """Train only ``active[n]`` (bool, same shape) entries of each ``params[n]``; ``held`` keeps the others at
        ``values[n]`` (default: their current values)."""
        if self.masking == "backward":
            self._multipliers = {n: active[n].to(device=p.device, dtype=p.dtype) for n, p in params.items()}
            return
        held = {}
        for n, p in params.items():
            source = p if values is None else values[n]
            held[n] = (~active[n].to(device=p.device, dtype=torch.bool),
                       source.detach().to(device=p.device, dtype=p.dtype, copy=True))
        self._held = held

    def before_step(self, params: Mapping[str, Tensor]) -> None:
        """``held``: masked entries get a zero gradient (so the optimizer's moments stay clean for them)."""
        for n, p in params.items():
            if p.grad is not None and n in self._held:
                p.grad.masked_fill_(self._held[n][0], 0.0)

    @torch.no_grad()
    def after_step(self, params: Mapping[str, Tensor]) -> None:
        """``held``: copy the held values back into the masked entries."""
        for n, p in params.items():
            if n in self._held:
                frozen, values = self._held[n]
                p.copy_(torch.where(frozen, values, p))

    def clear(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._multipliers, self._held = [], {}, {}
