"""Base unlearning losses as pure functions of (model, batch) -> scalar loss (the method objects in
:mod:`cuig_lightning.methods` choose one and hold its arguments).

A batch is a dict of tensors drawn by :class:`cuig_lightning.data.anchors.UnlearningData`:
``latents`` z0, ``noise`` ε, ``timesteps`` t, ``cond_target`` (text embedding of the prompt with the
target concept) and ``cond_anchor`` (the same prompt with the anchor concept).

ConAbl and SculpMem train on the anchor latents noised to t; ESD ignores z0 and uses (ε, t) to start and
stop a DDIM trajectory of the current model on the target prompt.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch.func import functional_call

from cuig_lightning.models.diffusion import DiffusionModel, sample_cfg, sampling_scheduler, trajectory_stops

ConAblVariant = Literal["model", "noise"]


def noisy_latents(model: DiffusionModel, batch: dict) -> torch.Tensor:
    return model.scheduler.add_noise(batch["latents"], batch["noise"], batch["timesteps"])


def denoising_target(model: DiffusionModel, batch: dict) -> torch.Tensor:
    """What the UNet is trained to predict: ε, or v for v-prediction models."""
    if model.scheduler.config.prediction_type == "v_prediction":
        return model.scheduler.get_velocity(batch["latents"], batch["noise"], batch["timesteps"])
    return batch["noise"]


def conabl_loss(
    model: DiffusionModel,
    batch: dict,
    variant: ConAblVariant = "model",
    anchor_preservation: float = 0.0,
) -> torch.Tensor:
    """Concept Ablation: make the target prompt predict what the anchor prompt predicts.

    ``model``: MSE(ε_θ(z_t, t, c_target), sg ε_θ(z_t, t, c_anchor)), the anchor prediction from the same
    current UNet under no_grad. ``noise``: the target is the true noise instead. ``anchor_preservation``
    adds λ·MSE(ε_θ(z_t, t, c_anchor), ε) so the anchor itself keeps working.
    """
    z_t, t = noisy_latents(model, batch), batch["timesteps"]
    pred_target = model.unet(z_t, t, encoder_hidden_states=batch["cond_target"]).sample
    if variant == "noise":
        target = denoising_target(model, batch)
    else:
        with torch.no_grad():
            target = model.unet(z_t, t, encoder_hidden_states=batch["cond_anchor"]).sample
    loss = F.mse_loss(pred_target.float(), target.float())
    if anchor_preservation > 0:
        pred_anchor = model.unet(z_t, t, encoder_hidden_states=batch["cond_anchor"]).sample
        loss = loss + anchor_preservation * F.mse_loss(pred_anchor.float(), denoising_target(model, batch).float())
    return loss


SculpMemLoss = Literal["conabl", "original"]


def sculpmem_loss(
    model: DiffusionModel,
    batch: dict,
    form: SculpMemLoss = "conabl",
    align_scale: float = 0.25,
    variant: ConAblVariant = "model",
    anchor_preservation: float = 0.0,
) -> torch.Tensor:
    """SculpMem's loss (the dynamic mask is the ``callbacks.DynamicMask`` callback).

    ``conabl`` (what the paper's code trains): exactly :func:`conabl_loss` with ``variant`` and
    ``anchor_preservation``.

    ``original`` (the paper's losses): forget + align_scale · align with, on the batch's anchor latents,
      forget = MSE(ε_θ(z_t, t, c_target), sg ε_θ(z_t, t, c_anchor)),
      align  = MSE(ε_θ(z_t, t, c_anchor), ε)   (the v-target for v-prediction models).
    The batch holds only anchor (super-class) images, so both terms share (z0, ε, t); the reference code
    draws separate super-class images and noise for the align term at the same t. The anchor prediction
    is computed once with gradient and used detached as the forget target, so the value equals
    ``conabl_loss(variant="model", anchor_preservation=align_scale)`` at one UNet pass less.
    """
    if form == "conabl":
        return conabl_loss(model, batch, variant, anchor_preservation)
    if form != "original":
        raise ValueError(f"unknown SculpMem loss {form!r}; use conabl or original")
    z_t, t = noisy_latents(model, batch), batch["timesteps"]
    pred_target = model.unet(z_t, t, encoder_hidden_states=batch["cond_target"]).sample
    pred_anchor = model.unet(z_t, t, encoder_hidden_states=batch["cond_anchor"]).sample
    forget = F.mse_loss(pred_target.float(), pred_anchor.detach().float())
    align = F.mse_loss(pred_anchor.float(), denoising_target(model, batch).float())
    return forget + align_scale * align


@torch.no_grad()
def esd_target(
    model: DiffusionModel,
    base_weights: dict[str, torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    eta: float,
) -> torch.Tensor:
    """ε_θ0(x_t, t, "") − η (ε_θ0(x_t, t, c*) − ε_θ0(x_t, t, "")), without a second UNet: θ0 is the UNet
    with ``base_weights`` (the pretrained trainable tensors, already on the UNet's device) substituted
    for its trainable parameters through ``torch.func.functional_call``."""
    u = uncond.expand(len(x_t), *uncond.shape[1:]).to(cond.dtype)
    both = functional_call(
        model.unet, base_weights, (torch.cat([x_t, x_t]), torch.cat([t, t])),
        {"encoder_hidden_states": torch.cat([u, cond])},
    ).sample
    e_uncond, e_cond = both.float().chunk(2)
    return e_uncond - eta * (e_cond - e_uncond)


def esd_loss(
    model: DiffusionModel,
    batch: dict,
    base_weights: dict[str, torch.Tensor],
    uncond: torch.Tensor,
    eta: float = 1.0,
    trajectory_steps: int = 50,
    guidance: float = 3.0,
) -> torch.Tensor:
    """ESD (ESD-x with the trainable group given): MSE(ε_θ(x_t, t, c*), sg esd_target), c* = ``cond_target``.

    x_t comes from the current model's own DDIM trajectory on c* (CFG ``guidance``, ``trajectory_steps``
    steps, under no_grad), started from the batch's noise and stopped at the step whose timestep is
    nearest to the batch's t; the loss is evaluated at that step's timestep. Everything random is the
    batch's (ε, t), so the loss is as deterministic and resumable as the batch stream.
    """
    scheduler = sampling_scheduler(model.scheduler, trajectory_steps, "ddim")
    cond = batch["cond_target"]
    stops = trajectory_stops(scheduler, batch["timesteps"])
    x_t, t = sample_cfg(model.unet, scheduler, batch["noise"], cond, uncond, guidance, stops=stops, upcast=True)
    target = esd_target(model, base_weights, x_t, t, cond, uncond, eta)
    pred = model.unet(x_t, t, encoder_hidden_states=cond).sample
    return F.mse_loss(pred.float(), target)
