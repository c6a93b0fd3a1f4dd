"""SculpMem (ConAbl loss under a dynamic mask) and ESD as base methods, alone and with every regularizer."""

from __future__ import annotations

import copy
import gc
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from diffusers import DDIMScheduler, UNet2DConditionModel
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch.utils.data import DataLoader, IterableDataset

from callbacks import DynamicMask
from callbacks.dynamic_mask import turnover_at
from callbacks.selective_finetuning import topk_mask
from cuig_lightning.losses import conabl_loss, esd_target, sculpmem_loss
from cuig_lightning.models.diffusion import DiffusionModel, trainable_names
from cuig_lightning.module import UnlearningModule
from tests.conftest import run_cli, write_smoke_overlay
from tests.test_callbacks_lightning import FakeUnlearning, make_stage
from tests.test_continual import _deltas

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*LightningModule.*has parameters that were not"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ------------------------------------------------------------------------------ DynamicMask, unit level
class _Stream(IterableDataset):
    """Batch i is a function of i only, and the stream starts at the trainer's step (like the real data)."""

    def __init__(self, module: "StreamUnlearning", start: int) -> None:
        self.module, self.start = module, start

    def __iter__(self):
        i = self.start
        while True:
            yield self.module.batch(i)
            i += 1


class StreamUnlearning(FakeUnlearning):
    def batch(self, i: int):
        return self._batches(1, 4, seed=1000 + i)

    def train_dataloader(self):
        return DataLoader(_Stream(self, self.trainer.global_step), batch_size=None)


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


@pytest.mark.parametrize("accumulate", ["abs", "signed"])
def test_warmup_updates_nothing_and_picks_the_top_density_per_tensor(tmp_path, accumulate):
    warmup, density = 3, 0.4
    module = _adamw_module(tmp_path)
    dm = DynamicMask(density=density, warmup_steps=warmup, swap_every=100, accumulate=accumulate)
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
    dm = DynamicMask(density=0.5, warmup_steps=2, swap_every=2, turnover=0.6, stop_fraction=0.8)
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


def test_inactive_elements_stay_bitwise_under_adamw_weight_decay(swap_run):
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
    dm = GradOnly(density=0.5, warmup_steps=1, swap_every=100)
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


def test_dynamic_mask_validates_arguments():
    for kwargs in ({"density": 0.0}, {"warmup_steps": 0}, {"swap_every": 0}, {"turnover": 1.5},
                   {"stop_fraction": -0.1}, {"accumulate": "max"}):
        with pytest.raises(ValueError):
            DynamicMask(**kwargs)


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
    return UnlearningModule(model_path=str(tiny_sd), method="esd", trainable="xattn", esd_eta=1.5,
                            esd_trajectory_steps=5, esd_guidance=2.0)


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
    base, cached_uncond = module._esd_inputs()
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
    base, _ = module._esd_inputs()
    assert set(base) == set(module.trainable)
    assert all(base[n] is module.base_weights[n] for n in base)  # on CPU: θ0 itself, not even a copy
    trainable = sum(p.numel() for p in module.trainable.values())
    unet_total = sum(p.numel() for p in module.diffusion.unet.parameters())
    assert sum(t.numel() for t in base.values()) == trainable < 0.5 * unet_total


def test_sculpmem_losses(tiny_sd):
    module = UnlearningModule(model_path=str(tiny_sd), method="sculpmem", trainable="xattn", sculpmem_loss="original",
                              align_scale=0.3)
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
    assert set(got) == set(trainable_names(d.unet, "xattn"))
    # the paper's code: the ConAbl loss itself
    assert torch.equal(sculpmem_loss(d, batch, "conabl").detach(), conabl_loss(d, batch).detach())


def test_method_arguments_are_checked(tiny_sd):
    with pytest.raises(ValueError, match="trainable: xattn"):
        UnlearningModule(model_path=str(tiny_sd), method="sculpmem")  # the default xattn_kv group
    with pytest.raises(ValueError, match="anchor_preservation"):
        UnlearningModule(model_path=str(tiny_sd), method="sculpmem", trainable="xattn", sculpmem_loss="original",
                         anchor_preservation=1.0)
    with pytest.raises(ValueError, match="unknown unlearning method"):
        UnlearningModule(model_path=str(tiny_sd), method="nope")


# ------------------------------------------------------------------------------ whole jobs through the CLI
def _dm(**kw) -> dict:
    return {"class_path": "callbacks.DynamicMask",
            "init_args": {"density": 0.5, "warmup_steps": 2, "swap_every": 2, "turnover": 0.5, **kw}}


METHODS = {
    "sculpmem": {"model": {"method": "sculpmem", "trainable": "xattn"}, "callbacks": [_dm()]},
    "esd": {"model": {"method": "esd", "trainable": "xattn", "esd_trajectory_steps": 4}, "callbacks": []},
}
L2 = {"class_path": "callbacks.NormRegularizer", "init_args": {"p": 2, "weight": 10.0}}
SELFT = {"class_path": "callbacks.SelectiveFineTuning", "init_args": {"topk": 0.1, "num_timesteps": 2}}
MERGE = {"class_path": "callbacks.ModelMerge", "init_args": {"method": "ties", "density": 0.5, "lam": 1.5}}
GRADPROJ = {"class_path": "callbacks.GradientProjection", "init_args": {"k": 2}}


@pytest.mark.parametrize("method", list(METHODS))
def test_three_sequential_requests(make_config, tmp_path, tiny_sd, method):
    spec = METHODS[method]
    cfg = make_config(model=spec["model"], trainer={"max_steps": 6, "callbacks": spec["callbacks"]})
    assert run_cli("fit", "--config", str(cfg)) == 0
    deltas = _deltas(tmp_path / "run")
    assert [p.parent.name for p in deltas] == ["01-Van_Gogh", "02-Picasso", "03-Dogs"]
    unet = DiffusionModel.from_pretrained(tiny_sd).unet
    keys = trainable_names(unet, "xattn")
    previous = {k: v.detach() for k, v in unet.named_parameters() if k in keys}
    for path in deltas:
        delta = load_file(path)
        assert sorted(delta) == keys
        changed = sum(int((delta[k] != previous[k]).sum()) for k in keys)
        total = sum(v.numel() for v in delta.values())
        assert changed > 0
        if method == "sculpmem":  # at most the active half plus what the one swap (after step 4 < 0.8 * 6) brought in
            history = json.loads((path.parent / "dynamic_mask.json").read_text())["history"]
            assert [(h["kind"], h["step"]) for h in history] == [("init", 2), ("swap", 4)]
            assert changed <= history[0]["active"] + history[1]["moved"] < total
        previous = delta


@pytest.mark.parametrize("regularizer", ["l2", "selft", "merge", "gradproj"])
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_with_each_regularizer(make_config, tmp_path, tiny_sd, method, regularizer):
    spec = METHODS[method]
    reg = {"l2": L2, "selft": SELFT, "merge": MERGE, "gradproj": GRADPROJ}[regularizer]
    schedule = "independent" if regularizer == "merge" else "sequential"
    cfg = make_config(requests=[{"target": "Van_Gogh"}, {"target": "Picasso"}], model=spec["model"],
                      trainer={"schedule": schedule, "max_steps": 3, "callbacks": [reg, *spec["callbacks"]]})
    assert run_cli("fit", "--config", str(cfg)) == 0
    deltas = _deltas(tmp_path / "run")
    assert len(deltas) == 2
    second = tmp_path / "run" / "requests" / "02-Picasso"
    if regularizer == "merge":
        assert (second / "task_vector.safetensors").is_file() and (second / "merge.json").is_file()
    if regularizer == "gradproj":
        assert (second / "gradient_projection.json").is_file()
    if regularizer == "selft":  # SelFT's 10% bound holds inside the base method too
        base = {k: v.detach() for k, v in DiffusionModel.from_pretrained(tiny_sd).unet.named_parameters()}
        first = load_file(deltas[0])
        changed = sum(int((first[k] != base[k]).sum()) for k in first)
        assert 0 < changed <= round(0.1 * sum(v.numel() for v in first.values()))


def test_sculpmem_without_the_dynamic_mask_is_refused(make_config, capsys):
    cfg = make_config(requests=[{"target": "Van_Gogh"}], model=METHODS["sculpmem"]["model"],
                      trainer={"callbacks": [L2]})
    assert run_cli("fit", "--config", str(cfg)) == 2
    assert "DynamicMask" in capsys.readouterr().err


# ------------------------------------------------------------------------------ shipped configs
SCULPMEM_ROWS = ["sequential", "simultaneous", "l1", "l2", "selft", "merge", "gradproj", "merge_gradproj"]
ROW_CALLBACKS = {
    "sequential": [], "simultaneous": [], "l1": ["callbacks.NormRegularizer"], "l2": ["callbacks.NormRegularizer"],
    "selft": ["callbacks.SelectiveFineTuning"], "merge": ["callbacks.ModelMerge"],
    "gradproj": ["callbacks.GradientProjection"],
    "merge_gradproj": ["callbacks.GradientProjection", "callbacks.ModelMerge"],
}


def _printed(capsys, *configs: Path) -> dict:
    args = ["fit"] + [a for c in configs for a in ("--config", str(c))] + ["--print_config"]
    assert run_cli(*args) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("row", SCULPMEM_ROWS)
def test_sculpmem_rows_parse(capsys, row):
    cfg = _printed(capsys, CONFIGS / "seq12.yaml", CONFIGS / "canvas_mini_sculpmem" / f"{row}.yaml")
    assert cfg["model"]["method"] == "sculpmem" and cfg["model"]["trainable"] == "xattn"
    classes = [c["class_path"] for c in cfg["trainer"]["callbacks"]]
    assert classes == ROW_CALLBACKS[row] + ["callbacks.DynamicMask"]
    expected_schedule = {"simultaneous": "simultaneous", "merge": "independent", "merge_gradproj": "independent"}
    assert cfg["trainer"]["schedule"] == expected_schedule.get(row, "sequential")
    assert cfg["trainer"]["run_dir"] == f"runs/canvas_mini/sculpmem-{row.replace('_', '-')}"
    conabl = _printed(capsys, CONFIGS / "seq12.yaml", CONFIGS / "canvas_mini" / f"{row}.yaml")
    conabl_classes = [c["class_path"] for c in conabl["trainer"]["callbacks"] or []]
    assert [c for c in classes if c != "callbacks.DynamicMask"] == conabl_classes  # the same rows as ConAbl's


def test_esd_config_parses(capsys):
    cfg = _printed(capsys, CONFIGS / "seq12.yaml", CONFIGS / "canvas_mini" / "esd.yaml")
    assert cfg["model"]["method"] == "esd" and cfg["model"]["trainable"] == "xattn"
    assert cfg["model"]["esd_eta"] == 1.0 and cfg["model"]["esd_trajectory_steps"] >= 1


@pytest.mark.parametrize("row", ["sequential", "merge_gradproj"])
def test_sculpmem_row_smoke(row, tmp_path, tiny_sd, cache_dir):
    smoke = write_smoke_overlay(tmp_path, tiny_sd, cache_dir, max_steps=8)
    overlay = CONFIGS / "canvas_mini_sculpmem" / f"{row}.yaml"
    args = ("--config", str(CONFIGS / "seq12.yaml"), "--config", str(overlay), "--config", str(smoke))
    assert run_cli("fit", *args) == 0
    assert len(list((tmp_path / "run" / "requests").glob("*/manifest.json"))) == 2
