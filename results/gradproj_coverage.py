"""Investigation: how much of what cross-attention actually sees does GradProj protect?

GradProj keeps W·c fixed for the pooled, context-free embedding c of each protected style. The UNet
sees the contextual token states of whole prompts. Residual = the part of a state outside the
protected span (1 = unprotected). Pure text-encoder arithmetic, no training:

    python results/gradproj_coverage.py > results/gradproj_coverage.txt
"""
import torch, torch.nn.functional as F
from callbacks.gradient_projection import projector, select_neighbours
from cuig_lightning.models.diffusion import DiffusionModel
from cuig_lightning.data import canvas_mini as cm
m = DiffusionModel.from_pretrained("canvas-mini")
styles = cm.STYLES
with torch.no_grad():
    pooled = m.concept_embeddings(styles)
    res_pool, res_prompt, res_all = [], [], []
    for target in cm.SEQ12_STYLES[:6]:
        pool_names = [s for s in styles if s != target]
        pool = pooled[[styles.index(s) for s in pool_names]]
        kept = select_neighbours(pooled[styles.index(target)], pool, pool_names, k=5)
        P = projector(pooled[[styles.index(s) for s in kept]].T)
        for s in kept:
            # the style tokens' states inside an evaluation prompt, and every token state of that prompt
            prompt = cm.caption(s, "Circle")
            tok = m.tokenizer([prompt], return_tensors="pt")
            h = m.text_encoder(**tok).last_hidden_state[0]
            ids = tok.input_ids[0].tolist()
            words = m.tokenizer(cm.concept_text(s), add_special_tokens=False).input_ids
            start = next(i for i in range(len(ids)) if ids[i:i + len(words)] == words)
            hs = h[start:start + len(words)]
            c = pooled[styles.index(s)]
            res_pool.append(float((P @ c).norm() / c.norm()))
            res_prompt.append(float(((hs @ P.T).norm(dim=1) / hs.norm(dim=1)).mean()))
            res_all.append(float(((h @ P.T).norm(dim=1) / h.norm(dim=1)).mean()))
mean = lambda v: sum(v) / len(v)
print(f"residual |P x|/|x| after projection, mean over protected styles of 6 requests (K=5):")
print(f"  the protected pooled embedding itself : {mean(res_pool):.4f}")
print(f"  its tokens inside an evaluation prompt: {mean(res_prompt):.3f}")
print(f"  every token of that prompt            : {mean(res_all):.3f}")
