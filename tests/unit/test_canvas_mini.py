"""The UnlearnCanvas metrics and the Canvas-mini classifiers (the world itself: test_canvas_mini_world.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from cuig_lightning.canvas_mini import classifiers as clf
from cuig_lightning.canvas_mini import world as cm
from cuig_lightning.evaluation.metrics import per_concept_accuracy, retain_accuracy, unlearn_accuracy, unlearncanvas_metrics

# ---------------------------------------------------------------------------------------- metrics

S, O = ["A", "B", "C"], ["x", "y"]
# (prompt style, prompt object, predicted style, predicted object)
GRID = [
    ("A", "x", "A", "x"),
    ("A", "y", "B", "y"),
    ("A", "x", "C", "y"),
    ("A", "y", "C", "x"),
    ("B", "x", "B", "x"),
    ("B", "y", "B", "x"),
    ("B", "x", "A", "x"),
    ("C", "x", "C", "y"),  # style C is neither erased nor retained: ignored
    ("C", "y", "C", "y"),
]


def _grid():
    ps, po, qs, qo = zip(*GRID)
    return [S.index(v) for v in ps], [O.index(v) for v in po], [S.index(v) for v in qs], [O.index(v) for v in qo]


def _metrics(domain, erased, retain, cross):
    return unlearncanvas_metrics(
        *_grid(), domain=domain, erased=erased, retain=retain, cross_retain=cross, styles=S, objects=O
    )


def test_metrics_style_request_hand_computed():
    m = _metrics("style", ["A"], ["B"], ["x", "y"])
    assert m["n_images"] == 7
    assert m["UA"] == pytest.approx(75.0)  # A: 1 of 4 images still classified A
    assert m["RA_I"] == pytest.approx(200 / 3)  # B: 2 of 3
    assert m["RA_C"] == pytest.approx((75.0 + 100 / 3) / 2)  # x: 3/4, y: 1/3 (erased-style images count)
    assert m["per_concept"]["cross_retain"] == pytest.approx({"x": 75.0, "y": 100 / 3})

    m = _metrics("style", ["A"], ["B"], ["x"])  # only x images are in the grid
    assert (m["UA"], m["RA_I"], m["RA_C"], m["n_images"]) == pytest.approx((50.0, 50.0, 75.0, 4))


def test_metrics_object_request_hand_computed():
    m = _metrics("object", ["x"], ["y"], ["A", "B"])
    assert m["n_images"] == 7
    assert m["UA"] == pytest.approx(25.0)  # x: 3 of 4 still x
    assert m["RA_I"] == pytest.approx(100 / 3)  # y: 1 of 3
    assert m["RA_C"] == pytest.approx((25.0 + 200 / 3) / 2)  # style A: 1/4, B: 2/3

    m = _metrics("object", ["x"], ["y"], ["B"])
    assert (m["UA"], m["RA_I"], m["RA_C"], m["n_images"]) == pytest.approx((0.0, 0.0, 200 / 3, 3))


def test_metrics_several_erased_is_mean_over_concepts():
    # erased A (1/4 kept -> 75) and B (2/3 kept -> 33.3): UA is their mean, not the pooled share
    m = _metrics("style", ["A", "B"], [], ["x", "y"])
    assert m["UA"] == pytest.approx((75.0 + 100 / 3) / 2)
    assert math.isnan(m["RA_I"])


def test_metrics_balanced_grid_matches_micro_accuracy():
    g = torch.Generator().manual_seed(0)
    ns, no, seeds = len(cm.STYLE_CLASSES), len(cm.OBJECTS), 3
    ps = torch.arange(ns).repeat_interleave(no * seeds)
    po = torch.arange(no).repeat_interleave(seeds).repeat(ns)
    qs = torch.where(torch.rand(len(ps), generator=g) < 0.7, ps, torch.randint(0, ns, ps.shape, generator=g))
    qo = torch.where(torch.rand(len(po), generator=g) < 0.6, po, torch.randint(0, no, po.shape, generator=g))
    erased, retain_styles = cm.STYLES[:4], cm.STYLES[10:22]
    m = unlearncanvas_metrics(ps, po, qs, qo, domain="style", erased=erased, retain=retain_styles, cross_retain=cm.OBJECTS,
                              styles=cm.STYLE_CLASSES, objects=cm.OBJECTS)
    micro = MulticlassAccuracy(num_classes=ns, average="micro")
    r = torch.isin(ps, torch.tensor([cm.STYLES.index(s) for s in retain_styles]))
    assert m["RA_I"] == pytest.approx(100 * micro(qs[r], ps[r]).item(), abs=1e-4)
    kept = r | torch.isin(ps, torch.tensor([cm.STYLES.index(s) for s in erased]))
    assert m["RA_C"] == pytest.approx(100 * MulticlassAccuracy(no, average="micro")(qo[kept], po[kept]).item(), abs=1e-4)
    e_idx = [cm.STYLES.index(s) for s in erased]
    assert m["UA"] == pytest.approx(unlearn_accuracy(ps, qs, e_idx, ns), abs=1e-4)
    assert m["RA_I"] == pytest.approx(retain_accuracy(ps[kept], qs[kept], [cm.STYLES.index(s) for s in retain_styles], ns), abs=1e-4)
    acc, n = per_concept_accuracy(ps, qs, ns)
    manual = torch.stack([(qs[ps == c] == c).float().mean() for c in range(ns)])
    assert torch.allclose(acc, manual) and (n == no * seeds).all()


def test_metrics_reject_bad_requests():
    with pytest.raises(ValueError, match="both erased and retained"):
        _metrics("style", ["A"], ["A"], ["x"])
    with pytest.raises(KeyError):
        _metrics("style", ["x"], ["B"], ["x"])
    ps, po, qs, qo = _grid()
    with pytest.raises(ValueError, match="no evaluation image"):  # no image is prompted with C
        unlearncanvas_metrics(ps[:7], po[:7], qs[:7], qo[:7], domain="style", erased=["C"], retain=["B"],
                              cross_retain=["x"], styles=S, objects=O)  # fmt: skip


# ------------------------------------------------------------------------------------ classifiers


def test_classifier_training_smoke_and_exact_roundtrip(tmp_path):
    model, report = clf.train_classifier(
        "object", steps=3, batch_size=16, eval_per_class=1, out_dir=tmp_path, half=False, progress=False
    )
    assert sum(p.numel() for p in model.parameters()) < 500_000
    assert 0.0 <= report["held_out"]["acc_clean"] <= 1.0
    loaded = clf.load_classifier("object", tmp_path)
    assert loaded.classes == cm.GLYPHS  # the 20 objects and the 5 category looks
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k
    x = cm.to_tensor(cm.make_dataset(1, seed=1)[0][:64])
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    # fp16 storage: loading gives exactly the fp16-rounded weights, and saving again is lossless
    clf.save_classifier(model, tmp_path / "h", "object", half=True)
    h = clf.load_classifier("object", tmp_path / "h")
    for k, v in h.state_dict().items():
        want = ref[k].half().float() if ref[k].is_floating_point() else ref[k]
        assert torch.equal(v, want), k
    clf.save_classifier(h, tmp_path / "h2", "object", half=True)
    h2 = clf.load_classifier("object", tmp_path / "h2")
    assert all(torch.equal(a, b) for a, b in zip(h.state_dict().values(), h2.state_dict().values()))


def test_augment_keeps_range_and_is_seeded():
    x = cm.to_tensor(cm.make_dataset(1, seed=2)[0][:32])
    a = clf.augment(x, torch.Generator().manual_seed(0))
    b = clf.augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1 and not torch.equal(a, x)


@pytest.mark.parametrize("kind", ["style", "object"])
def test_shipped_classifiers_are_accurate(kind):
    model = clf.load_classifier(kind)
    assert model.classes == clf.class_names(kind)
    assert clf.held_out_accuracy(model, kind, n_per_class=2, seed=123) >= 0.98
    assert clf.held_out_accuracy(model, kind, n_per_class=2, seed=124, noise_std=0.1) >= 0.98
