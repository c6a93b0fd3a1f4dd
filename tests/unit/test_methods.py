"""The base methods' losses on the tiny SD model against independent computations, and their arguments."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from cuig_lightning.losses import conabl_loss, esd_target, sculpmem_loss
from cuig_lightning.methods import ESD, ConAbl, SculpMem
from cuig_lightning.models.diffusion import DiffusionModel, trainable_names
from cuig_lightning.module import UnlearningModule


# ------------------------------------------------------------------------------ losses on the tiny SD model
def _batch(d: DiffusionModel, seed: int = 0, timesteps=(10, 700, 999)):
    g = torch.Generator().manual_seed(seed)
    c, h, w = d.latent_shape
    n = len(timesteps)
    cond = d.encode_text(["A dog image in Van Gogh style.", "A dog image."])
    return {
        "latents": torch.randn(n, c, h, w, generator=g),
        "noise": torch.randn(n, c, h, w, generator=g),
        "timesteps": torch.tensor(timesteps),
        "cond_target": cond[:1].expand(n, -1, -1),
        "cond_anchor": cond[1:].expand(n, -1, -1),
    }


def _perturb(module: UnlearningModule, seed: int = 3) -> None:
    """Move θ away from θ0 so that "frozen θ0" and "current θ" differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.trainable.values():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def _grads(module):
    grads = {n: p.grad.clone() for n, p in module.trainable.items()}
    module.diffusion.unet.zero_grad(set_to_none=True)
    return grads


@pytest.fixture(scope="module")
def esd_module(tiny_sd):
    return UnlearningModule(model_path=str(tiny_sd), method=ESD(trainable="xattn", eta=1.5, trajectory_steps=5,
                                                                 guidance=2.0))


def _base_unet(module: UnlearningModule) -> UNet2DConditionModel:
    """The independent θ0 model: a deep copy of the UNet with the pretrained tensors loaded back."""
    unet = copy.deepcopy(module.diffusion.unet)
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for n, w in module.base_weights.items():
            params[n].copy_(w)
    return unet


def test_esd_target_equals_a_deep_copied_base_unet(esd_module):
    module = esd_module
    _perturb(module)
    d = module.diffusion
    g = torch.Generator().manual_seed(7)
    x_t = torch.randn(2, *d.latent_shape, generator=g)
    t = torch.tensor([101, 640])
    cond = d.encode_text(["A dog image in Van Gogh style."]).expand(2, -1, -1)
    uncond = d.encode_text([""])
    base, cached_uncond = module.method._inputs(module)
    torch.testing.assert_close(cached_uncond, uncond)
    got = esd_target(d, base, x_t, t, cond, uncond, eta=1.5)
    with torch.no_grad():
        unet0 = _base_unet(module)
        e0 = unet0(x_t, t, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
        ep = unet0(x_t, t, encoder_hidden_states=cond).sample
        expected = e0 - 1.5 * (ep - e0)
        current = d.unet(x_t, t, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(current, e0, atol=1e-4)  # θ0 really is not the current model
    # the module's own UNet was left with its current weights
    assert any(not torch.equal(p, module.base_weights[n]) for n, p in module.trainable.items())


def test_esd_loss_equals_a_by_hand_trajectory_and_target(esd_module):
    module = esd_module
    _perturb(module, seed=4)
    d = module.diffusion
    batch = _batch(d, seed=1, timesteps=(10, 480, 999))
    loss = module.unlearning_loss(batch)
    loss.backward()
    got = _grads(module)

    sched = DDIMScheduler.from_config(d.scheduler.config)
    sched.set_timesteps(5)
    grid = sched.timesteps.tolist()
    uncond = d.encode_text([""])
    unet0 = _base_unet(module)
    preds, targets = [], []
    for i, t_drawn in enumerate(batch["timesteps"].tolist()):
        stop = min(range(len(grid)), key=lambda k: (abs(grid[k] - t_drawn), k))  # nearest DDIM step
        x = batch["noise"][i : i + 1].clone()
        c = batch["cond_target"][i : i + 1]
        with torch.no_grad():
            for k in range(stop):  # the current model's own CFG trajectory
                e_u = d.unet(x, grid[k], encoder_hidden_states=uncond).sample
                e_c = d.unet(x, grid[k], encoder_hidden_states=c).sample
                x = sched.step(e_u + 2.0 * (e_c - e_u), grid[k], x).prev_sample
            t = torch.tensor([grid[stop]])
            e0 = unet0(x, t, encoder_hidden_states=uncond).sample
            ep = unet0(x, t, encoder_hidden_states=c).sample
        targets.append(e0 - 1.5 * (ep - e0))
        preds.append(d.unet(x, t, encoder_hidden_states=c).sample)
        if t_drawn == 999:
            assert stop == 0 and torch.equal(x, batch["noise"][i : i + 1])  # pure noise at the first step
    expected = ((torch.cat(preds) - torch.cat(targets)) ** 2).mean()
    expected.backward()
    want = _grads(module)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    assert set(got) == set(want) == set(trainable_names(d.unet, "xattn"))
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-3, atol=1e-6)
    assert loss.item() > 0 and any(g.abs().sum() > 0 for g in got.values())


def test_esd_keeps_no_second_unet(esd_module):
    module = esd_module
    count_unets = lambda: sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects())  # noqa: E731
    gc.collect()
    unets_before = count_unets()
    numel_before = sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
    loss = module.unlearning_loss(_batch(module.diffusion, seed=2))
    loss.backward()
    module.diffusion.unet.zero_grad(set_to_none=True)
    del loss
    gc.collect()
    assert count_unets() == unets_before
    assert sum(isinstance(m, UNet2DConditionModel) for m in module.modules()) == 1
    assert sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers()) == numel_before
    base, _ = module.method._inputs(module)
    assert set(base) == set(module.trainable)
    assert all(base[n] is module.base_weights[n] for n in base)  # on CPU: θ0 itself, not even a copy
    trainable = sum(p.numel() for p in module.trainable.values())
    unet_total = sum(p.numel() for p in module.diffusion.unet.parameters())
    assert sum(t.numel() for t in base.values()) == trainable < 0.5 * unet_total


def test_sculpmem_losses(tiny_sd):
    module = UnlearningModule(model_path=str(tiny_sd), method=SculpMem(loss="original", align_scale=0.3))
    d = module.diffusion
    batch = _batch(d, seed=5)
    loss = module.unlearning_loss(batch)
    loss.backward()
    got = _grads(module)
    # the paper's losses on this batch: forget (ConAbl form) + 0.3 * align on the anchor prompt
    expected = conabl_loss(d, batch, "model", anchor_preservation=0.3)
    expected.backward()
    want = _grads(module)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-8)
    assert set(got) == set(trainable_names(d.unet, "xattn_kv"))  # the paper's runs train to_k / to_v only
    # the paper's code: the ConAbl loss itself
    assert torch.equal(sculpmem_loss(d, batch, "conabl").detach(), conabl_loss(d, batch).detach())


def test_method_arguments_are_checked():
    with pytest.raises(ValueError, match="anchor_preservation"):
        SculpMem(loss="original", anchor_preservation=1.0)
    with pytest.raises(ValueError, match="unknown SculpMem loss"):
        SculpMem(loss="nope")
    with pytest.raises(ValueError, match="DynamicMask density"):
        SculpMem(density=0.0)  # the mask's arguments are checked when the method is made
    with pytest.raises(ValueError, match="trajectory_steps"):
        ESD(trajectory_steps=0)
    with pytest.raises(ValueError, match="variant"):
        ConAbl(variant="nope")


def test_each_method_brings_its_trainable_group_and_callbacks(tiny_sd):
    from callbacks import DynamicMask

    module = UnlearningModule(model_path=str(tiny_sd), method=SculpMem(warmup_steps=3))
    assert sorted(module.trainable) == trainable_names(module.diffusion.unet, "xattn_kv")
    wide = UnlearningModule(model_path=str(tiny_sd), method=SculpMem(trainable="xattn"))
    assert sorted(wide.trainable) == trainable_names(wide.diffusion.unet, "xattn")
    first, second = module.configure_callbacks(), module.configure_callbacks()
    assert [type(c) for c in first] == [DynamicMask] and first[0].warmup_steps == 3
    assert first[0] is not second[0]  # a fresh mask for every stage
    assert UnlearningModule(model_path=str(tiny_sd)).configure_callbacks() == []
    assert isinstance(UnlearningModule(model_path=str(tiny_sd)).method, ConAbl)
