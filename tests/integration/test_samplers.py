"""cuig's CFG sampler (evaluation, anchors, exports) against diffusers' own pipeline loop, for every sampler."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from cuig_lightning.models.diffusion import SAMPLERS, DiffusionModel, sample_cfg, sampling_scheduler


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_cfg_sampling_equals_the_diffusers_pipeline(tiny_sd, sampler):
    """The same prompt states, starting noise, steps and guidance give the latents StableDiffusionPipeline
    computes with the same scheduler: the prediction type, timestep grid and solver state are wired alike."""
    model = DiffusionModel.from_pretrained(tiny_sd)
    cond, uncond = model.encode_text(["A Dogs image in Van_Gogh style."] * 2), model.encode_text([""])
    noise = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    ours = sample_cfg(model.unet, sampling_scheduler(model.scheduler, 6, sampler), noise, cond, uncond, 3.0)[0]
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=sampling_scheduler(model.scheduler, 6, sampler),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond.expand_as(cond), latents=noise.clone(),
                  num_inference_steps=6, guidance_scale=3.0, output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_trajectory_stops_need_a_one_step_sampler(tiny_sd):
    model = DiffusionModel.from_pretrained(tiny_sd)
    noise = torch.randn((2, *model.latent_shape))
    cond, uncond = model.encode_text(["a", "b"]), model.encode_text([""])
    with pytest.raises(ValueError, match="DDIM"):
        sample_cfg(model.unet, sampling_scheduler(model.scheduler, 4, "dpm_solver"), noise, cond, uncond, 2.0,
                   stops=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="unknown sampler"):
        sampling_scheduler(model.scheduler, 4, "euler")
