"""The regularizer callbacks inside a real ``lightning.Trainer`` on the tiny fake unlearning module
(``tests.helpers.FakeUnlearning``, which satisfies the module contract the callbacks rely on)."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from callbacks import GradientProjection, ModelMerge, NormRegularizer, SelectiveFineTuning
from callbacks.gradient_projection import is_projected
from callbacks.merge import merge_task_vectors
from callbacks.projection import projector
from callbacks.norm import norm_penalty
from callbacks.selective_finetuning import topk_mask
from cuig_lightning.checkpoints import load_tensors
from tests.helpers import Capture, FakeUnlearning, fit, make_stage, total_elements

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*LightningModule.*has parameters that were not"),
    pytest.mark.filterwarnings("ignore:You.re resuming from a checkpoint that ended before the epoch ended"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]

# ---------------------------------------------------------------------------------------- L1 / L2


def test_norm_weight_zero_is_bitwise_the_run_without_it(tmp_path):
    plain = FakeUnlearning(make_stage(tmp_path), optimizer="adamw", lr=1e-2, weight_decay=0.1)
    fit(plain, [])
    zero = FakeUnlearning(make_stage(tmp_path), optimizer="adamw", lr=1e-2, weight_decay=0.1)
    fit(zero, [NormRegularizer(p=2, weight=0.0)])
    assert zero.loss_terms == {}
    for n, p in plain.trainable.items():
        assert torch.equal(p, zero.trainable[n])
        assert not torch.equal(p, plain.start_weights[n])  # the run did train


@pytest.mark.parametrize("p", [1, 2])
def test_norm_term_is_registered_and_pulls_towards_the_stage_start(tmp_path, p):
    weight = 5.0 if p == 1 else 100.0  # stable for SGD at lr 0.05 on ~300 elements
    free = FakeUnlearning(make_stage(tmp_path), lr=0.05)
    fit(free, [], max_steps=8)
    held = FakeUnlearning(make_stage(tmp_path), lr=0.05)
    fit(held, [NormRegularizer(p=p, weight=weight)], max_steps=8)
    assert list(held.loss_terms) == [f"l{p}"]
    expected = norm_penalty(held.trainable, held.start_weights, p, weight)
    assert held.loss_terms[f"l{p}"]().item() == pytest.approx(expected.item(), rel=1e-6)
    dist = lambda m: sum(((q - m.start_weights[n]) ** 2).sum().item() for n, q in m.trainable.items())  # noqa: E731
    assert 0 < dist(held) < dist(free)


# ---------------------------------------------------------------------------------------- SelFT


def _expected_selft_mask(tmp_path, topk: float, num_timesteps: int):
    """The mask recomputed by hand: |Σ_t g_t · θ_start| over the trajectory, one global top-k."""
    module = FakeUnlearning(make_stage(tmp_path))
    for batch in module.trajectory_batches(num_timesteps):
        module.unlearning_loss(batch).backward()
    importance = {n: (p.grad * module.start_weights[n]).abs() for n, p in module.trainable.items()}
    return topk_mask(importance, topk)


class _GradProbe(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.grads = [p.grad for p in pl_module.trainable.values()]


def test_selft_held_keeps_all_but_topk_elements_bitwise_under_adamw_weight_decay(tmp_path):
    topk, steps = 0.1, 6
    module = FakeUnlearning(make_stage(tmp_path), optimizer="adamw", lr=1e-2, weight_decay=0.1)
    selft, probe = SelectiveFineTuning(topk=topk, num_timesteps=5, masking="held"), _GradProbe()
    fit(module, [selft, probe], max_steps=steps)

    k = round(topk * total_elements(module))
    expected = _expected_selft_mask(tmp_path, topk, 5)
    assert all(torch.equal(selft.mask[n], expected[n]) for n in expected)
    assert sum(int(m.sum()) for m in selft.mask.values()) == k
    assert all(g is None for g in probe.grads)  # the importance gradients were cleared

    changed = 0
    for n, p in module.trainable.items():
        start, mask = module.start_weights[n], selft.mask[n]
        assert torch.equal(p[~mask], start[~mask])  # bitwise frozen
        changed += int((p != start).sum())
    assert 0.9 * k <= changed <= k


def test_selft_backward_masking_moves_unselected_elements_by_adamw_weight_decay_only(tmp_path):
    """The paper's code: the mask zeroes the gradient in backward; AdamW's decoupled weight decay still shrinks
    the unselected elements, p <- p (1 - lr wd) per step, and nothing else moves them (their moments stay 0)."""
    lr, wd, steps = 1e-2, 0.1, 4
    module = FakeUnlearning(make_stage(tmp_path), optimizer="adamw", lr=lr, weight_decay=wd)
    selft = SelectiveFineTuning(topk=0.1, num_timesteps=5)
    assert selft.masking == "backward"
    fit(module, [selft], max_steps=steps)
    trained = 0
    for n, p in module.trainable.items():
        frozen = ~selft.mask[n]
        expected = module.start_weights[n][frozen].clone()
        for _ in range(steps):
            expected.mul_(1 - lr * wd)
        assert torch.equal(p[frozen], expected)
        trained += int((p[~frozen] != module.start_weights[n][~frozen]).sum())
    assert trained > 0.9 * sum(int(m.sum()) for m in selft.mask.values())


def test_selft_zeroing_gradients_alone_would_not_freeze_under_weight_decay(tmp_path):
    class GradOnly(SelectiveFineTuning):
        def on_train_batch_end(self, *args):  # no restore after the step
            pass

    module = FakeUnlearning(make_stage(tmp_path), optimizer="adamw", lr=1e-2, weight_decay=0.1)
    cb = GradOnly(topk=0.1, num_timesteps=5)
    fit(module, [cb], max_steps=3)
    moved = sum(int((p[~cb.mask[n]] != module.start_weights[n][~cb.mask[n]]).sum()) for n, p in module.trainable.items())
    assert moved > 0.9 * sum(int((~m).sum()) for m in cb.mask.values())  # weight decay moves "frozen" entries


def test_selft_state_dict_round_trip_and_resume_reuses_the_mask(tmp_path, monkeypatch):
    module = FakeUnlearning(make_stage(tmp_path), optimizer="adamw", lr=1e-2, weight_decay=0.1)
    first = SelectiveFineTuning(topk=0.2, num_timesteps=3, masking="held")
    trainer = fit(module, [first], max_steps=2)
    state = first.state_dict()
    assert state["stage_index"] == 0 and all(m.dtype == torch.bool for m in state["mask"].values())
    copy = SelectiveFineTuning(topk=0.2, num_timesteps=3)
    copy.load_state_dict(state)
    assert all(torch.equal(copy.mask[n], m) for n, m in first.mask.items())

    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed_module = FakeUnlearning(make_stage(tmp_path), optimizer="adamw", lr=1e-2, weight_decay=0.1)
    resumed = SelectiveFineTuning(topk=0.2, num_timesteps=3, masking="held")
    monkeypatch.setattr(resumed, "_compute_mask", lambda *_: pytest.fail("the mask must come from the checkpoint"))
    fit(resumed_module, [resumed], max_steps=5, ckpt_path=ckpt)
    assert all(torch.equal(resumed.mask[n], m) for n, m in first.mask.items())
    for n, p in resumed_module.trainable.items():
        mask = first.mask[n]
        assert torch.equal(p[~mask], resumed_module.start_weights[n][~mask])
    assert any(not torch.equal(p, module.trainable[n]) for n, p in resumed_module.trainable.items())  # trained on


# ---------------------------------------------------------------------------------------- merging


def test_model_merge_saves_task_vectors_and_writes_the_merged_weights(tmp_path):
    """Request 1 keeps its task vector as trained (the paper's runs); request 2 is θ0 + TIES(τ1, τ2) with
    request 2's λ from the schedule."""
    lams, density = [9.0, 2.0], 0.5
    first = FakeUnlearning(make_stage(tmp_path, 0, "independent"), data_seed=1)
    cap0 = Capture()
    fit(first, [cap0, ModelMerge("ties", density, lams)], max_steps=3)
    r0 = tmp_path / "r0"
    tau0 = load_tensors(r0 / "task_vector.safetensors")
    theta0 = first.base_weights
    for n, p in first.trainable.items():
        assert torch.equal(tau0[n], cap0.weights[n] - theta0[n])
        assert torch.equal(p, cap0.weights[n])  # not merged, not scaled by lam[0]
    assert json.loads((r0 / "merge.json").read_text()) == {"method": None, "merged": [str(r0)]}

    second = FakeUnlearning(make_stage(tmp_path, 1, "independent", erased=["Near"], previous=[r0]), data_seed=2)
    cap1 = Capture()
    fit(second, [cap1, ModelMerge("ties", density, lams)], max_steps=3)
    tau1 = {n: cap1.weights[n] - theta0[n] for n in theta0}
    merged = merge_task_vectors([tau0, tau1], "ties", density, lams[1])
    for n, p in second.trainable.items():
        assert p.dtype == torch.float32 and isinstance(p, nn.Parameter)
        torch.testing.assert_close(p.detach(), theta0[n] + merged[n], rtol=0, atol=1e-7)
    record = json.loads((tmp_path / "r1" / "merge.json").read_text())
    assert record == {"method": "ties", "density": density, "lam": lams[1], "merged": [str(r0), str(tmp_path / "r1")]}


def test_model_merge_single_merges_request_one_and_the_schedule_repeats_its_last_value(tmp_path):
    lam, density = 2.0, 0.5
    first = FakeUnlearning(make_stage(tmp_path, 0, "independent"), data_seed=1)
    cap0 = Capture()
    fit(first, [cap0, ModelMerge("ties", density, lam, merge_single=True)], max_steps=3)
    tau0 = {n: cap0.weights[n] - first.base_weights[n] for n in first.base_weights}
    merged = merge_task_vectors([tau0], "ties", density, lam)
    assert all(torch.equal(p, first.base_weights[n] + merged[n]) for n, p in first.trainable.items())
    schedule = ModelMerge(lam=[1.25, 1.5, 2.0])
    assert [schedule.lam_at(n) for n in (1, 2, 3, 4, 12)] == [1.25, 1.5, 2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="lam"):
        ModelMerge(lam=[])


@pytest.mark.parametrize("method", ["task_arithmetic", "uniform"])
def test_model_merge_linear_methods(tmp_path, method):
    lam = 1.5
    fit(FakeUnlearning(make_stage(tmp_path, 0, "independent"), data_seed=1), [ModelMerge(method, lam=lam)], 2)
    tau0 = load_tensors(tmp_path / "r0" / "task_vector.safetensors")
    second = FakeUnlearning(make_stage(tmp_path, 1, "independent", previous=[tmp_path / "r0"]), data_seed=2)
    cap = Capture()
    fit(second, [cap, ModelMerge(method, lam=lam)], 2)
    for n, p in second.trainable.items():
        tau1 = cap.weights[n] - second.base_weights[n]
        total = tau0[n] + tau1 if method == "task_arithmetic" else (tau0[n] + tau1) / 2
        torch.testing.assert_close(p.detach(), second.base_weights[n] + lam * total, rtol=0, atol=1e-6)


def test_model_merge_requires_the_independent_schedule(tmp_path):
    with pytest.raises(ValueError, match="independent"):
        fit(FakeUnlearning(make_stage(tmp_path, 0, "sequential")), [ModelMerge()], 1)


# ---------------------------------------------------------------------------------------- GradProj


def _protected_outputs(module, names):
    C = module.concept_embeddings(names).T  # (d, n)
    return {n: p.detach() @ C for n, p in module.trainable.items() if is_projected(n)}


@pytest.mark.parametrize("steps", [1, 5])
def test_gradproj_keeps_protected_keys_and_values_under_sgd(tmp_path, steps):
    stage = make_stage(tmp_path, 1, erased=["Erased"])
    # the ridge r leaves |P c| ~ 1e-5 |c|: W·c drifts by ~ lr |g| 1e-5 per step, hence a small lr here
    free = FakeUnlearning(stage, lr=0.01)
    before = _protected_outputs(free, ["Near", "Erased", "Mid"])
    fit(free, [], max_steps=steps)
    proj = FakeUnlearning(stage, lr=0.01)
    gp = GradientProjection(k=3)
    fit(proj, [gp], max_steps=steps)

    assert gp.neighbours == ["Near", "Erased", "Mid"]  # the 3 most cosine-similar, target excluded
    record = json.loads((stage.request_dir / "gradient_projection.json").read_text())
    assert record["neighbours"] == gp.neighbours and record["targets"] == ["Target"]
    after_free, after_proj = _protected_outputs(free, gp.neighbours), _protected_outputs(proj, gp.neighbours)
    for n in before:
        drift, free_drift = (after_proj[n] - before[n]).abs().max(), (after_free[n] - before[n]).abs().max()
        assert drift <= 1e-5 and free_drift > 1e-1
        assert drift <= 1e-5 * free_drift
        assert not torch.equal(proj.trainable[n], proj.start_weights[n])  # keys/values still train
    if steps == 1:  # parameters that are not projected take the very same first step
        for n, p in proj.trainable.items():
            if not is_projected(n):
                assert torch.equal(p, free.trainable[n])


def test_gradproj_under_adamw_only_reduces_the_drift(tmp_path):
    """AdamW divides each gradient element by its own running RMS, so the update of grad @ P is no
    longer orthogonal to the protected embeddings: W·c moves (here by about half of the drift
    without projection), so GradProj only reduces the drift under Adam-type optimizers."""
    stage = make_stage(tmp_path, 1, erased=["Erased"])
    names = ["Near", "Erased", "Mid"]
    before = _protected_outputs(FakeUnlearning(stage), names)
    drift = {}
    for label, callbacks in (("free", []), ("proj", [GradientProjection(k=3)])):
        module = FakeUnlearning(stage, optimizer="adamw", lr=1e-2)
        fit(module, callbacks, max_steps=3)
        after = _protected_outputs(module, names)
        drift[label] = max((after[n] - before[n]).abs().max().item() for n in before)
    assert drift["proj"] > 1e-2  # not preserved: orders of magnitude above the SGD drift
    assert drift["proj"] < 0.75 * drift["free"]


def test_gradproj_explicit_pool_adds_erased_concepts(tmp_path):
    stage = make_stage(tmp_path, 2, erased=["Erased", "Dogs"])
    gp = GradientProjection(k=2, pool=["Far", "Other", "Target"])
    fit(FakeUnlearning(stage), [gp], max_steps=1)
    # candidates Far, Other, Erased, Dogs (target removed); most similar: Erased (0.894), then Far/Dogs (0)
    assert gp.neighbours == ["Erased", "Far"]


def test_gradproj_resume_reuses_the_neighbours(tmp_path, monkeypatch):
    stage = make_stage(tmp_path, 1, erased=["Erased"])
    gp = GradientProjection(k=2)
    module = FakeUnlearning(stage, lr=0.01)
    before = _protected_outputs(module, ["Near", "Erased"])
    trainer = fit(module, [gp], max_steps=2)
    assert gp.state_dict() == {"neighbours": ["Near", "Erased"], "stage_index": 1}
    trainer.save_checkpoint(tmp_path / "mid.ckpt")

    resumed = GradientProjection(k=4, mode="all")  # would choose differently if it chose again
    monkeypatch.setattr(resumed, "_choose", lambda *_: pytest.fail("neighbours must come from the checkpoint"))
    module2 = FakeUnlearning(stage, lr=0.01)
    fit(module2, [resumed], max_steps=5, ckpt_path=tmp_path / "mid.ckpt")
    assert resumed.neighbours == ["Near", "Erased"]
    after = _protected_outputs(module2, ["Near", "Erased"])
    assert all((after[n] - before[n]).abs().max() <= 1e-5 for n in before)


# ---------------------------------------------------------------------------------------- composition


def test_gradproj_selft_and_l2_compose(tmp_path):
    module = FakeUnlearning(make_stage(tmp_path, 1, erased=["Erased"]), optimizer="adamw", lr=1e-2, weight_decay=0.1)
    gp, selft = GradientProjection(k=3), SelectiveFineTuning(topk=0.2, num_timesteps=4, masking="held")
    fit(module, [gp, selft, NormRegularizer(p=2, weight=100.0)], max_steps=4)
    assert list(module.loss_terms) == ["l2"] and gp.neighbours == ["Near", "Erased", "Mid"]
    k, changed = round(0.2 * total_elements(module)), 0
    for n, p in module.trainable.items():
        assert torch.isfinite(p).all()
        mask = selft.mask[n]
        assert torch.equal(p[~mask], module.start_weights[n][~mask])
        changed += int((p != module.start_weights[n]).sum())
    assert 0.9 * k <= changed <= k


def test_all_four_compose_on_an_independent_stage(tmp_path):
    stage = make_stage(tmp_path, 0, "independent")
    module = FakeUnlearning(stage, optimizer="adamw", lr=1e-2, weight_decay=0.1)
    selft, cap = SelectiveFineTuning(topk=0.2, num_timesteps=4, masking="held"), Capture()
    merge = ModelMerge("ties", 0.5, 2.0, merge_single=True)  # merged at once: one stage shows all four
    callbacks = [GradientProjection(k=3), selft, NormRegularizer(p=1, weight=50.0), cap, merge]
    fit(module, callbacks, max_steps=3)
    theta0 = module.base_weights
    tau = {n: cap.weights[n] - theta0[n] for n in theta0}
    assert all(not tau[n][~selft.mask[n]].any() for n in tau)  # SelFT held until the merge
    merged = merge_task_vectors([tau], "ties", 0.5, 2.0)
    assert all(torch.equal(p, theta0[n] + merged[n]) for n, p in module.trainable.items())
    assert {f.name for f in stage.request_dir.iterdir()} == {"task_vector.safetensors", "merge.json", "gradient_projection.json"}


class _StepGradients(pl.Callback):
    """Listed last: the gradients the optimizer receives at the first step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.trainable.items()}


@pytest.mark.parametrize("masking", ["backward", "held"])
def test_selft_with_gradproj_orders_mask_and_projection_as_configured(tmp_path, masking):
    """backward (the paper's code): the gradient the optimizer gets is (g ⊙ m) P, the projection re-densifying
    the masked gradient; held (GradProj listed first): (g P) ⊙ m. g, m and P recomputed independently."""
    stage = make_stage(tmp_path, 1, erased=["Erased"])
    module = FakeUnlearning(stage, optimizer="adamw", lr=1e-2)
    gp, selft, probe = GradientProjection(k=3), SelectiveFineTuning(topk=0.2, num_timesteps=4, masking=masking), _StepGradients()
    fit(module, [gp, selft, probe], max_steps=1)

    reference = FakeUnlearning(stage)
    reference.unlearning_loss(next(iter(reference.train_dataloader()))).backward()
    P = projector(reference.concept_embeddings(gp.neighbours).T.double())
    mask = _expected_selft_mask(tmp_path, 0.2, 4)
    for n, p in reference.trainable.items():
        g, m = p.grad.double(), mask[n].double()
        project = (lambda x: x @ P) if is_projected(n) else (lambda x: x)
        expected = project(g * m) if masking == "backward" else project(g) * m
        torch.testing.assert_close(probe.grads[n].double(), expected, rtol=1e-5, atol=1e-7)
        if masking == "backward" and is_projected(n):
            assert (probe.grads[n][~mask[n]] != 0).any()  # re-densified: unselected elements move


# ---------------------------------------------------------------------------------------- the contract
def test_the_module_and_the_fake_satisfy_the_contract_and_others_are_refused(tmp_path, tiny_sd):
    from callbacks.contract import RegularizedModule
    from cuig_lightning.module import UnlearningModule

    assert isinstance(UnlearningModule(model_path=str(tiny_sd)), RegularizedModule)
    assert isinstance(FakeUnlearning(make_stage(tmp_path)), RegularizedModule)

    bare = FakeUnlearning(make_stage(tmp_path))
    del bare.start_weights
    with pytest.raises(TypeError, match="start_weights"):
        fit(bare, [NormRegularizer(p=2, weight=1.0)], 1)
