"""SculpMem's dynamic mask (``callbacks.DynamicMask``) inside a real ``lightning.Trainer`` on the fake module."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import DynamicMask, GradientProjection
from callbacks.dynamic_mask import turnover_at
from callbacks.gradient_projection import is_projected
from callbacks.projection import projector
from callbacks.selective_finetuning import topk_mask
from tests.helpers import StreamUnlearning, make_stage

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*LightningModule.*has parameters that were not"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]


# ------------------------------------------------------------------------------ DynamicMask, unit level
class Probe(pl.Callback):
    """Listed after DynamicMask: the importance it accumulated at each step, and mask/weights after each step."""

    def __init__(self, dm: DynamicMask) -> None:
        self.dm, self.importance, self.masks, self.weights = dm, {}, {}, {}

    def on_train_start(self, trainer, pl_module):
        self.weights[trainer.global_step] = pl_module.snapshot()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.importance[trainer.global_step + 1] = {n: t.clone() for n, t in self.dm.importance.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        s = trainer.global_step
        self.weights[s] = pl_module.snapshot()
        self.masks[s] = None if self.dm.mask is None else {n: m.clone() for n, m in self.dm.mask.items()}


def _adamw_module(tmp_path) -> StreamUnlearning:
    return StreamUnlearning(make_stage(tmp_path), optimizer="adamw", lr=1e-2, weight_decay=0.1)


def _fit(module, callbacks, max_steps, ckpt_path=None, root=None):
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, default_root_dir=root,
                         enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


#: cuig's dynamic mask before issue 33: a warm-up that updates nothing, masked entries held bitwise.
HELD = {"masking": "held", "warmup": "frozen"}


@pytest.mark.parametrize("accumulate", ["abs", "signed"])
def test_frozen_warmup_updates_nothing_and_picks_the_top_density_per_tensor(tmp_path, accumulate):
    warmup, density = 3, 0.4
    module = _adamw_module(tmp_path)
    dm = DynamicMask(density=density, warmup_steps=warmup, swap_every=100, accumulate=accumulate, **HELD)
    trainer = _fit(module, [dm], max_steps=warmup)
    # warm-up: no weight moved, and the optimizer never stepped a tensor (no AdamW state either)
    assert all(torch.equal(p, module.start_weights[n]) for n, p in module.trainable.items())
    assert len(trainer.optimizers[0].state) == 0

    by_hand = _adamw_module(tmp_path)  # θ stays θ0 during warm-up, so every warm-up gradient is taken at θ0
    total = {n: torch.zeros_like(p) for n, p in by_hand.trainable.items()}
    for i in range(warmup):
        by_hand.zero_grad()
        by_hand.unlearning_loss(by_hand.batch(i)).backward()
        for n, p in by_hand.trainable.items():
            total[n] += p.grad.abs() if accumulate == "abs" else p.grad
    for n, mask in dm.mask.items():
        assert int(mask.sum()) == round(density * mask.numel())  # per tensor, not one global top-k
        assert torch.equal(mask, topk_mask({n: total[n].abs()}, density)[n])
    assert dm.history == [{"step": warmup, "kind": "init", "turnover": 0.0, "moved": 0,
                           "active": sum(round(density * m.numel()) for m in dm.mask.values())}]


@pytest.fixture(scope="module")
def swap_run(tmp_path_factory):
    """AdamW with weight decay; warm-up 2, swap every 2, 12 steps: swaps after steps 4, 6, 8 (< 0.8 * 12)."""
    tmp_path = tmp_path_factory.mktemp("swap")
    module = _adamw_module(tmp_path)
    dm = DynamicMask(density=0.5, warmup_steps=2, swap_every=2, turnover=0.6, stop_fraction=0.8, **HELD)
    probe = Probe(dm)
    _fit(module, [dm, probe], max_steps=12)
    return module, dm, probe


def test_swaps_move_round_turnover_weakest_active_for_strongest_inactive(swap_run):
    module, dm, probe = swap_run
    assert [h["step"] for h in dm.history] == [2, 4, 6, 8]
    for s in range(3, 13):
        old, new = probe.masks[s - 1], probe.masks[s]
        if s not in (4, 6, 8):  # between swaps, and after 80% of training, the mask stays
            assert all(torch.equal(old[n], new[n]) for n in old), s
            continue
        turnover = 0.6 * 0.5 * (1 + math.cos(math.pi * s / 12))
        assert turnover_at(s, 12, 0.6) == pytest.approx(turnover)
        assert dm.history[[4, 6, 8].index(s) + 1]["turnover"] == pytest.approx(turnover)
        moved = 0
        for n in old:
            active = round(0.5 * old[n].numel())
            assert int(old[n].sum()) == int(new[n].sum()) == active
            count = round(turnover * active)
            dropped, added = old[n] & ~new[n], new[n] & ~old[n]
            assert int(dropped.sum()) == int(added.sum()) == count, (n, s)
            imp = probe.importance[s][n].abs()  # what was accumulated since the previous change, step s included
            if count:
                assert imp[dropped].max() <= imp[old[n] & ~dropped].min()  # the weakest active left
                assert imp[added].min() >= imp[~old[n] & ~added].max()  # the strongest inactive came in
            moved += count
        assert dm.history[[4, 6, 8].index(s) + 1]["moved"] == moved
    assert turnover_at(12, 12, 0.6) == pytest.approx(0.0) and turnover_at(0, 12, 0.6) == 0.6


def test_held_inactive_elements_stay_bitwise_under_adamw_weight_decay(swap_run):
    module, dm, probe = swap_run
    start = probe.weights[0]
    for s in (1, 2):  # warm-up
        assert all(torch.equal(probe.weights[s][n], start[n]) for n in start)
    for s in range(3, 13):
        mask, before, after = probe.masks[s - 1], probe.weights[s - 1], probe.weights[s]
        for n in mask:
            assert torch.equal(after[n][~mask[n]], before[n][~mask[n]]), (n, s)
        changed = sum(int((after[n][mask[n]] != before[n][mask[n]]).sum()) for n in mask)
        assert changed > 0.9 * sum(int(m.sum()) for m in mask.values())  # the active ones do train


def test_zeroing_gradients_alone_would_let_adamw_move_inactive_elements(tmp_path):
    class GradOnly(DynamicMask):
        def on_train_batch_end(self, *args):  # no restore after the step
            pass

    module = _adamw_module(tmp_path)
    dm = GradOnly(density=0.5, warmup_steps=1, swap_every=100, **HELD)
    _fit(module, [dm], max_steps=3)
    frozen = {n: ~m for n, m in dm.mask.items()}
    moved = sum(int((p[frozen[n]] != module.start_weights[n][frozen[n]]).sum()) for n, p in module.trainable.items())
    assert moved > 0.9 * sum(int((~m).sum()) for m in dm.mask.values())


def test_resume_mid_stage_is_bitwise(tmp_path):
    def run(ckpt=None):
        module = _adamw_module(tmp_path)
        dm = DynamicMask(density=0.5, warmup_steps=2, swap_every=2, turnover=0.6)
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1, filename="{step}")
        _fit(module, [dm, saver] if ckpt is None else [dm], max_steps=10, ckpt_path=ckpt, root=tmp_path)
        return module, dm

    straight, dm_straight = run()
    ckpt = tmp_path / "ckpt" / "step=5.ckpt"
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("DynamicMask"))
    assert set(saved) == {"importance", "mask", "history", "stage_index"} and len(saved["history"]) == 2
    resumed, dm_resumed = run(ckpt)
    assert all(torch.equal(p, resumed.trainable[n]) for n, p in straight.trainable.items())
    assert all(torch.equal(m, dm_resumed.mask[n]) for n, m in dm_straight.mask.items())
    assert dm_resumed.history == dm_straight.history


# ------------------------------------------------------------------------------ the paper's code (the defaults)
@pytest.mark.parametrize("with_projection", [False, True])
def test_dense_warmup_then_mask_from_the_raw_gradient_sum(tmp_path, with_projection):
    """The reference: warm-up steps 1..W-1 update every weight (with GradProj: the projected gradient), step W's
    gradient is dropped when the mask is made, and the mask is each tensor's top density by |Σ g| of the raw
    gradient g (before projection). Replayed by hand with torch.optim.AdamW."""
    warmup, density, lr, wd = 3, 0.4, 1e-2, 0.1
    module = _adamw_module(tmp_path)
    dm = DynamicMask(density=density, warmup_steps=warmup, swap_every=100)
    assert (dm.masking, dm.warmup, dm.accumulate) == ("backward", "dense", "signed")
    gp = GradientProjection(k=3) if with_projection else None
    _fit(module, [gp, dm] if gp else [dm], max_steps=warmup)

    by_hand = _adamw_module(tmp_path)
    P = projector(by_hand.concept_embeddings(gp.neighbours).T.double()) if gp else None
    optimizer = torch.optim.AdamW(by_hand.trainable.values(), lr=lr, weight_decay=wd)
    total = {n: torch.zeros_like(p) for n, p in by_hand.trainable.items()}
    for i in range(warmup - 1):  # the last warm-up step's gradient is dropped
        optimizer.zero_grad()
        by_hand.unlearning_loss(by_hand.batch(i)).backward()
        for n, p in by_hand.trainable.items():
            total[n] += p.grad
            if P is not None and is_projected(n):
                p.grad.copy_((p.grad.double() @ P).to(p.dtype))
        optimizer.step()
    optimizer.zero_grad()
    by_hand.unlearning_loss(by_hand.batch(warmup - 1)).backward()
    for n, p in by_hand.trainable.items():
        total[n] += p.grad
        torch.testing.assert_close(module.trainable[n], p.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.equal(module.trainable[n], module.start_weights[n])  # the warm-up trained densely
    for n, mask in dm.mask.items():
        assert torch.equal(mask, topk_mask({n: total[n].abs()}, density)[n]), n


def test_backward_masking_lets_adamw_momentum_and_decay_move_inactive_entries(tmp_path):
    module = _adamw_module(tmp_path)
    dm = DynamicMask(density=0.5, warmup_steps=2, swap_every=100)
    probe = Probe(dm)
    _fit(module, [dm, probe], max_steps=5)
    mask, before, after = probe.masks[3], probe.weights[3], probe.weights[5]
    moved = sum(int((after[n][~mask[n]] != before[n][~mask[n]]).sum()) for n in mask)
    assert moved > 0.9 * sum(int((~m).sum()) for m in mask.values())  # as in the reference: not held


def test_dynamic_mask_validates_arguments():
    for kwargs in ({"density": 0.0}, {"warmup_steps": 0}, {"swap_every": 0}, {"turnover": 1.5},
                   {"stop_fraction": -0.1}, {"accumulate": "max"}, {"masking": "hook"}, {"warmup": "none"}):
        with pytest.raises(ValueError):
            DynamicMask(**kwargs)
