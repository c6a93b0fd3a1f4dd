"""GradProj: keep the cross-attention key/value maps of nearby concepts fixed while unlearning a target."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from callbacks.base import Regularizer

GRADIENT_PROJECTION_JSON = "gradient_projection.json"


def projector(C: Tensor) -> Tensor:
    """P = I − C (CᵀC + rI)⁻¹ Cᵀ for C of shape (d, n), r = max(1e-4, 1e-6 · tr(CᵀC)/n).

    P removes the span of C's columns (up to the ridge r, which keeps near-parallel concept
    embeddings from blowing up the inverse): P C = r C (CᵀC + rI)⁻¹. Computed in float64, returned in
    C's dtype. An empty C (n = 0) gives the identity.
    """
    d, n = C.shape
    if n == 0:
        return torch.eye(d, dtype=C.dtype, device=C.device)
    c = C.to(torch.float64)
    gram = c.T @ c
    r = max(1e-4, 1e-6 * gram.trace().item() / n)
    inner = torch.linalg.solve(gram + r * torch.eye(n, dtype=c.dtype, device=c.device), c.T)
    return (torch.eye(d, dtype=c.dtype, device=c.device) - c @ inner).to(C.dtype)


def select_neighbours(
    target_emb: Tensor,
    pool_emb: Tensor,
    names: list[str],
    k: int,
    mode: Literal["topk", "all"] = "topk",
    dedup: float = 0.95,
) -> list[str]:
    """Pool concepts ordered by cosine similarity to the target(s) (max over several targets), most
    similar first; a concept whose cosine with an already kept one exceeds ``dedup`` is dropped.
    ``topk`` stops at ``k`` kept concepts, ``all`` keeps the whole deduplicated pool."""
    if mode not in ("topk", "all"):
        raise ValueError(f"unknown neighbour mode {mode!r}; use topk or all")
    if pool_emb.shape[0] != len(names):
        raise ValueError(f"{len(names)} names for {pool_emb.shape[0]} pool embeddings")
    if not names:
        return []
    targets = F.normalize(target_emb.reshape(-1, target_emb.shape[-1]).double(), dim=-1)
    pool = F.normalize(pool_emb.double(), dim=-1)
    similarity = (pool @ targets.T).max(dim=1).values
    order = torch.sort(similarity, descending=True, stable=True).indices.tolist()
    kept: list[int] = []
    for i in order:
        if mode == "topk" and len(kept) >= k:
            break
        if all(float(pool[i] @ pool[j]) <= dedup for j in kept):
            kept.append(i)
    return [names[i] for i in kept]


def is_projected(name: str) -> bool:
    """Cross-attention key/value weights: the maps from text embeddings that GradProj constrains."""
    return ("attn2.to_k" in name or "attn2.to_v" in name) and name.endswith("weight")


class GradientProjection(Regularizer):
    """Projects every attn2.to_k / attn2.to_v weight gradient onto the orthogonal complement of the
    protected concepts' text embeddings, so W·c (hence their keys and values) barely moves.

    Exact for plain SGD; optimizers that rescale the gradient elementwise (Adam, AdamW) break the
    orthogonality. The neighbours are chosen once per stage, broadcast from rank 0 and checkpointed.
    """

    def __init__(self, k: int = 5, pool: list[str] | None = None, mode: Literal["topk", "all"] = "topk") -> None:
        if mode not in ("topk", "all"):
            raise ValueError(f"unknown GradientProjection mode {mode!r}; use topk or all")
        if k < 1:
            raise ValueError(f"GradientProjection k must be >= 1, got {k}")
        self.k = k
        self.pool = list(pool) if pool is not None else None
        self.mode = mode
        self.neighbours: list[str] | None = None
        self._P: Tensor | None = None  # float64, CPU
        self._P_cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    # -- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        self.neighbours, self._P, self._P_cache = None, None, {}

    def stage_state(self) -> dict[str, Any] | None:
        return None if self.neighbours is None else {"neighbours": list(self.neighbours)}

    def load_stage_state(self, state: dict[str, Any]) -> None:
        self.neighbours = list(state["neighbours"])

    # -- hooks -------------------------------------------------------------------------------
    def candidate_pool(self, stage) -> list[str]:
        """The given pool or the domain vocabulary, minus the current targets, with earlier targets
        kept (and added to an explicit pool that lacks them)."""
        pool = list(self.pool) if self.pool is not None else list(stage.vocabulary.get(stage.domain, []))
        if self.pool is not None:
            pool += [c for c in stage.erased_before if c not in pool]
        targets = set(stage.targets)
        return list(dict.fromkeys(c for c in pool if c not in targets))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = pl_module.stage
        with torch.no_grad():
            similarities = None
            if not self.check_stage(pl_module, "neighbours were"):
                chosen, similarities = self._choose(pl_module)
                self.neighbours = trainer.strategy.broadcast(chosen, src=0)
            C = self._embed(pl_module, self.neighbours).T if self.neighbours else None
        d = self._check_dims(pl_module, C)
        P = projector(C) if C is not None else torch.eye(d, dtype=torch.float64)
        self._P = trainer.strategy.broadcast(P.cpu(), src=0)  # identical P on every rank
        self._P_cache = {}
        pl_module.print(f"GradProj: protecting {len(self.neighbours)} concepts: {', '.join(self.neighbours) or '-'}")
        record = {"mode": self.mode, "k": self.k, "targets": stage.targets, "neighbours": self.neighbours}
        if similarities is not None:
            record["similarity"] = similarities
        self.record(trainer, pl_module, GRADIENT_PROJECTION_JSON, record)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        for name, p in pl_module.trainable.items():
            if p.grad is not None and is_projected(name):
                P = self._projector_like(p.grad)
                p.grad.copy_(p.grad.to(P.dtype) @ P)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._P_cache = {}

    # -- helpers -----------------------------------------------------------------------------
    def _choose(self, pl_module: pl.LightningModule) -> tuple[list[str], dict[str, float]]:
        stage = pl_module.stage
        pool = self.candidate_pool(stage)
        if not pool:
            return [], {}
        target_emb = self._embed(pl_module, stage.targets)
        pool_emb = self._embed(pl_module, pool)
        chosen = select_neighbours(target_emb, pool_emb, pool, self.k, self.mode)
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
