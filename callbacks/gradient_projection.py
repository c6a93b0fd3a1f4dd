"""GradProj: keep the cross-attention keys and values of protected text fixed while unlearning a target.

C (d × n) holds the protected text vectors. Every attn2.to_k / attn2.to_v weight gradient G becomes G P
with P = I − C (CᵀC + rI)⁻¹ Cᵀ, so an SGD update ΔW satisfies ΔW c ≈ 0 for every column c: W·c (the key or
value of that text) barely moves. ``source`` decides what C holds:

* ``names`` (the default, and the paper's text): the K concept names of the request's domain most
  cosine-similar to the target (``mode: topk``) or all of them (``mode: all``), each embedded as the states
  of its own tokens inside a prompt, averaged (``pl_module.concept_embeddings``).
* ``bare_names`` (an ablation, issue 14): the same concepts, chosen the same way (similarity of the in-prompt
  embeddings), but each column is the name embedded alone: the text is the name without a prompt around it,
  and the column the states of its tokens, averaged (:func:`bare_name_embeddings`). Only the vectors differ
  from ``names``, and they are states the evaluation prompts never produce (none starts with the name; the
  text encoder is causal).
* ``captions`` (the paper's code, used for its tables): one column per prompt, by the paper's rule
  (``pl_module.caption_embeddings``: after "an image ... of" the mean of the following tokens' states,
  otherwise the state of the last content token, trailing punctuation skipped). The prompts: ``captions``
  (a list or a text file; SD-1.5: e.g. the paper's ``Laion.txt``), else ``caption_set: anchors`` (the
  default, the paper's code): a style request's own anchor prompts (ConAbl's anchor captions,
  ``pl_module.anchor_prompts``), an object request's generated set, "An image in the style of {style}" for
  every style of the vocabulary and "An image of a {object}" for every object but the current targets (those
  erased before included); or ``caption_set: generic``: :func:`cuig_lightning.data.captions.generic_captions`
  over the vocabulary's objects (~200 style-less captions on Canvas-mini; an object request adds a caption
  for every object erased before). Prompts naming a current target are dropped.

cuig before issue 33 is ``caption_set: generic, caption_token: last``: the token before EOS whatever it is, a
period for captions ending in "." — a state that never occurs inside a training prompt.

Whatever the source, near-duplicate columns (cosine > ``dedup``) are dropped, and C must not span the text
width: with rank(C) = d, P ≈ 0 would freeze to_k / to_v, so that raises. The column count and rank are printed
and recorded (``gradient_projection.json``).

The math (P, its rank, the columns of C, and how the paper's code builds C) is in :mod:`callbacks.projection`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from callbacks.base import Regularizer
from callbacks.projection import (bare_name_embeddings, captions_digest, check_rank, dedup_indices, is_projected,
                                  projection_rank, projector, ridge, select_neighbours)
from cuig_lightning.data.captions import generic_captions, names_concept, read_captions
from cuig_lightning.models.diffusion import ColumnToken
from cuig_lightning.requests import caption, concept_text

__all__ = ["GRADIENT_PROJECTION_JSON", "GradientProjection", "bare_name_embeddings", "captions_digest", "check_rank",
           "dedup_indices", "is_projected", "projection_rank", "projector", "ridge", "select_neighbours"]

GRADIENT_PROJECTION_JSON = "gradient_projection.json"
SOURCES = ("names", "bare_names", "captions")


class GradientProjection(Regularizer):
    """Projects every attn2.to_k / attn2.to_v weight gradient onto the orthogonal complement of the
    protected text vectors C, so W·c (hence their keys and values) barely moves (see the module docstring).

    Exact for plain SGD; optimizers that rescale the gradient elementwise (Adam, AdamW) break the
    orthogonality. C is made once per stage, P broadcast from rank 0 (:attr:`C` shows it); the checkpoint keeps
    the chosen neighbours (``names``, ``bare_names``) or the caption set's sha256 (``captions``: a resume with
    other captions is refused).

    Args:
        k: ``names`` / ``bare_names``, ``mode: topk``: how many neighbours.
        pool: ``names`` / ``bare_names``: candidate concepts (default: the domain's vocabulary); the targets
            are removed, the concepts erased before added.
        mode: ``names`` / ``bare_names``: ``topk`` or ``all`` (the whole deduplicated pool).
        source: ``names`` (C from concept names inside a prompt), ``bare_names`` (the same concepts, each
            name embedded alone) or ``captions`` (C from prompts; the paper's code).
        captions: ``captions``: the prompt list, or a text file with one per line; default: ``caption_set``.
        dedup: a column whose cosine with an already kept one exceeds this is dropped (the paper's 0.95).
        caption_set: ``captions`` without ``captions``: ``anchors`` (the paper's code: the request's anchor
            prompts; for objects the paper's generated prompts) or ``generic`` (cuig before issue 33).
        caption_token: ``captions``: a caption's column is its last content token's state (``content``, the
            paper's code) or its last token's before EOS (``last``, cuig before issue 33).
    """

    def __init__(self, k: int = 5, pool: list[str] | None = None, mode: Literal["topk", "all"] = "topk",
                 source: Literal["names", "bare_names", "captions"] = "names", captions: list[str] | str | None = None,
                 dedup: float = 0.95, caption_set: Literal["anchors", "generic"] = "anchors",
                 caption_token: ColumnToken = "content") -> None:
        if mode not in ("topk", "all"):
            raise ValueError(f"unknown GradientProjection mode {mode!r}; use topk or all")
        if k < 1:
            raise ValueError(f"GradientProjection k must be >= 1, got {k}")
        if source not in SOURCES:
            raise ValueError(f"unknown GradientProjection source {source!r}; use {', '.join(SOURCES)}")
        if caption_set not in ("anchors", "generic"):
            raise ValueError(f"unknown GradientProjection caption_set {caption_set!r}; use anchors or generic")
        if caption_token not in ("content", "last"):
            raise ValueError(f"unknown GradientProjection caption_token {caption_token!r}; use content or last")
        if not 0.0 < dedup <= 1.0:
            raise ValueError(f"GradientProjection dedup must be in (0, 1], got {dedup}")
        if source != "captions" and captions is not None:
            raise ValueError("GradientProjection captions need source: captions")
        if source == "captions" and pool is not None:
            raise ValueError("GradientProjection pool is a list of concept names, for source: names or bare_names")
        if isinstance(captions, str) and not Path(captions).expanduser().is_file():
            raise ValueError(f"GradientProjection captions file {captions} not found")
        if isinstance(captions, list) and (not captions or not all(isinstance(c, str) and c.strip() for c in captions)):
            raise ValueError("GradientProjection captions must be a non-empty list of non-empty strings")
        self.k, self.mode, self.source, self.dedup = k, mode, source, dedup
        self.caption_set, self.caption_token = caption_set, caption_token
        self.pool = list(pool) if pool is not None else None
        self.captions = list(captions) if isinstance(captions, list) else captions
        self.neighbours: list[str] | None = None  # names, bare_names: the protected concepts
        self.captions_sha256: str | None = None  # captions: the caption set C was built from
        self._C: Tensor | None = None  # (d, n) float64, CPU; None: nothing protected
        self._P: Tensor | None = None  # float64, CPU
        self._P_cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._report: str | None = None  # the line printed once the stage's progress bar exists

    @property
    def C(self) -> Tensor | None:
        """This stage's protected text vectors as columns, ``(d, n)`` float64 on the CPU, near-duplicates
        dropped: what P keeps fixed. None before ``on_train_start`` and when nothing is protected."""
        return self._C

    # -- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        self.neighbours, self.captions_sha256, self._report = None, None, None
        self._C, self._P, self._P_cache = None, None, {}

    def stage_state(self) -> dict[str, Any] | None:
        if self.source == "captions":
            return None if self.captions_sha256 is None else {"captions_sha256": self.captions_sha256}
        return None if self.neighbours is None else {"neighbours": list(self.neighbours)}

    def load_stage_state(self, state: dict[str, Any]) -> None:
        key = "captions_sha256" if self.source == "captions" else "neighbours"
        if key not in state:
            raise ValueError(f"GradientProjection(source={self.source}) cannot resume this checkpoint: it was "
                             f"saved by another source (state keys {sorted(state)})")
        if self.source == "captions":
            self.captions_sha256 = state["captions_sha256"]
        else:
            self.neighbours = list(state["neighbours"])

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.source == "captions" and not callable(getattr(pl_module, "caption_embeddings", None)):
            raise TypeError(f"GradientProjection(source={self.source}) needs {type(pl_module).__name__}."
                            "caption_embeddings(captions, token) -> (n, d)")
        if (self._uses_anchors(getattr(pl_module, "stage", None))
                and not callable(getattr(pl_module, "anchor_prompts", None))):
            raise TypeError(f"GradientProjection(caption_set=anchors) needs {type(pl_module).__name__}."
                            "anchor_prompts() -> the stage's anchor prompts")
        diffusion = getattr(pl_module, "diffusion", None)
        if self.source == "bare_names" and not callable(getattr(diffusion, "encode_text", None)):
            raise TypeError(f"GradientProjection(source=bare_names) needs {type(pl_module).__name__}.diffusion "
                            "(encode_text and tokenizer) to embed names alone")

    # -- hooks -------------------------------------------------------------------------------
    def candidate_pool(self, stage) -> list[str]:
        """The given pool or the domain vocabulary, minus the current targets, with earlier targets
        kept (and added to an explicit pool that lacks them)."""
        pool = list(self.pool) if self.pool is not None else list(stage.vocabulary.get(stage.domain, []))
        if self.pool is not None:
            pool += [c for c in stage.erased_before if c not in pool]
        targets = set(stage.targets)
        return list(dict.fromkeys(c for c in pool if c not in targets))

    def prompts_for(self, stage, anchor_prompts: list[str] | None = None) -> list[str]:
        """The prompts C is made from, in order, repeats once.

        ``caption_set: anchors`` without ``captions``: a style stage's ``anchor_prompts`` (those naming a
        current target dropped); an object stage's "An image in the style of {style}" for every style of the
        vocabulary, then "An image of a {object}" for every object but the current targets. Otherwise the
        given list or file, or :func:`generic_captions` over the vocabulary's objects; those naming a current
        target dropped; for an object stage, "A {object} image." added for every object erased before."""
        if self.captions is None and self.caption_set == "anchors":
            return self._anchor_set(stage, anchor_prompts)
        if self.captions is None:
            objects = stage.vocabulary.get("object") or []
            if not objects:
                raise ValueError("GradientProjection(source=captions) writes its default captions from the "
                                 "vocabulary's objects, and this vocabulary has none: give captions (list or file)")
            captions = generic_captions(objects)
        elif isinstance(self.captions, str):
            captions = read_captions(self.captions)
        else:
            captions = list(self.captions)
        captions = [c for c in captions if not any(names_concept(c, t) for t in stage.targets)]
        if stage.domain == "object":
            objects = set(stage.vocabulary.get("object") or [])
            captions += [caption(None, o) for o in stage.erased_before if o in objects]
        captions = list(dict.fromkeys(captions))
        if not captions:
            raise ValueError(f"GradientProjection: no caption left once those naming {stage.targets} are dropped")
        return captions

    def _uses_anchors(self, stage) -> bool:
        """Whether C comes from the stage's anchor prompts (a style stage under ``caption_set: anchors``)."""
        return (self.source == "captions" and self.captions is None and self.caption_set == "anchors"
                and getattr(stage, "domain", "style") != "object")

    @staticmethod
    def _anchor_set(stage, anchor_prompts: list[str] | None) -> list[str]:
        if stage.domain == "object":
            styles, objects = stage.vocabulary.get("style") or [], stage.vocabulary.get("object") or []
            if not objects:
                raise ValueError("GradientProjection(caption_set=anchors) writes an object request's prompts from the "
                                 "vocabulary's styles and objects, and this vocabulary has no objects")
            prompts = ([f"An image in the style of {concept_text(s)}" for s in styles]
                       + [f"An image of a {concept_text(o)}" for o in objects if o not in stage.targets])
        else:
            prompts = [p for p in anchor_prompts or [] if not any(names_concept(p, t) for t in stage.targets)]
        prompts = list(dict.fromkeys(prompts))
        if not prompts:
            raise ValueError(f"GradientProjection(caption_set=anchors): no anchor prompt left for {stage.targets} "
                             "(none given, or all of them name a target)")
        return prompts

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            if self.source == "captions":
                C, record, protected = self._caption_matrix(pl_module)
            else:
                C, record, protected = self._names_matrix(trainer, pl_module)
        d = self._check_dims(pl_module, C)
        rank = check_rank(C, d) if C is not None else 0
        self._C = C
        P = projector(C) if C is not None else torch.eye(d, dtype=torch.float64)
        self._P = trainer.strategy.broadcast(P.cpu(), src=0)  # identical P on every rank
        self._P_cache = {}
        columns = 0 if C is None else C.shape[1]
        self._report = f"GradProj: protecting {protected}; C has {columns} columns, rank {rank} of width {d}"
        record.update(columns=columns, rank=rank, width=d)
        self.record(trainer, pl_module, GRADIENT_PROJECTION_JSON, record)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        # Printed here, not in on_train_start: a progress bar drops what is printed before it has drawn its bar.
        if self._report:
            pl_module.print(self._report)
            self._report = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        for name, p in pl_module.trainable.items():
            if p.grad is not None and is_projected(name):
                P = self._projector_like(p.grad)
                p.grad.copy_(p.grad.to(P.dtype) @ P)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._P_cache = {}

    # -- helpers -----------------------------------------------------------------------------
    def _names_matrix(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Tensor | None, dict, str]:
        """C from the neighbours (chosen on rank 0, or restored), the record, and what it protects in words."""
        similarities = None
        if not self.check_stage(pl_module, "neighbours were"):
            chosen, similarities = self._choose(pl_module)
            self.neighbours = trainer.strategy.broadcast(chosen, src=0)
        C = None
        if self.neighbours and self.source == "bare_names":
            C = bare_name_embeddings(pl_module.diffusion, self.neighbours).to("cpu", torch.float64).T
        elif self.neighbours:
            C = self._embed(pl_module, self.neighbours).T
        record = {"source": self.source, "mode": self.mode, "k": self.k, "targets": pl_module.stage.targets,
                  "neighbours": self.neighbours}
        if similarities is not None:
            record["similarity"] = similarities
        return C, record, f"{len(self.neighbours)} concepts: {', '.join(self.neighbours) or '-'}"

    def _caption_matrix(self, pl_module: pl.LightningModule) -> tuple[Tensor, dict, str]:
        """C from the caption set (the same on every rank), the record, and what it protects in words."""
        stage = pl_module.stage
        anchors = pl_module.anchor_prompts() if self._uses_anchors(stage) else None
        captions = self.prompts_for(stage, anchors)
        digest = captions_digest(captions)
        if self.check_stage(pl_module, "captions were") and digest != self.captions_sha256:
            raise ValueError("GradientProjection: the checkpoint was made with another caption set "
                             f"(sha256 {self.captions_sha256[:12]}, now {digest[:12]}); refusing to resume")
        self.captions_sha256 = digest
        vectors = pl_module.caption_embeddings(list(captions), self.caption_token)
        if vectors.ndim != 2 or vectors.shape[0] != len(captions):
            raise ValueError(f"caption_embeddings must return ({len(captions)}, d), got {tuple(vectors.shape)}")
        vectors = vectors.detach().to("cpu", torch.float64)
        kept = dedup_indices(vectors, self.dedup)
        record = {"source": self.source, "caption_set": "given" if self.captions is not None else self.caption_set,
                  "caption_token": self.caption_token, "dedup": self.dedup,
                  "targets": stage.targets, "captions": len(captions),
                  "captions_sha256": digest, "kept": [captions[i] for i in kept]}
        return vectors[kept].T, record, f"{len(kept)} of {len(captions)} captions (near-duplicates dropped)"

    def _choose(self, pl_module: pl.LightningModule) -> tuple[list[str], dict[str, float]]:
        stage = pl_module.stage
        pool = self.candidate_pool(stage)
        if not pool:
            return [], {}
        target_emb = self._embed(pl_module, stage.targets)
        pool_emb = self._embed(pl_module, pool)
        chosen = select_neighbours(target_emb, pool_emb, pool, self.k, self.mode, self.dedup)
        cos = F.normalize(pool_emb.double(), dim=-1) @ F.normalize(target_emb.double(), dim=-1).T
        best = dict(zip(pool, cos.max(dim=1).values.tolist()))
        return chosen, {c: round(best[c], 6) for c in chosen}

    @staticmethod
    def _embed(pl_module: pl.LightningModule, names: list[str]) -> Tensor:
        emb = pl_module.concept_embeddings(list(names))
        if emb.ndim != 2 or emb.shape[0] != len(names):
            raise ValueError(f"concept_embeddings must return ({len(names)}, d), got {tuple(emb.shape)}")
        return emb.detach().to("cpu", torch.float64)

    @staticmethod
    def _check_dims(pl_module: pl.LightningModule, C: Tensor | None) -> int:
        projected = {n: p for n, p in pl_module.trainable.items() if is_projected(n)}
        if not projected:
            raise ValueError("GradientProjection found no trainable attn2.to_k / attn2.to_v weight to project")
        dims = {p.shape[-1] for p in projected.values()}
        d = C.shape[0] if C is not None else next(iter(dims))
        if dims != {d}:
            raise ValueError(f"attn2.to_k/to_v in_features {sorted(dims)} do not match the embedding size {d}")
        return d

    def _projector_like(self, grad: Tensor) -> Tensor:
        """P on the gradient's device, in at least float32 (half-precision gradients are projected in float32)."""
        dtype = torch.promote_types(grad.dtype, torch.float32)
        key = (grad.device, dtype)
        if key not in self._P_cache:
            self._P_cache[key] = self._P.to(device=grad.device, dtype=dtype)
        return self._P_cache[key]
