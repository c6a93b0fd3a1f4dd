"""GradProj's math: the projector P that removes the span of the protected text vectors C, its rank check,
and the building of C's columns (neighbour choice, near-duplicate removal, names embedded alone). Pure
functions of tensors (and, for :func:`bare_name_embeddings`, of a diffusion model's text side); the callback
that applies them to the gradients is :class:`callbacks.gradient_projection.GradientProjection`.

What the paper's code does (github.com/justinhylee135/CUIG, read for this; no code copied):
``Regularizers/Projection/src/auxiliary_embeddings.py`` (earlier ``ContinualEnhancements/Projection/
gradient_projection.py``) makes one column per prompt: the prompt is padded to 77 tokens and encoded without
an attention mask (CLIP's own causal mask, the states the UNet sees); after a prefix "an image in the style
of" / "an image of a" / "an image of" the column is the mean of the following tokens' states, otherwise the
state of the last token before EOS. EOS and padding states never enter C. Near-duplicates are removed
greedily in prompt order (a column is kept when its cosine with every kept one is < 0.95). Which prompts
(``UnlearningMethods/ConAbl/src/utils.py``, ``setup_regularizers``): for styles the request's ConAbl anchor
prompts, ``anchor_prompts/style/Laion.txt`` (200 LAION painting captions, none with those prefixes, so
each column is its last token's state); for objects (``--auxiliary_prompts_path`` in
``BashScripts/Sequential/Object/Projection``) 200 LLM-written prompts (``Regularizers/Projection/src/
prompt_generation.py``: half "An image in the style of {style}", half "An image of a {object}", current
targets excluded) plus "An image of a {object}" for every object erased before. Its projector has the same
ridge (pseudo-inverse when ill-conditioned) and no rank check. Here every caption takes the last-token rule
(the prefix rule serves its template prompts), and the default object set is style-less.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cuig_lightning.requests import concept_text


def ridge(gram: Tensor) -> float:
    """The projector's ridge r = max(1e-4, 1e-6 · tr(CᵀC)/n) from the Gram matrix CᵀC (n × n, n ≥ 1)."""
    return max(1e-4, 1e-6 * gram.trace().item() / gram.shape[0])


def projector(C: Tensor) -> Tensor:
    """P = I − C (CᵀC + rI)⁻¹ Cᵀ for C of shape (d, n), r = :func:`ridge`.

    P removes the span of C's columns (up to the ridge r, which keeps near-parallel concept
    embeddings from blowing up the inverse): P C = r C (CᵀC + rI)⁻¹. Computed in float64, returned in
    C's dtype. An empty C (n = 0) gives the identity.
    """
    d, n = C.shape
    if n == 0:
        return torch.eye(d, dtype=C.dtype, device=C.device)
    c = C.to(torch.float64)
    gram = c.T @ c
    r = ridge(gram)
    inner = torch.linalg.solve(gram + r * torch.eye(n, dtype=c.dtype, device=c.device), c.T)
    return (torch.eye(d, dtype=c.dtype, device=c.device) - c @ inner).to(C.dtype)


def projection_rank(C: Tensor) -> int:
    """The numerical rank of C at the projector's ridge: how many singular values σ of C have σ² > r. P scales
    the direction of a singular value σ by r / (σ² + r), so these are the directions P removes (by more than
    half); rank d means P ≈ 0."""
    if C.shape[1] == 0:
        return 0
    c = C.to(torch.float64)
    return int((torch.linalg.svdvals(c) ** 2 > ridge(c.T @ c)).sum())


def check_rank(C: Tensor, width: int) -> int:
    """:func:`projection_rank` of C, or a ValueError when it reaches the text ``width``: P ≈ 0 would freeze
    every attn2.to_k/to_v weight."""
    rank = projection_rank(C)
    if rank >= width:
        raise ValueError(f"GradProj: C ({C.shape[1]} columns) has rank {rank}, the whole text width {width}: "
                         "P ≈ 0 would freeze every attn2.to_k/to_v weight. Protect fewer or less varied texts "
                         "(fewer captions, a lower dedup) or use source: names")
    return rank


def dedup_indices(vectors: Tensor, threshold: float = 0.95) -> list[int]:
    """Greedy near-duplicate removal in the given order: row i of ``vectors`` (n, d) is kept unless its cosine
    with an already kept row exceeds ``threshold``. Returns the kept rows' indices."""
    unit = F.normalize(vectors.double(), dim=-1)
    kept: list[int] = []
    for i in range(unit.shape[0]):
        if not kept or float((unit[kept] @ unit[i]).max()) <= threshold:
            kept.append(i)
    return kept


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
    similarity = (F.normalize(pool_emb.double(), dim=-1) @ targets.T).max(dim=1).values
    order = torch.sort(similarity, descending=True, stable=True).indices.tolist()
    kept = [order[j] for j in dedup_indices(pool_emb[order], dedup)]
    return [names[i] for i in (kept[:k] if mode == "topk" else kept)]


@torch.no_grad()
def bare_name_embeddings(diffusion, names: list[str]) -> Tensor:
    """One vector per concept name, ``(len(names), d)``: the text is the name alone (``Van_Gogh`` -> "Van Gogh",
    no prompt template), encoded by ``diffusion.encode_text``; the vector is the mean of the states of the
    name's own tokens (after BOS/CLS, before EOS/SEP)."""
    texts = [concept_text(n) for n in names]
    start = len(diffusion.tokenizer("").input_ids) - 1  # the special tokens before the text (BOS / CLS)
    states = diffusion.encode_text(texts)
    widths = [len(diffusion.tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    return torch.stack([states[i, start : start + w].mean(0) for i, w in enumerate(widths)])


def is_projected(name: str) -> bool:
    """Cross-attention key/value weights: the maps from text embeddings that GradProj constrains."""
    return ("attn2.to_k" in name or "attn2.to_v" in name) and name.endswith("weight")


def captions_digest(captions: list[str]) -> str:
    """sha256 of a caption list (order included): what a resumed stage must match."""
    return hashlib.sha256("\n".join(captions).encode()).hexdigest()
