"""The first text position's cross-attention key / value get no gradient (the paper's ConAbl / SculpMem code,
CUIG ``UnlearningMethods/ConAbl/src/model.py``): the same gradients as the reference's detach written out, the
forward pass bitwise unchanged, and the reason it matters: that position's state is the same for every prompt."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cuig_lightning.methods import ConAbl, SculpMem
from cuig_lightning.models.diffusion import DiffusionModel, detach_first_text_position


class ReferenceDetach(nn.Module):
    """The reference's lines around a key / value projection: ``detach * out + (1 - detach) * out.detach()``
    with ``detach`` 0 at position 0."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x):
        out = self.linear(x)
        detach = torch.ones_like(out)
        detach[:, :1] = 0.0
        return detach * out + (1 - detach) * out.detach()


def _inputs(model: DiffusionModel):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, *model.latent_shape, generator=g)
    cond = model.encode_text(["A Cats image in Van Gogh style.", "A Dogs image."])
    return latents, torch.tensor([10, 500]), cond


def _kv_grads(unet, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    unet.zero_grad()
    out = unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
    out.square().mean().backward()
    grads = {n.replace(".linear", ""): p.grad.clone() for n, p in unet.named_parameters()
             if "attn2.to_k" in n or "attn2.to_v" in n}
    return out.detach(), grads


@pytest.fixture(scope="module")
def tiny(tiny_sd):
    return DiffusionModel.from_pretrained(tiny_sd)


def test_gradients_are_the_reference_detach_and_the_forward_is_bitwise_unchanged(tiny):
    inputs = _inputs(tiny)
    plain, reference, hooked = (copy.deepcopy(tiny.unet) for _ in range(3))
    for unet in (plain, reference, hooked):
        unet.requires_grad_(True)
    for name, module in list(reference.named_modules()):
        if name.endswith("attn2"):
            module.to_k, module.to_v = ReferenceDetach(module.to_k), ReferenceDetach(module.to_v)
    handles = detach_first_text_position(hooked)
    assert len(handles) == 2 * sum(name.endswith("attn2") for name, _ in hooked.named_modules())

    out_plain, grads_plain = _kv_grads(plain, inputs)
    out_reference, grads_reference = _kv_grads(reference, inputs)
    out_hooked, grads_hooked = _kv_grads(hooked, inputs)
    assert torch.equal(out_hooked, out_plain)  # the forward pass is untouched
    assert grads_hooked.keys() == grads_reference.keys() and grads_hooked
    for n in grads_hooked:
        torch.testing.assert_close(grads_hooked[n], grads_reference[n], rtol=1e-5, atol=1e-8)
        assert not torch.allclose(grads_plain[n], grads_reference[n])  # cuig before issue 33 trained position 0

    for handle in handles:
        handle.remove()
    assert torch.equal(_kv_grads(hooked, inputs)[1][n], grads_plain[n])  # removable


def test_the_first_position_state_is_the_same_for_every_prompt(tiny):
    """Why the reference detaches it: with a causal encoder the BOS / CLS state has read nothing else."""
    canvas = DiffusionModel.from_pretrained("canvas-mini")  # MiniLM under cuig's causal mask
    prompts = ["A Cats image in Van Gogh style.", "Two Towers.", ""]
    for model in (tiny, canvas):  # SD-1.5's CLIP is causal by construction; tiny SD is a random CLIP
        states = model.encode_text(prompts)
        assert torch.equal(states[0, 0], states[1, 0]) and torch.equal(states[0, 0], states[2, 0])
        assert not torch.allclose(states[0, 1], states[1, 1])


def test_conabl_and_sculpmem_detach_by_default_and_the_module_hooks_the_unet(tiny_sd):
    from cuig_lightning.module import UnlearningModule

    assert ConAbl().detach_first_token and SculpMem().detach_first_token
    module = UnlearningModule(model_path=str(tiny_sd))
    off = UnlearningModule(model_path=str(tiny_sd), method=ConAbl(detach_first_token=False))
    inputs = _inputs(module.diffusion)
    grads = {}
    for label, m in (("on", module), ("off", off)):
        m.diffusion.unet.zero_grad()
        m.diffusion.unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample.square().mean().backward()
        grads[label] = {n: p.grad.clone() for n, p in m.trainable.items()}
    reference = copy.deepcopy(off.diffusion.unet)
    for name, sub in list(reference.named_modules()):
        if name.endswith("attn2"):
            sub.to_k, sub.to_v = ReferenceDetach(sub.to_k), ReferenceDetach(sub.to_v)
    expected = _kv_grads(reference, inputs)[1]
    for n, g in grads["on"].items():
        torch.testing.assert_close(g, expected[n], rtol=1e-5, atol=1e-8)
        assert not torch.allclose(grads["off"][n], expected[n])
