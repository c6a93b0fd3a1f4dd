"""ConAbl against an independent computation on fixed tensors."""

from __future__ import annotations

import pytest
import torch

from cuig_lightning.losses import conabl_loss
from cuig_lightning.module import UnlearningModule


@pytest.fixture
def module(tiny_sd):
    return UnlearningModule(model_path=str(tiny_sd))


def _batch(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = module.diffusion
    c, h, w = d.latent_shape
    cond = d.encode_text(["A dog image in Van Gogh style.", "A dog image."])
    return {
        "latents": torch.randn(2, c, h, w, generator=g),
        "noise": torch.randn(2, c, h, w, generator=g),
        "timesteps": torch.tensor([10, 700]),
        "cond_target": cond[:1].expand(2, -1, -1),
        "cond_anchor": cond[1:].expand(2, -1, -1),
    }


def _by_hand(module, batch, target_is_noise=False):
    unet, sched = module.diffusion.unet, module.diffusion.scheduler
    abar = sched.alphas_cumprod[batch["timesteps"]].view(-1, 1, 1, 1)
    z_t = abar.sqrt() * batch["latents"] + (1 - abar).sqrt() * batch["noise"]
    pred = unet(z_t, batch["timesteps"], encoder_hidden_states=batch["cond_target"]).sample
    if target_is_noise:
        target = batch["noise"]
    else:
        target = unet(z_t, batch["timesteps"], encoder_hidden_states=batch["cond_anchor"]).sample.detach()
    return ((pred - target) ** 2).mean()


def _grads(module):
    return {n: p.grad.clone() for n, p in module.diffusion.unet.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["model", "noise"])
def test_conabl_matches_independent_computation(module, variant):
    batch = _batch(module)
    loss = conabl_loss(module.diffusion, batch, variant=variant)
    loss.backward()
    got = _grads(module)
    module.diffusion.unet.zero_grad(set_to_none=True)
    expected = _by_hand(module, batch, target_is_noise=variant == "noise")
    expected.backward()
    want = _grads(module)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    # gradients reach exactly the trainable group (attn2 to_k/to_v weights), and equal the by-hand ones
    assert set(got) == set(module.trainable) == set(want)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-8)
    assert any(g.abs().sum() > 0 for g in got.values())


def test_anchor_prediction_is_stop_gradient(module):
    """With the anchor branch differentiable the gradient would differ: the no_grad really matters."""
    batch = _batch(module, seed=1)
    conabl_loss(module.diffusion, batch).backward()
    got = _grads(module)
    module.diffusion.unet.zero_grad(set_to_none=True)
    unet, sched = module.diffusion.unet, module.diffusion.scheduler
    z_t = sched.add_noise(batch["latents"], batch["noise"], batch["timesteps"])
    pred = unet(z_t, batch["timesteps"], encoder_hidden_states=batch["cond_target"]).sample
    anchor = unet(z_t, batch["timesteps"], encoder_hidden_states=batch["cond_anchor"]).sample  # not detached
    ((pred - anchor) ** 2).mean().backward()
    both = _grads(module)
    assert any(not torch.allclose(got[n], both[n]) for n in got)


def test_anchor_preservation_adds_the_anchor_term(module):
    batch = _batch(module, seed=2)
    lam = 0.5
    with torch.no_grad():
        base = conabl_loss(module.diffusion, batch)
        with_term = conabl_loss(module.diffusion, batch, anchor_preservation=lam)
        unet = module.diffusion.unet
        z_t = module.diffusion.scheduler.add_noise(batch["latents"], batch["noise"], batch["timesteps"])
        anchor = unet(z_t, batch["timesteps"], encoder_hidden_states=batch["cond_anchor"]).sample
        term = ((anchor - batch["noise"]) ** 2).mean()
    torch.testing.assert_close(with_term, base + lam * term)
