"""Base unlearning methods as objects: each holds its own arguments, its trainable group, its loss and the
callbacks it needs. Selected in the config like callbacks are::

    model:
      method:
        class_path: cuig_lightning.methods.SculpMem
        init_args: {density: 0.5, warmup_steps: 6}

The module calls :meth:`Method.loss` every training step and returns :meth:`Method.callbacks` from
``LightningModule.configure_callbacks()``, so SculpMem's dynamic mask never has to be listed in a config.
The maths is in :mod:`cuig_lightning.losses` (the paper's base losses).
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.callbacks import Callback

from callbacks.dynamic_mask import DynamicMask
from callbacks.masking import Masking
from cuig_lightning.losses import ConAblVariant, SculpMemLoss, conabl_loss, esd_loss, sculpmem_loss
from cuig_lightning.models.diffusion import TrainableGroup


class Method:
    """A base unlearning method. ``trainable``: the UNet parameter group it trains
    (``xattn_kv``: attn2 key/value weights, ``xattn``: every attn2 parameter, ``full``)."""

    trainable: TrainableGroup = "xattn_kv"

    def loss(self, module, batch: dict) -> torch.Tensor:
        """The unlearning loss of one batch; ``module`` is the :class:`UnlearningModule` (its ``diffusion``,
        ``trainable`` and ``base_weights``)."""
        raise NotImplementedError

    def callbacks(self) -> list[Callback]:
        """Callbacks the method trains under (fresh instances: one call per stage's ``fit``)."""
        return []

    def detaches_first_token(self) -> bool:
        """Whether training gives the first text position's cross-attention key / value no gradient
        (:func:`cuig_lightning.models.diffusion.detach_first_text_position`). A method, not an attribute, so
        that jsonargparse's lazy default instance is built before it answers."""
        return getattr(self, "detach_first_token", False)


class ConAbl(Method):
    """Concept Ablation: the target prompt learns to predict what the anchor prompt predicts.

    Args:
        trainable: parameter group trained (``xattn_kv``, ``xattn`` or ``full``).
        variant: ``model`` (anchor prediction of the current UNet) or ``noise`` (the true noise).
        anchor_preservation: weight of the optional anchor-preservation term.
        detach_first_token: the first text position's key / value get no gradient, as in the paper's code
            (and Concept Ablation's); False trains them (cuig before issue 33).
    """

    def __init__(self, trainable: TrainableGroup = "xattn_kv", variant: ConAblVariant = "model",
                 anchor_preservation: float = 0.0, detach_first_token: bool = True):
        if variant not in ("model", "noise"):
            raise ValueError(f"unknown ConAbl variant {variant!r}; choose model or noise")
        self.trainable, self.variant, self.anchor_preservation = trainable, variant, anchor_preservation
        self.detach_first_token = detach_first_token

    def loss(self, module, batch: dict) -> torch.Tensor:
        return conabl_loss(module.diffusion, batch, self.variant, self.anchor_preservation)


class SculpMem(Method):
    """Sculpting Memory: the SculpMem loss trained under a dynamic mask (``callbacks.DynamicMask``, supplied
    by this method through ``configure_callbacks``, so it is never listed under ``trainer.callbacks``).

    Args:
        trainable: parameter group trained; ``xattn_kv`` (attn2 to_k/to_v) as the paper's runs, ``xattn``
            (q/k/v/out) as the SculpMem reference code's option.
        loss: ``conabl`` (the paper's code: the ConAbl loss) or ``original`` (the paper's losses: ConAbl-form
            forget term + ``align_scale`` · MSE(ε_θ(z_t, t, c_anchor), ε); see :func:`losses.sculpmem_loss`).
        align_scale: weight of the ``original`` alignment term (reference 0.25).
        variant / anchor_preservation: as for :class:`ConAbl` (``loss: conabl`` only).
        density, warmup_steps, swap_every, turnover, stop_fraction, accumulate, masking, warmup: the dynamic
            mask's schedule and how it is applied (see ``callbacks.DynamicMask``; the defaults are the paper's code).
        detach_first_token: as for :class:`ConAbl`.
    """

    def __init__(self, trainable: TrainableGroup = "xattn_kv", loss: SculpMemLoss = "conabl", align_scale: float = 0.25,
                 variant: ConAblVariant = "model", anchor_preservation: float = 0.0, density: float = 0.5,
                 warmup_steps: int = 50, swap_every: int = 100, turnover: float = 0.2, stop_fraction: float = 0.8,
                 accumulate: Literal["abs", "signed"] = "signed", masking: Masking = "backward",
                 warmup: Literal["dense", "frozen"] = "dense", detach_first_token: bool = True):
        if loss not in ("conabl", "original"):
            raise ValueError(f"unknown SculpMem loss {loss!r}; choose conabl or original")
        if loss == "original" and (anchor_preservation > 0 or variant != "model"):
            raise ValueError("SculpMem loss original has its own anchor term (align_scale) and the model-based "
                             "forget target: leave anchor_preservation 0 and variant model")
        self.trainable, self.form, self.align_scale = trainable, loss, align_scale
        self.variant, self.anchor_preservation = variant, anchor_preservation
        self.detach_first_token = detach_first_token
        self.mask_args = dict(density=density, warmup_steps=warmup_steps, swap_every=swap_every, turnover=turnover,
                              stop_fraction=stop_fraction, accumulate=accumulate, masking=masking, warmup=warmup)
        self.callbacks()  # check the mask's arguments now, not at the first stage

    def loss(self, module, batch: dict) -> torch.Tensor:
        return sculpmem_loss(module.diffusion, batch, self.form, self.align_scale, self.variant,
                             self.anchor_preservation)

    def callbacks(self) -> list[Callback]:
        return [DynamicMask(**self.mask_args)]


class ESD(Method):
    """ESD: negative guidance from the frozen pretrained weights on the model's own DDIM trajectory
    (ESD-x with ``trainable: xattn``).

    Args:
        trainable: parameter group trained.
        eta: the negative-guidance scale η.
        trajectory_steps: DDIM steps of the trajectory x_t is drawn from (each item stops at the step
            nearest its drawn t, so a batch costs on average about half of them, with CFG).
        guidance: classifier-free guidance of that trajectory.
    """

    def __init__(self, trainable: TrainableGroup = "xattn_kv", eta: float = 1.0, trajectory_steps: int = 50,
                 guidance: float = 3.0):
        if trajectory_steps < 1:
            raise ValueError(f"ESD trajectory_steps must be >= 1, got {trajectory_steps}")
        self.trainable, self.eta, self.trajectory_steps, self.guidance = trainable, eta, trajectory_steps, guidance
        self._cache: dict = {}  # θ0 trainable tensors and the "" embedding on the UNet's device

    def loss(self, module, batch: dict) -> torch.Tensor:
        base, uncond = self._inputs(module)
        return esd_loss(module.diffusion, batch, base, uncond, self.eta, self.trajectory_steps, self.guidance)

    def _inputs(self, module) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """θ0 of the trainable tensors (``base_weights``) and the "" embedding, on the UNet's device, cached.
        On CPU in the parameters' dtype the θ0 tensors are ``base_weights`` themselves (no copy); the frozen
        part of the UNet is shared, so no second UNet exists."""
        p = next(iter(module.trainable.values()))
        key = (id(module), p.device, p.dtype)
        if self._cache.get("key") != key:
            base = {n: module.base_weights[n].to(device=t.device, dtype=t.dtype) for n, t in module.trainable.items()}
            self._cache = {"key": key, "base": base, "uncond": module.diffusion.encode_text([""]).to(p.device)}
        return self._cache["base"], self._cache["uncond"]
