"""Base unlearning losses as functions of (model, batch) -> scalar loss.

A batch is a dict of tensors drawn by :class:`cuig_lightning.data.anchors.UnlearningData`:
``latents`` z0, ``noise`` ε, ``timesteps`` t, ``cond_target`` (text embedding of the prompt with the
target concept) and ``cond_anchor`` (the same prompt with the anchor concept).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from cuig_lightning.models.diffusion import DiffusionModel

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
