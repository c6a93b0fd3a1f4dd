"""UnlearnCanvas metrics (UA, RA-I, RA-C) as pure functions of classifier predictions.

Input: one entry per generated image of the evaluation grid, with the style and object it was
*prompted* with ("A {object} image in {style} style.", any number of seeds) and the labels the
style and object classifiers *predicted*; all four as class indices into the vocabularies
(``styles`` / ``objects``, given by the caller: the classifiers' classes).

Definitions (those of the paper's evaluation code, ``Evaluation/UnlearnCanvas/evaluate.py`` in
CUIG, which follows UnlearnCanvas). A request's *domain* is the domain of the erased concepts:
for style requests the in-domain classifier is the style classifier and the cross-domain one the
object classifier; for object requests the reverse.

* **The image set.** Only images whose in-domain concept is in ``erased + retain`` and whose
  cross-domain concept is in ``cross_retain`` are used (for a style request: the grid
  (erased styles + retain styles) x cross-retain objects x seeds); any other image is ignored.
* **Per-concept accuracy** acc(c) = share of the images *prompted with* c (within that set) whose
  classifier label (in-domain classifier for in-domain concepts, cross-domain classifier for
  cross-domain concepts) is c.
* **UA** = mean over erased concepts e of (1 - acc(e)) = share of e's images NOT classified as e,
  averaged with equal weight per erased concept (all concepts erased so far).
* **RA-I** = mean over in-domain retain concepts r of acc(r) (in-domain classifier).
* **RA-C** = mean over cross-domain retain concepts k of acc(k) (cross-domain classifier), where
  acc(k) is measured on *all* images of k in the set, i.e. also on images prompted with an erased
  in-domain concept. For a style request: object accuracy on (erased + retain styles) x retain
  objects; for an object request: style accuracy on retain styles x (erased + retain objects).

Every value is a percentage (0-100), like UnlearnCanvas' summary. With a full, balanced grid
(same number of images per (style, object) pair) the per-concept mean equals plain (micro)
accuracy over the pooled images of those concepts; the per-concept mean is what is defined here
so a missing image changes only its own concept's weight. A concept that the metric needs but
that has no image in the set is an error (UnlearnCanvas silently scores it 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torchmetrics.functional.classification import multiclass_accuracy

Domain = Literal["style", "object"]


def _as_long(x: Sequence[int] | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).reshape(-1)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices")
    return t.long().cpu()


def _index(names: Sequence[str], vocab: Sequence[str], what: str) -> list[int]:
    unknown = [n for n in names if n not in vocab]
    if unknown:
        raise KeyError(f"unknown {what} {unknown}; known: {list(vocab)}")
    if len(set(names)) != len(names):
        raise ValueError(f"repeated {what} in {list(names)}")
    return [list(vocab).index(n) for n in names]


def per_concept_accuracy(true: torch.Tensor, pred: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(acc, support)``: for every class c, the share of images prompted with c that are predicted c
    (torchmetrics' per-class ``MulticlassAccuracy``, ``average=None``), and how many images c has.
    Classes without images get accuracy NaN."""
    true = _as_long(true, "true")
    pred = _as_long(pred, "pred")
    support = torch.bincount(true, minlength=num_classes)[:num_classes]
    if len(true) == 0:
        return torch.full((num_classes,), float("nan")), support
    acc = multiclass_accuracy(pred, true, num_classes=num_classes, average=None, validate_args=True).float()
    return torch.where(support > 0, acc, torch.full_like(acc, float("nan"))), support


def unlearncanvas_metrics(
    prompt_style: Sequence[int] | torch.Tensor,
    prompt_object: Sequence[int] | torch.Tensor,
    pred_style: Sequence[int] | torch.Tensor,
    pred_object: Sequence[int] | torch.Tensor,
    *,
    domain: Domain,
    erased: Sequence[str],
    retain: Sequence[str],
    cross_retain: Sequence[str],
    styles: Sequence[str],
    objects: Sequence[str],
) -> dict:
    """UA, RA-I and RA-C (percent) of one evaluation grid; see the module docstring for the definitions.

    Args:
        prompt_style, prompt_object: per image, the style / object index it was prompted with.
        pred_style, pred_object: per image, the style / object classifier's predicted index.
        domain: ``"style"`` or ``"object"``, the domain of the erased concepts.
        erased: every concept of ``domain`` erased so far (UA averages over them); may be empty
            (then UA is NaN), e.g. to score the base model.
        retain: in-domain retain concepts (must not overlap ``erased``).
        cross_retain: concepts of the other domain that must keep working.
        styles, objects: the vocabularies the indices refer to (the classifiers' classes).

    Returns:
        ``{"UA", "RA_I", "RA_C"}`` (floats, percent) plus ``"per_concept"``:
        ``{"unlearn": {c: 100 - acc}, "retain": {c: acc}, "cross_retain": {c: acc}}`` (percent)
        and ``"n_images"``, the number of images used.
    """
    if domain not in ("style", "object"):
        raise ValueError(f"domain must be 'style' or 'object', got {domain!r}")
    styles, objects = list(styles), list(objects)
    ps, po = _as_long(prompt_style, "prompt_style"), _as_long(prompt_object, "prompt_object")
    qs, qo = _as_long(pred_style, "pred_style"), _as_long(pred_object, "pred_object")
    if not (len(ps) == len(po) == len(qs) == len(qo)):
        raise ValueError("prompt_style, prompt_object, pred_style and pred_object must have the same length")

    if domain == "style":
        in_vocab, cross_vocab = styles, objects
        in_true, in_pred, cross_true, cross_pred = ps, qs, po, qo
    else:
        in_vocab, cross_vocab = objects, styles
        in_true, in_pred, cross_true, cross_pred = po, qo, ps, qs
    overlap = set(erased) & set(retain)
    if overlap:
        raise ValueError(f"concepts both erased and retained: {sorted(overlap)}")
    e_idx = _index(erased, in_vocab, f"{domain}s")
    r_idx = _index(retain, in_vocab, f"{domain}s")
    c_idx = _index(cross_retain, cross_vocab, "cross-domain concepts")
    for t, vocab, name in ((in_true, in_vocab, "in-domain"), (in_pred, in_vocab, "in-domain"),
                           (cross_true, cross_vocab, "cross-domain"), (cross_pred, cross_vocab, "cross-domain")):  # fmt: skip
        if len(t) and (t.min() < 0 or t.max() >= len(vocab)):
            raise ValueError(f"{name} index out of range 0..{len(vocab) - 1}")

    keep = torch.isin(in_true, torch.tensor(e_idx + r_idx, dtype=torch.long)) & torch.isin(
        cross_true, torch.tensor(c_idx, dtype=torch.long)
    )
    in_acc, in_n = per_concept_accuracy(in_true[keep], in_pred[keep], len(in_vocab))
    cross_acc, cross_n = per_concept_accuracy(cross_true[keep], cross_pred[keep], len(cross_vocab))

    def pick(acc: torch.Tensor, n: torch.Tensor, idx: list[int], vocab: list[str]) -> dict[str, float]:
        missing = [vocab[i] for i in idx if n[i] == 0]
        if missing:
            raise ValueError(f"no evaluation image for {missing}")
        return {vocab[i]: 100.0 * acc[i].item() for i in idx}

    unlearn = {c: 100.0 - a for c, a in pick(in_acc, in_n, e_idx, in_vocab).items()}
    retained = pick(in_acc, in_n, r_idx, in_vocab)
    cross = pick(cross_acc, cross_n, c_idx, cross_vocab)

    def mean(d: dict[str, float]) -> float:
        return sum(d.values()) / len(d) if d else float("nan")

    return {
        "UA": mean(unlearn),
        "RA_I": mean(retained),
        "RA_C": mean(cross),
        "per_concept": {"unlearn": unlearn, "retain": retained, "cross_retain": cross},
        "n_images": int(keep.sum()),
    }


def unlearn_accuracy(prompt: torch.Tensor, pred: torch.Tensor, erased_idx: Sequence[int], num_classes: int) -> float:
    """UA (percent) from in-domain labels alone: mean over erased classes of the share NOT predicted as it."""
    acc, n = per_concept_accuracy(prompt, pred, num_classes)
    if any(n[i] == 0 for i in erased_idx):
        raise ValueError("an erased concept has no image")
    return 100.0 - 100.0 * acc[list(erased_idx)].mean().item() if len(erased_idx) else float("nan")


def retain_accuracy(prompt: torch.Tensor, pred: torch.Tensor, retain_idx: Sequence[int], num_classes: int) -> float:
    """RA-I or RA-C (percent): mean over the given classes of the share predicted as themselves."""
    acc, n = per_concept_accuracy(prompt, pred, num_classes)
    if any(n[i] == 0 for i in retain_idx):
        raise ValueError("a retain concept has no image")
    return 100.0 * acc[list(retain_idx)].mean().item() if len(retain_idx) else float("nan")
