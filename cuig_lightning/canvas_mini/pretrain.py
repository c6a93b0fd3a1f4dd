"""Pretrain the Canvas-mini base text-to-image model, and score a model on the full style x object grid.

A plain PyTorch loop (no Lightning): every step draws fresh Canvas-mini images
(:func:`world.sample_batch`, a ``neutral_share`` of them with the style-less caption and the neutral
look, a ``category_share`` of them a category's look captioned with the category), noises them with the
cosine DDPM schedule, and regresses the v-prediction target with min-SNR-gamma weighting (diffusers'
``compute_snr``). AdamW with diffusers' warm-up + cosine schedule, gradient clipping, an ``EMAModel`` of
the UNet, ``cond_dropout`` empty prompts (for classifier-free guidance), bf16 autocast on CPU. The text
states of every caption and of ``""`` are computed once (the encoder is frozen) with
:meth:`DiffusionModel.encode_text`, exactly what sampling feeds the UNet.

Output (``out_dir``): ``unet/`` (EMA weights) + ``scheduler/``, ``checkpoints/step_XXXXXX/`` along
the way, ``train_log.jsonl`` and ``pretrain_report.json``.

Resumable: with every checkpoint (and at the end) the full training state (raw and EMA weights, AdamW
moments, learning-rate schedule, both random generators, running loss, step, seconds so far) goes to
``out_dir/state/`` as safetensors + a JSON manifest (:func:`save_training_state`); calling
:func:`pretrain` again with the same settings continues from there, bit for bit as if never stopped.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from cuig_lightning.canvas_mini import model as cm
from cuig_lightning.canvas_mini import world
from cuig_lightning.canvas_mini.paths import assemble_model_folder, canvas_mini_model_path
from cuig_lightning.checkpoints import CheckpointError, load_tensors, read_manifest, save_tensors, write_manifest
from cuig_lightning.evaluation.protocol import Evaluation
from cuig_lightning.models.diffusion import DiffusionModel

EVAL_SEEDS = (188, 288)
STATE = "state"
STATE_TENSORS = "training_state.safetensors"
#: Settings that may differ between the parts of a resumed pretraining (they do not change what is computed).
FREE_SETTINGS = ("torch_threads", "device")


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def evaluate_base(model_folder: str | Path | None = None, seeds=EVAL_SEEDS, steps: int = 20, guidance: float = 1.5,
                  device: str = "cpu") -> dict:  # fmt: skip
    """Style / object accuracy of a Canvas-mini model over the full grid (:meth:`Evaluation.base_accuracy`).

    ``model_folder``: a full model folder, one holding just ``unet/`` + ``scheduler/`` (a pretraining
    output), or ``None`` for the shipped model.
    """
    if model_folder is None:
        folder = canvas_mini_model_path()
    else:
        folder = Path(model_folder)
        if not (folder / "text_encoder").is_dir():
            folder = assemble_model_folder(folder / "unet", folder / "model", folder / "scheduler")
    model = DiffusionModel.from_pretrained(folder).to(device)
    evaluation = Evaluation(seeds=list(seeds), steps=steps, guidance=guidance, batch_size=len(world.OBJECTS) * 8)
    return {"model": str(folder), "seeds": list(seeds), "steps": steps, "guidance": guidance,
            **evaluation.base_accuracy(model)}  # fmt: skip


def save_training_state(out: Path, step: int, seconds: float, loss_avg: float, settings: dict, unet, ema, opt,
                        lr_schedule, rng: np.random.Generator, gen: torch.Generator) -> None:  # fmt: skip
    """Write everything :func:`pretrain` needs to continue after ``step`` to ``out/state/``.

    Built in ``state.tmp/`` (manifest last) and swapped in by renames, so a kill at any moment leaves a
    complete state, old or new (:func:`load_training_state` finishes a swap cut between its renames).
    """
    tmp, old, final = out / f"{STATE}.tmp", out / f"{STATE}.old", out / STATE
    shutil.rmtree(tmp, ignore_errors=True)
    opt_state = opt.state_dict()
    tensors = {f"unet.{k}": v.float() for k, v in unet.state_dict().items()}
    tensors |= {f"ema.{i}": p for i, p in enumerate(ema.shadow_params)}
    tensors |= {f"opt.{i}.{k}": v for i, state in opt_state["state"].items() for k, v in state.items()}
    tensors |= {"rng.torch_gen": gen.get_state(), "rng.torch_global": torch.get_rng_state()}
    save_tensors(tensors, tmp / STATE_TENSORS)
    write_manifest(tmp, [STATE_TENSORS], step=step, train_seconds=seconds, loss_avg=loss_avg, settings=settings,
                   ema={k: v for k, v in ema.state_dict().items() if k != "shadow_params"},
                   param_groups=opt_state["param_groups"], lr_schedule=lr_schedule.state_dict(),
                   numpy_rng=rng.bit_generator.state)  # fmt: skip
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_training_state(out: Path, settings: dict, unet, ema, opt, lr_schedule, rng: np.random.Generator,
                        gen: torch.Generator) -> tuple[int, float, float] | None:  # fmt: skip
    """Restore the state saved by :func:`save_training_state` into the given objects; ``(step, seconds,
    loss_avg)``, or ``None`` without a saved state. A state of other settings is a ``ValueError``; a
    corrupt or unfitting one a :class:`CheckpointError` naming its folder."""
    final, old = out / STATE, out / f"{STATE}.old"
    if not final.exists() and old.is_dir():
        old.rename(final)  # a save was cut between its two renames: the old state is complete
    if not final.exists():
        return None
    manifest = read_manifest(final, required=(STATE_TENSORS,))
    saved, current = manifest.get("settings") or {}, json.loads(json.dumps(settings))  # tuples -> lists, as saved
    differing = sorted(k for k in saved.keys() | current.keys()
                       if k not in FREE_SETTINGS and saved.get(k) != current.get(k))  # fmt: skip
    if differing:
        raise ValueError(f"{final} holds a pretraining with other settings ({', '.join(differing)}); "
                         f"use another out_dir, or pass the same settings to continue it")  # fmt: skip
    tensors = load_tensors(final / STATE_TENSORS)
    try:
        unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        device = next(unet.parameters()).device
        shadow = [tensors[f"ema.{i}"].to(device) for i in range(len(ema.shadow_params))]
        ema.load_state_dict({**manifest["ema"], "shadow_params": shadow})
        opt_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, index, name = key.split(".", 2)
                opt_state.setdefault(int(index), {})[name] = value
        groups = [{**g, "betas": tuple(g["betas"])} for g in manifest["param_groups"]]
        opt.load_state_dict({"state": opt_state, "param_groups": groups})
        lr_schedule.load_state_dict(manifest["lr_schedule"])
        rng.bit_generator.state = manifest["numpy_rng"]
        gen.set_state(tensors["rng.torch_gen"])
        torch.set_rng_state(tensors["rng.torch_global"])
        return int(manifest["step"]), float(manifest["train_seconds"]), manifest["loss_avg"]
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        message = " ".join(str(err).split())
        raise CheckpointError(f"training state {final} does not fit this pretraining: {message}") from None


def pretrain(
    out_dir: str | Path = "runs/canvas_mini_base",
    steps: int = 4000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    ema_decay: float = 0.999,
    cond_dropout: float = 0.1,
    neutral_share: float = 0.15,
    category_share: float = 0.15,
    warmup: int = 200,
    weight_decay: float = 0.01,
    snr_gamma: float = 5.0,
    grad_clip: float = 1.0,
    bf16: bool = True,
    checkpoint_every: int = 600,
    half: bool = True,
    device: str = "cpu",
    progress: bool = True,
    unet_overrides: dict | None = None,
    resume: bool = True,
    stop_after: int | None = None,
) -> dict:
    """Train the Canvas-mini UNet from scratch; save the EMA UNet (+ scheduler) to ``out_dir``.

    Args:
        out_dir: output folder (``unet/``, ``scheduler/``, checkpoints, logs, report).
        steps: optimizer steps.
        batch_size: fresh drawings per step.
        lr: AdamW peak learning rate (linear warm-up over ``warmup`` steps, then cosine to 0).
        seed: seeds the drawings, noise, timesteps and the UNet's initialisation.
        ema_decay: EMA decay of the saved weights.
        cond_dropout: share of captions replaced by ``""`` (classifier-free guidance).
        neutral_share: share of drawings with the neutral look and the style-less caption.
        category_share: share of drawings showing a category's look, captioned with the category (object anchors).
        warmup: learning-rate warm-up steps.
        weight_decay: AdamW weight decay (matrices only).
        snr_gamma: min-SNR-gamma loss weight (0: plain v-MSE).
        grad_clip: gradient-norm clipping (0: none).
        bf16: bfloat16 autocast for the UNet.
        checkpoint_every: steps between EMA checkpoints under ``out_dir/checkpoints`` (0: none).
        half: store fp16 weights (the shipped asset is fp16).
        device: torch device.
        progress: show a progress bar.
        unet_overrides: entries replacing :data:`cm.UNET_CONFIG` (e.g. smaller test models).
        resume: continue from ``out_dir/state/`` when there is one (its settings must equal these,
            except ``device`` and the thread count); ``False`` starts afresh and later overwrites it.
        stop_after: save the state after this step and return (for tests and for splitting a long
            pretraining across sessions); calling again with the same settings continues.
    """
    dev = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    gen = torch.Generator().manual_seed(seed + 1)

    cond_all, uncond = (t.to(dev) for t in cm.caption_embeddings())
    unet = cm.build_unet(seed=seed, **(unet_overrides or {})).to(dev).train()
    ema = EMAModel(unet.parameters(), decay=ema_decay, foreach=True)
    scheduler = cm.build_scheduler()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99),
    )  # fmt: skip
    lr_schedule = get_scheduler("cosine", opt, num_warmup_steps=warmup, num_training_steps=steps)
    settings = dict(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, ema_decay=ema_decay, cond_dropout=cond_dropout,
        neutral_share=neutral_share, category_share=category_share, warmup=warmup, weight_decay=weight_decay,
        snr_gamma=snr_gamma, grad_clip=grad_clip, bf16=bf16, device=str(dev), torch_threads=torch.get_num_threads(),
        unet_params=sum(p.numel() for p in unet.parameters()), unet_overrides=unet_overrides or {},
    )  # fmt: skip
    start, seconds_before, loss_before = 0, 0.0, None
    resumed = load_training_state(out, settings, unet, ema, opt, lr_schedule, rng, gen) if resume else None
    if resumed:
        start, seconds_before, loss_before = resumed
        if start >= steps and (out / "unet").is_dir() and (out / "pretrain_report.json").is_file():
            print(f"pretraining in {out} is already complete ({steps} steps); nothing to do")
            return json.loads((out / "pretrain_report.json").read_text())
        print(f"resuming the pretraining in {out} after step {start} of {steps}")
    (out / "pretrain_config.json").write_text(json.dumps(settings, indent=2) + "\n")

    def save(folder: Path) -> None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
        cm.save_unet(unet, scheduler, folder, half=half)
        ema.restore(unet.parameters())

    n_glyphs = len(world.GLYPHS)
    t0, loss_avg = time.perf_counter(), None
    with open(out / "train_log.jsonl", "a") as log:
        if resumed:  # carry on the clock and the running loss of the earlier parts
            t0, loss_avg = t0 - seconds_before, loss_before
            log.write(json.dumps({"resumed_after": start}) + "\n")
        bar = tqdm(range(start, steps), initial=start, total=steps, desc="pretrain canvas-mini", disable=not progress,
                   dynamic_ncols=True, mininterval=5)  # fmt: skip
        for step in bar:
            images, s_idx, o_idx = world.sample_batch(batch_size, rng, neutral_share=neutral_share,
                                                     category_share=category_share)
            x0 = world.to_tensor(images).to(dev)
            states = cond_all[torch.from_numpy(s_idx * n_glyphs + o_idx).to(dev)]
            drop = (torch.rand(batch_size, generator=gen) < cond_dropout).to(dev)
            states = torch.where(drop[:, None, None], uncond.expand_as(states), states)
            noise = torch.randn(x0.shape, generator=gen).to(dev)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen).to(dev)
            with _autocast(dev, bf16):
                pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=states).sample
            per = (pred.float() - scheduler.get_velocity(x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
            snr = compute_snr(scheduler, t)
            # min-SNR-gamma for v-prediction: weight min(snr, gamma) / (snr + 1)
            weight = snr.clamp(max=snr_gamma) / (snr + 1) if snr_gamma > 0 else torch.ones_like(snr)
            loss = (per * weight).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            lr_schedule.step()
            ema.step(unet.parameters())
            loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
            done = step + 1
            if done % 50 == 0 or done == steps:
                minutes = round((time.perf_counter() - t0) / 60, 2)
                bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr_schedule.get_last_lr()[0]:.2e}")
                log.write(json.dumps({"step": done, "loss": round(loss_avg, 5), "minutes": minutes}) + "\n")
                log.flush()
            checkpoint = bool(checkpoint_every) and done % checkpoint_every == 0 and done < steps
            if checkpoint:
                save(out / "checkpoints" / f"step_{done:06d}")
            if checkpoint or (done == stop_after and done < steps):
                seconds = time.perf_counter() - t0
                save_training_state(out, done, seconds, loss_avg, settings, unet, ema, opt, lr_schedule, rng, gen)
                if done == stop_after:
                    print(f"stopped after step {done} of {steps}; run the same command again to continue")
                    return {"settings": settings, "stopped_after": done, "train_seconds": round(seconds, 1),
                            "loss": loss_avg}  # fmt: skip
    train_seconds = time.perf_counter() - t0
    save(out)
    save_training_state(out, steps, train_seconds, loss_avg, settings, unet, ema, opt, lr_schedule, rng, gen)
    report = {"settings": settings, "train_seconds": round(train_seconds, 1), "final_loss": loss_avg}
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"pretrained {steps} steps in {train_seconds / 60:.1f} min (final loss {loss_avg:.4f}) -> {out}; "
          f"score it with `cuig evaluate-base --model_folder {out}`")
    return report
