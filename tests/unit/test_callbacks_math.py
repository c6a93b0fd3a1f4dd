"""Exact checks of the regularizers' pure functions (no Trainer)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from peft.utils.merge_utils import prune
from peft.utils.merge_utils import ties as peft_ties

from callbacks.gradient_projection import GradientProjection, is_projected, projector, select_neighbours
from callbacks.merge import merge_task_vectors, task_arithmetic, ties_merge, uniform
from callbacks.norm import NormRegularizer, norm_penalty
from callbacks.selective_finetuning import topk_mask
from cuig_lightning.requests import Request, Stage

# ---------------------------------------------------------------------------------------- L1 / L2


def _fixed_params():
    theta = {
        "a.attn2.to_k.weight": torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], requires_grad=True),
        "a.attn2.to_v.weight": torch.tensor([2.0, 2.0, -4.0], requires_grad=True),
    }
    start = {
        "a.attn2.to_k.weight": torch.tensor([[0.5, -2.0, 1.0], [1.0, 1.0, -1.0]]),
        "a.attn2.to_v.weight": torch.tensor([1.0, 2.5, -4.0]),
    }
    return theta, start


def test_l2_penalty_and_gradient_match_analytic_values():
    theta, start = _fixed_params()
    weight, n = 25000.0, 9
    # squared differences: 0.25, 0, 0.25, 1, 4, 0 | 1, 0.25, 0  -> sum 6.75
    penalty = norm_penalty(theta, start, p=2, weight=weight)
    assert penalty.item() == pytest.approx(weight * 6.75 / n, rel=1e-7)
    penalty.backward()
    for name, t in theta.items():
        torch.testing.assert_close(t.grad, 2 * weight * (t.detach() - start[name]) / n, rtol=1e-6, atol=0)


def test_l1_penalty_and_gradient_match_analytic_values():
    theta, start = _fixed_params()
    weight, n = 50.0, 9
    # absolute differences: 0.5, 0, 0.5, 1, 2, 0 | 1, 0.5, 0 -> sum 5.5
    penalty = norm_penalty(theta, start, p=1, weight=weight)
    assert penalty.item() == pytest.approx(weight * 5.5 / n, rel=1e-7)
    penalty.backward()
    for name, t in theta.items():
        expected = weight * torch.sign(t.detach() - start[name]) / n  # sign(0) = 0: no pull at the reference
        torch.testing.assert_close(t.grad, expected, rtol=1e-6, atol=0)


def test_norm_penalty_is_zero_at_the_reference_and_validates_p():
    theta, start = _fixed_params()
    assert norm_penalty(start, start, p=2, weight=1.0).item() == 0.0
    with pytest.raises(ValueError):
        norm_penalty(theta, start, p=3, weight=1.0)
    with pytest.raises(ValueError):
        NormRegularizer(p=0)
    with pytest.raises(ValueError):
        NormRegularizer(weight=-1.0)


# ---------------------------------------------------------------------------------------- SelFT


def test_topk_mask_is_one_global_topk_over_all_tensors():
    importance = {
        "b": torch.tensor([[0.1, 9.0], [0.3, 0.2]]),
        "a": torch.tensor([5.0, 0.0, 7.0, 0.4, 0.05, 0.6]),
    }
    mask = topk_mask(importance, 0.3)  # round(0.3 * 10) = 3 -> 9.0, 7.0, 5.0
    assert mask["a"].dtype == torch.bool and mask["a"].shape == (6,) and mask["b"].shape == (2, 2)
    assert mask["a"].tolist() == [True, False, True, False, False, False]
    assert mask["b"].tolist() == [[False, True], [False, False]]
    assert sum(int(m.sum()) for m in topk_mask(importance, 0.05).values()) == round(0.05 * 10)
    assert all(m.all() for m in topk_mask(importance, 1.0).values())
    assert not any(m.any() for m in topk_mask(importance, 0.0).values())


def test_topk_mask_breaks_ties_by_name_then_flat_index():
    importance = {"z": torch.ones(3), "a": torch.ones(2, 2)}
    mask = topk_mask(importance, 5 / 7)  # 5 of 7 equal values: all of "a" (first by name), then z[0]
    assert mask["a"].all()
    assert mask["z"].tolist() == [True, False, False]
    assert topk_mask(importance, 5 / 7)["z"].tolist() == mask["z"].tolist()  # deterministic


def test_topk_mask_rounds_k():
    importance = {"w": torch.arange(40.0)}
    for fraction in (0.05, 0.1, 0.33, 0.5):
        mask = topk_mask(importance, fraction)["w"]
        k = round(fraction * 40)
        assert int(mask.sum()) == k and mask[40 - k :].all()


# ---------------------------------------------------------------------------------------- merging


def _random_task_vectors(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"x.attn2.to_k.weight": (6, 5), "x.attn2.to_v.weight": (6, 5), "y.bias": (7,)}
    return [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("lam", [1.0, 1.75, 2.75])
def test_ties_is_the_peft_call_and_matches_the_formula(n, density, lam):
    tvs = _random_task_vectors(n, seed=n * 100 + int(density * 10))
    merged = ties_merge(tvs, density, lam)
    # peft weights each trimmed τ_i before the disjoint mean (the sign is elected on the unweighted
    # sum), so a scalar λ maps to weights = [λ] * n.
    weights = torch.full((n,), lam)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that density 1 prunes nothing
        expected = {k: peft_ties([tv[k] for tv in tvs], weights, density, majority_sign_method="total") for k in tvs[0]}
    assert merged.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=0, atol=1e-6)


def test_ties_on_a_hand_example():
    t1 = {"w": torch.tensor([1.0, -2.0, 0.5, 0.0])}
    t2 = {"w": torch.tensor([3.0, 1.0, -1.5, 0.0])}
    # sums 4, -1, -1, 0 -> elected +, -, -, + ; agreeing means 2, -2, -1.5 ; nothing nonzero agrees -> 0
    assert ties_merge([t1, t2], density=1.0, lam=2.0)["w"].tolist() == [4.0, -4.0, -3.0, 0.0]
    # density 0.5 keeps 2 of 4 per vector: t1 -> [1, -2, 0, 0], t2 -> [3, 0, -1.5, 0]
    assert ties_merge([t1, t2], density=0.5, lam=1.0)["w"].tolist() == [2.0, -2.0, -1.5, 0.0]


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("lam", [1.0, 2.5])
def test_merging_copies_of_one_vector_scales_it(n, lam):
    tau = _random_task_vectors(1, seed=7)[0]
    for method in ("ties", "uniform"):
        merged = merge_task_vectors([tau] * n, method, density=1.0, lam=lam)
        for k in tau:
            torch.testing.assert_close(merged[k], lam * tau[k], rtol=1e-6, atol=1e-7)
    # with trimming TIES returns the trimmed vector: a vector already that sparse comes back whole
    sparse = {k: prune(v, 0.5, method="magnitude") for k, v in tau.items()}
    for k, v in ties_merge([sparse] * n, density=0.5, lam=lam).items():
        torch.testing.assert_close(v, lam * sparse[k], rtol=1e-6, atol=1e-7)


def test_task_arithmetic_and_uniform_by_formula():
    tvs = _random_task_vectors(3, seed=3)
    ta = task_arithmetic(tvs, lam=1.5)
    un = uniform(tvs, lam=1.5)
    for k in tvs[0]:
        total = tvs[0][k] + tvs[1][k] + tvs[2][k]
        torch.testing.assert_close(ta[k], 1.5 * total, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(un[k], 1.5 * total / 3, rtol=1e-6, atol=1e-6)


def test_trim_keeps_peft_count_and_merge_keeps_dtype():
    tau = torch.tensor([0.1, -0.5, 0.3, 0.2, -0.05])
    assert ties_merge([{"w": tau}], 0.5, 1.0)["w"].tolist() == pytest.approx([0.0, -0.5, 0.3, 0.0, 0.0])  # 2 kept
    half = {"w": tau.to(torch.bfloat16)}
    assert ties_merge([half, half], 0.5, 1.0)["w"].dtype == torch.bfloat16
    with pytest.raises(ValueError):
        merge_task_vectors([{"w": tau}, {"v": tau}], "ties", 0.5, 1.0)
    with pytest.raises(ValueError):
        merge_task_vectors([{"w": tau}], "nope", 0.5, 1.0)


# ---------------------------------------------------------------------------------------- GradProj


def _well_conditioned_C(d=16, n=4, scale=10.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
    mix = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64)
    return scale * q @ mix  # columns of norm ~ scale, condition number ~ 2


def test_projector_annihilates_C_and_is_a_projection():
    C = _well_conditioned_C().float()
    P = projector(C)
    assert P.dtype == torch.float32 and P.shape == (16, 16)
    assert (P @ C).abs().max() <= 1e-5 * C.abs().max()
    torch.testing.assert_close(P @ P, P, rtol=0, atol=1e-5)
    torch.testing.assert_close(P, P.T, rtol=0, atol=1e-6)
    # a vector orthogonal to span(C) passes unchanged
    v = torch.randn(16, dtype=torch.float64)
    Cd = C.double()
    v = v - Cd @ torch.linalg.lstsq(Cd, v).solution
    torch.testing.assert_close(P.double() @ v, v, rtol=0, atol=1e-5)


def test_projector_residual_is_the_ridge_term_exactly():
    C = _well_conditioned_C(d=8, n=3, scale=0.5, seed=1)  # tr/n small -> r = 1e-4
    P = projector(C)
    r = max(1e-4, 1e-6 * (C.T @ C).trace().item() / 3)
    assert r == 1e-4
    expected = r * C @ torch.linalg.inv(C.T @ C + r * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(P @ C, expected, rtol=1e-6, atol=1e-12)
    big = _well_conditioned_C(d=8, n=3, scale=100.0, seed=1)  # tr/n large -> r scales with it
    r_big = 1e-6 * (big.T @ big).trace().item() / 3
    expected = r_big * big @ torch.linalg.inv(big.T @ big + r_big * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(projector(big) @ big, expected, rtol=1e-6, atol=1e-10)


def test_projector_handles_parallel_columns_and_empty_C():
    c = torch.randn(8, 1)
    C = torch.cat([c, c, 1.0001 * c], dim=1)  # CᵀC singular: the ridge keeps it finite
    P = projector(C)
    assert torch.isfinite(P).all()
    assert (P @ c).norm() <= 1e-3 * c.norm()
    assert torch.equal(projector(torch.zeros(5, 0)), torch.eye(5))


def _hand_embeddings():
    # target along e0; neighbours at decreasing cosine; "dup" is a near-copy of "near"
    e = torch.eye(4)
    table = {
        "target": e[0],
        "near": e[0] + 0.2 * e[1],  # cos 0.981
        "dup": e[0] + 0.25 * e[1],  # cos 0.970, cos(near, dup) > 0.99
        "mid": e[0] + 1.0 * e[2],  # cos 0.707
        "far": e[0] + 3.0 * e[3],  # cos 0.316
        "opposite": -e[0] + 0.1 * e[1],
    }
    names = ["far", "opposite", "mid", "dup", "near"]
    return table, names, torch.stack([table[n] for n in names])


def test_select_neighbours_topk_is_true_nearest_with_dedup():
    table, names, pool = _hand_embeddings()
    target = table["target"][None]
    assert select_neighbours(target, pool, names, k=2) == ["near", "mid"]  # "dup" dropped as a near-copy
    assert select_neighbours(target, pool, names, k=2, dedup=1.0) == ["near", "dup"]
    assert select_neighbours(target, pool, names, k=3, mode="all") == ["near", "mid", "far", "opposite"]
    assert select_neighbours(table["target"], pool, names, k=10) == ["near", "mid", "far", "opposite"]
    assert select_neighbours(target, pool[:0], [], k=3) == []


def test_select_neighbours_uses_max_similarity_over_targets():
    table, names, pool = _hand_embeddings()
    second = torch.tensor([0.0, 0.0, 0.0, 1.0])  # cos(far, e3) = 0.949 beats mid's 0.707 to the first
    targets = torch.stack([table["target"], second])
    assert select_neighbours(targets, pool, names, k=2) == ["near", "far"]
    assert select_neighbours(second[None], pool, names, k=1) == ["far"]


def test_candidate_pool_excludes_targets_and_keeps_erased(tmp_path: Path):
    vocab = {"style": ["A", "B", "C", "D"], "object": ["Dogs", "Cats"]}
    stage = Stage(1, [Request("B")], ["A", "Dogs"], vocab, "sequential", tmp_path)
    assert GradientProjection().candidate_pool(stage) == ["A", "C", "D"]  # "Dogs" is another domain's
    assert GradientProjection(pool=["C", "B", "Z"]).candidate_pool(stage) == ["C", "Z", "A", "Dogs"]


def test_only_cross_attention_key_value_weights_are_projected():
    assert is_projected("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    assert is_projected("mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight")
    assert not is_projected("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight")
    assert not is_projected("x.attn2.to_q.weight")
    assert not is_projected("x.attn2.to_k.bias")
    assert not is_projected("x.attn2.to_out.0.weight")
