"""Pretrain the Canvas-mini base text-to-image model, and evaluate it on the full style x object grid.

A plain PyTorch loop (no Lightning): every step draws fresh Canvas-mini images
(:func:`canvas_mini.sample_batch`), noises them with the cosine DDPM schedule, and regresses the
v-prediction target with min-SNR-gamma weighting. AdamW, linear warm-up then cosine decay, gradient
clipping, EMA of the UNet, 10% empty-prompt dropout (for classifier-free guidance), bf16 autocast on
CPU. The MiniLM text states of the 192 captions and of ``""`` are computed once (the encoder is
frozen) with :meth:`DiffusionModel.encode_text`, exactly what sampling feeds the UNet.

Output (``out_dir``): ``unet/`` (EMA weights) + ``scheduler/``, plus ``checkpoints/step_XXXXXX/``
along the way and ``train_log.jsonl``. ``out_dir`` then loads with
``DiffusionModel.from_pretrained(assemble_model_folder(out_dir / "unet", out_dir / "model"))``.

Shell::

    python -m cuig_lightning.pretrain --out runs/canvas_mini_base --steps 1800
    python -m cuig_lightning.pretrain --eval-only cuig_lightning/assets/canvas_mini/model
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cuig_lightning.data import canvas_mini
from cuig_lightning.models import canvas_mini as cm

EVAL_SEEDS = (188, 288)


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.05):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def grid_accuracy(
    model,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    seeds=EVAL_SEEDS,
    steps: int = 20,
    guidance: float = 1.5,
    bf16: bool = True,
    batch_size: int = 192,
    classifiers: tuple | None = None,
    return_images: bool = False,
) -> dict:
    """Sample every (style, object) caption once per seed with ``model.sample`` and judge the images.

    ``cond``: the 192 caption states in :func:`cm.all_captions` order; ``uncond``: the ``""`` state.
    The noise of seed ``s`` for the whole grid is ``torch.randn`` from ``Generator().manual_seed(s)``
    (drawn ``batch_size`` captions at a time). With ``bf16`` the UNet runs under bf16 autocast.
    """
    from cuig_lightning.evaluation.classifiers import load_classifier, predict

    style_clf, object_clf = classifiers or (load_classifier("style"), load_classifier("object"))
    device = cond.device
    n_obj = len(canvas_mini.OBJECTS)
    style_idx = torch.arange(len(cond)) // n_obj
    object_idx = torch.arange(len(cond)) % n_obj
    was_training = model.unet.training
    model.unet.eval()
    t0 = time.perf_counter()
    images = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        for i in range(0, len(cond), batch_size):
            with _autocast(device, bf16):
                lat = model.sample(cond[i : i + batch_size], uncond, gen, steps=steps, guidance=guidance)
            images.append(model.decode(lat.float()).cpu())  # [0, 1]
    seconds = time.perf_counter() - t0
    model.unet.train(was_training)
    imgs = torch.cat(images) * 2 - 1  # classifiers take [-1, 1]
    s_true, o_true = style_idx.repeat(len(seeds)), object_idx.repeat(len(seeds))
    s_pred, o_pred = predict(style_clf, imgs), predict(object_clf, imgs)
    s_ok, o_ok = (s_pred == s_true).float(), (o_pred == o_true).float()
    per_style = {s: round(s_ok[s_true == i].mean().item(), 3) for i, s in enumerate(canvas_mini.STYLES)}
    per_object = {o: round(o_ok[o_true == i].mean().item(), 3) for i, o in enumerate(canvas_mini.OBJECTS)}
    out = {
        "style_acc": round(s_ok.mean().item(), 4),
        "object_acc": round(o_ok.mean().item(), 4),
        "n_images": len(imgs),
        "seeds": list(seeds),
        "ddim_steps": steps,
        "guidance": guidance,
        "bf16": bf16,
        "sample_seconds": round(seconds, 1),
        "per_style": per_style,
        "per_object": per_object,
    }
    if return_images:
        out["images"] = imgs
    return out


def evaluate_base(
    model_folder: str | Path | None = None,
    seeds=EVAL_SEEDS,
    steps: int = 20,
    guidance: float = 1.5,
    bf16: bool = True,
    device: str = "cpu",
    return_images: bool = False,
) -> dict:
    """Style / object accuracy of a Canvas-mini model on the full grid (24 styles x 8 objects x seeds).

    ``model_folder``: a ``DiffusionModel`` folder, or a folder holding just ``unet/`` + ``scheduler/``
    (e.g. the output of :func:`pretrain` or the shipped asset), or ``None`` for the shipped model.
    Text states come from the model's own ``encode_text``.
    """
    from cuig_lightning.models.diffusion import DiffusionModel

    if model_folder is None:
        folder = cm.canvas_mini_model_path()
    else:
        folder = Path(model_folder)
        if not (folder / "text_encoder").is_dir():
            folder = cm.assemble_model_folder(folder / "unet", folder / "model", folder / "scheduler")
    model = DiffusionModel.from_pretrained(folder).to(device)
    cond = torch.cat([model.encode_text(cm.all_captions()[i : i + 64]) for i in range(0, 192, 64)])
    uncond = model.encode_text([""])
    out = grid_accuracy(model, cond, uncond, seeds=seeds, steps=steps, guidance=guidance, bf16=bf16,
                        return_images=return_images)  # fmt: skip
    out["model"] = str(folder)
    return out


def _bare_model(unet, scheduler):
    """A DiffusionModel around a UNet with no text side (states are precomputed during training)."""
    from types import SimpleNamespace

    from cuig_lightning.models.diffusion import DiffusionModel

    return DiffusionModel(unet, None, SimpleNamespace(model_max_length=77), scheduler)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def pretrain(
    out_dir: str | Path,
    steps: int = 1800,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    ema_decay: float = 0.999,
    cond_dropout: float = 0.1,
    warmup: int = 200,
    weight_decay: float = 0.01,
    snr_gamma: float = 5.0,
    grad_clip: float = 1.0,
    bf16: bool = True,
    checkpoint_every: int = 500,
    eval_every: int = 0,
    eval_seeds=(188,),
    eval_steps: int = 20,
    eval_guidance: float = 1.5,
    half: bool = True,
    device: str = "cpu",
    num_threads: int | None = None,
    text_states: tuple[torch.Tensor, torch.Tensor] | None = None,
    unet_overrides: dict | None = None,
    progress: bool = True,
    adaptive_threads: bool = True,
) -> dict:
    """Train the Canvas-mini UNet from scratch; save the EMA UNet (+ scheduler) to ``out_dir``.

    Returns a report (settings, wall time, last loss, mid-run evaluations). ``eval_every > 0``
    samples the grid with the EMA weights every that many steps (``eval_seeds``, bf16, DDIM
    ``eval_steps``, guidance ``eval_guidance``). ``half`` stores fp16 weights.
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    dev = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    gen = torch.Generator().manual_seed(seed + 1)

    cond_all, uncond = text_states if text_states is not None else cm.caption_embeddings()
    cond_all, uncond = cond_all.to(dev), uncond.to(dev)
    unet = cm.build_unet(seed=seed, **(unet_overrides or {})).to(dev).train()
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    scheduler = cm.build_scheduler()
    alphas = scheduler.alphas_cumprod.to(dev)
    snr = alphas / (1 - alphas)
    # v-prediction: min-SNR-gamma weight on the v-MSE is min(snr, gamma) / (snr + 1)
    v_weight = torch.clamp(snr, max=snr_gamma) / (snr + 1) if snr_gamma > 0 else torch.ones_like(snr)

    params = [p for p in unet.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr,
        betas=(0.9, 0.99),
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, steps))
    ema_params = list(ema.parameters())
    n_params = sum(p.numel() for p in unet.parameters())
    settings = dict(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, ema_decay=ema_decay, cond_dropout=cond_dropout,
        warmup=warmup, weight_decay=weight_decay, snr_gamma=snr_gamma, grad_clip=grad_clip, bf16=bf16,
        device=str(dev), torch_threads=torch.get_num_threads(), unet_params=n_params,
        unet_overrides=unet_overrides or {},
    )  # fmt: skip
    (out / "pretrain_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    log = open(out / "train_log.jsonl", "a")
    evals = []
    t0 = time.perf_counter()
    loss_avg = None

    def evaluate(step: int) -> None:
        res = grid_accuracy(_bare_model(ema, scheduler), cond_all, uncond, seeds=eval_seeds, steps=eval_steps,
                            guidance=eval_guidance, bf16=bf16)  # fmt: skip
        rec = {"step": step, "minutes": round((time.perf_counter() - t0) / 60, 2),
               **{k: res[k] for k in ("style_acc", "object_acc", "sample_seconds")}}  # fmt: skip
        evals.append(rec)
        log.write(json.dumps({"eval": rec}) + "\n")
        log.flush()
        tqdm.write(f"eval step {step}: style {rec['style_acc']:.3f} object {rec['object_acc']:.3f}")

    max_threads = torch.get_num_threads()
    adaptive = adaptive_threads and dev.type == "cpu" and max_threads > 1
    probe: dict = {}
    bar = tqdm(range(steps), desc="pretrain canvas-mini", disable=not progress, dynamic_ncols=True, mininterval=5)
    for step in bar:
        if adaptive:  # every 100 steps, time 3 steps with the other thread count; keep the faster
            phase = step % 100
            now = time.perf_counter()
            if probe.get("last") is not None and phase != 1:  # the first step after a switch warms the pool
                n = torch.get_num_threads()
                probe[n] = 0.7 * probe[n] + 0.3 * (now - probe["last"]) if n in probe else now - probe["last"]
            probe["last"] = now
            best = min((1, max_threads), key=lambda n: probe.get(n, 0.0))
            torch.set_num_threads(({1: max_threads, max_threads: 1}[best]) if phase < 3 else best)
        images, s_idx, o_idx = canvas_mini.sample_batch(batch_size, rng)
        x0 = canvas_mini.to_tensor(images).to(dev)
        idx = torch.from_numpy(s_idx * len(canvas_mini.OBJECTS) + o_idx).to(dev)
        states = cond_all[idx]
        drop = (torch.rand(batch_size, generator=gen) < cond_dropout).to(dev)
        states = torch.where(drop[:, None, None], uncond.expand_as(states), states)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen).to(dev)
        xt = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        with _autocast(dev, bf16):
            pred = unet(xt, t, encoder_hidden_states=states).sample
        per = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per * v_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - d)
        lv = loss.item()
        loss_avg = lv if loss_avg is None else 0.98 * loss_avg + 0.02 * lv
        done = step + 1
        if done % 50 == 0 or done == steps:
            bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}", thr=torch.get_num_threads())
            log.write(json.dumps({"step": done, "loss": round(loss_avg, 5), "lr": sched.get_last_lr()[0],
                                  "minutes": round((time.perf_counter() - t0) / 60, 2)}) + "\n")  # fmt: skip
            log.flush()
        if checkpoint_every and done % checkpoint_every == 0 and done < steps:
            cm.save_unet(ema, scheduler, out / "checkpoints" / f"step_{done:06d}", half=half)
        if eval_every and done % eval_every == 0 and done < steps:
            torch.set_num_threads(max_threads)
            evaluate(done)
            probe["last"] = None
    train_seconds = time.perf_counter() - t0
    torch.set_num_threads(max_threads)
    cm.save_unet(ema, scheduler, out, half=half)
    report = {"settings": settings, "train_seconds": round(train_seconds, 1), "final_loss": loss_avg, "evals": evals}
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.close()
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Pretrain / evaluate the Canvas-mini base model.")
    p.add_argument("--out", type=Path, default=Path("runs/canvas_mini_base"))
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--cond-dropout", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--snr-gamma", type=float, default=5.0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--fp32-weights", action="store_true", help="store float32 weights (default fp16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-seeds", type=int, nargs="+", default=list(EVAL_SEEDS))
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.5])
    p.add_argument("--eval-only", type=Path, default=None, help="evaluate this model folder; no training")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.eval_only is None:
        t0 = time.perf_counter()
        report = pretrain(
            a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, ema_decay=a.ema_decay,
            cond_dropout=a.cond_dropout, warmup=a.warmup, snr_gamma=a.snr_gamma, bf16=not a.no_bf16,
            checkpoint_every=a.checkpoint_every, eval_every=a.eval_every, half=not a.fp32_weights,
            device=a.device, num_threads=a.threads,
        )  # fmt: skip
        print(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=2))
        print(f"training wall time: {(time.perf_counter() - t0) / 60:.1f} min")
    folder = a.eval_only or a.out
    for g in a.guidance:
        res = evaluate_base(folder, seeds=a.eval_seeds, steps=a.eval_steps, guidance=g, bf16=not a.no_bf16,
                            device=a.device)  # fmt: skip
        print(json.dumps(res, indent=2))
        print(f"guidance {g}: style {res['style_acc']:.3f} object {res['object_acc']:.3f} "
              f"({res['n_images']} images, DDIM {a.eval_steps}, sampling {res['sample_seconds']} s)")  # fmt: skip


if __name__ == "__main__":
    main()
