"""``cuig speed``: how fast cuig trains and samples, measured through its own module, data module and Trainer.

Parts with random weights are built from configs (nothing is downloaded) and written as a diffusers folder
in a temporary directory, which :class:`~cuig_lightning.module.UnlearningModule` loads as a user's model:

* ``size: sd15``: the Stable Diffusion 1.5 UNet, CLIP ViT-L/14 text encoder and VAE configs (random weights);
* ``size: tiny``: :func:`~cuig_lightning.models.tiny_sd.build_tiny_sd` (what the tests use; fast on a CPU).

Both use the offline character-level CLIP tokenizer that ``build_tiny_sd`` writes (SD's BPE vocabulary would
need a download): token counts per prompt differ from SD's, every prompt is padded to 77 tokens all the same.

Measured, one function each:

* **ConAbl training step** (:func:`measure_step`): a real ``lightning.Trainer`` fit of the module on the real
  data module, with anchor generation replaced by random anchor latents (:class:`SyntheticAnchors`; the
  prompt embeddings are the text encoder's). The step is timed by :class:`StepTimer` from
  ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, clipping, optimizer, callbacks,
  logging; the batch is already on the device), over ``steps`` steps after ``warmup``. FLOPs per step
  (:func:`step_flops`): ``FlopCounterMode`` around one forward + backward of the module's loss at batch 1,
  times the batch (a UNet's FLOPs are linear in the batch), counted with the classic attention processor so
  attention counts on every device (PyTorch has no FLOP formula for the CPU SDPA kernel).
  MFU = FLOPs per step / step time / the device's dense bf16 peak (:data:`PEAK_BF16_FLOPS`).
* **Regularizer overhead** (:func:`measure_regularizers`): the same fit with ``GradientProjection`` and with the
  L2 ``NormRegularizer``, as a percentage of the plain step.
* **CFG sampling** (:func:`measure_sampling`): ``Evaluation.generate`` (cuig's batched CFG sampler, DDIM or a solver,
  VAE decode included), images per second at each batch size.
* **The peer** (:func:`measure_peer`): diffusers' ``StableDiffusionPipeline`` from the same parts, one image a
  call (UnlearnCanvas' protocol), the same sampler, steps and guidance; ``output_type="pt"`` (no PIL conversion).
* **Variants** (:data:`VARIANTS`): fp32 vs bf16-mixed, SDPA vs the classic attention processor,
  channels_last, ``torch.compile`` of the UNet.

The issue's targets (H100/H200, SD-1.5 size) are judged only where they can be: elsewhere they read n/a.

The report is rewritten after every measured row (marked partial until the last), so a run stopped by a time limit
keeps what it measured; a measurement that runs out of GPU memory is a row that says so, and the run goes on.

This module runs them (:func:`run_speed`, the ``cuig speed`` command); the settings, variants, model and data are in
:mod:`cuig_lightning.speed_setup`, the measurements in :mod:`cuig_lightning.speed_measure`, the targets and the report
in :mod:`cuig_lightning.speed_report` (their public names are importable from here too).
"""

from __future__ import annotations

import copy
import gc
import resource
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from cuig_lightning.methods import ConAbl
from cuig_lightning.models.diffusion import Sampler
from cuig_lightning.module import UnlearningModule
from cuig_lightning.speed_measure import (StepTimer, fit, measure_peer, measure_regularizers, measure_sampling,
                                          measure_step, quiet, say, step_flops, timed)
from cuig_lightning.speed_report import (PEAK_BF16_FLOPS, TARGET_BATCH, TARGET_MFU, TARGET_OVERHEAD, TARGET_PEER_RATIO,
                                         add_targets, peak_bf16_flops, render, write_report)
from cuig_lightning.speed_setup import (DEFAULTS, PROMPTS, STYLES, VARIANTS, Group, Size, SpeedSettings, SyntheticAnchors,
                                        Variant, VariantName, make_stage, write_model)
from cuig_lightning.versions import library_versions

__all__ = ["PEAK_BF16_FLOPS", "TARGET_BATCH", "TARGET_MFU", "TARGET_OVERHEAD", "TARGET_PEER_RATIO", "VARIANTS",
           "SpeedSettings", "StepTimer", "SyntheticAnchors", "Variant", "add_targets", "check", "fit", "measure_peer",
           "measure_regularizers", "measure_sampling", "measure_step", "render", "run_speed", "speed", "step_flops",
           "timed", "write_model", "write_report"]


def run_speed(settings: SpeedSettings, on_row: Callable[[dict], None] | None = None) -> dict:
    """Every measurement of ``settings``; the result as written to ``speed.json`` (None = n/a). ``on_row`` gets the
    result so far (finished as :func:`finish` does, marked partial) after every measured row."""
    device = settings.torch_device
    device_name, peak = peak_bf16_flops(device)
    result = {"meta": {"device_name": device_name, "peak_bf16_flops": peak, "reference": settings.reference.name,
                       "versions": library_versions(),
                       "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "settings": asdict(settings)},
              "train": [], "regularizers": [], "sampling": [], "peer": None}

    def measured() -> None:
        if on_row is not None:
            partial = copy.deepcopy(result)
            partial["meta"]["partial"] = True
            on_row(finish(partial, settings))

    variants = [VARIANTS[n] for n in settings.variants]
    with tempfile.TemporaryDirectory(prefix="cuig-speed-") as scratch, quiet():
        scratch = Path(scratch)
        model_path = settings.model_path
        if model_path is None:
            say(f"writing random {settings.size} parts to a temporary diffusers folder")
            model_path = str(write_model(settings.size, scratch / "model", settings.seed))
        stage = make_stage(scratch)
        for gi, group in enumerate(settings.groups):
            say(f"loading the model through UnlearningModule (ConAbl, trainable {group})")
            torch.manual_seed(settings.seed)
            module = UnlearningModule(model_path, method=ConAbl(trainable=group))
            data = SyntheticAnchors(prompts=PROMPTS, images_per_prompt=2, seed=settings.seed,
                                    vocabulary={"style": STYLES})
            data.prepare_stage(module.diffusion, stage)
            flops_1 = step_flops(module, data, device)
            for batch in settings.batch_sizes:
                for variant in variants:
                    row = measure_step(module, data, stage, settings, variant, group, batch, flops_1, peak)
                    result["train"].append(row)
                    measured()
                    if settings.regularizers and variant == settings.reference and row["step_ms"] is not None:
                        result["regularizers"] += measure_regularizers(module, data, stage, settings, group, batch,
                                                                       row["step_ms"])
                        measured()
            if gi == 0:  # sampling does not depend on the trainable group
                module.load_trainable(module.base_weights)
                if settings.peer:  # first: every sampling row's ratio needs it
                    result["peer"] = measure_peer(module, settings)
                    measured()
                for variant in variants:
                    for batch in settings.sample_batch_sizes:
                        result["sampling"].append(measure_sampling(module, settings, variant, batch))
                        measured()
            del module, data
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return finish(result, settings)


def finish(result: dict, settings: SpeedSettings) -> dict:
    """The process's peak RSS (CPU runs) and the targets, added to ``result``."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    result["meta"]["peak_rss_gib"] = rss if settings.torch_device.type != "cuda" else None
    add_targets(result, settings)
    return result


def speed(
    size: Size = "tiny",
    output: str = "results/speed",
    device: str = "auto",
    groups: list[Group] | None = None,
    batch_sizes: list[int] | None = None,
    sample_batch_sizes: list[int] | None = None,
    variants: list[VariantName] | None = None,
    warmup: int = 3,
    steps: int = 10,
    repeats: int = 3,
    sampler: Sampler = "ddim",
    sample_steps: int = 20,
    guidance: float = 7.5,
    regularizers: bool = True,
    peer: bool = True,
    seed: int = 0,
    model_path: str | None = None,
) -> None:
    """Speed of cuig (ConAbl step, regularizer overhead, CFG sampling) against diffusers' pipeline, as a table.

    Random-weight parts built from configs, loaded through UnlearningModule and trained in a lightning.Trainer;
    nothing is downloaded. Writes speed.md and speed.json into ``output`` and prints the table.

    Args:
        size: ``sd15`` (Stable Diffusion 1.5 UNet, CLIP ViT-L/14 text encoder, VAE; for a GPU) or ``tiny``
            (the test model; a CPU smoke run).
        output: folder of ``speed.md`` and ``speed.json``.
        device: torch device (``auto``: ``cuda`` when available, else ``cpu``).
        groups: ConAbl trainable groups measured (default ``xattn_kv`` and ``full``).
        batch_sizes: training batch sizes (default sd15 [8, 32], tiny [2, 4]).
        sample_batch_sizes: sampling batch sizes (default sd15 [1, 8, 32], tiny [1, 4]).
        variants: among ``fp32``, ``bf16`` (bf16-mixed), ``bf16-classic-attn`` (AttnProcessor instead of SDPA),
            ``bf16-channels-last`` and ``bf16-compile`` (torch.compile of the UNet); default all for sd15,
            all but ``bf16-compile`` for tiny. Regularizers and the peer run under ``bf16`` (else the first).
        warmup: untimed training steps / sampling calls before timing.
        steps: timed training steps per fit (the median is reported).
        repeats: timed sampling calls per batch size (the median is reported).
        sampler: the sampler of cuig's evaluation and of the peer pipeline alike: ``ddim``, ``dpm_solver``
            (DPM-Solver++ 2M) or ``unipc``.
        sample_steps: sampler steps of both.
        guidance: classifier-free guidance of both.
        regularizers: measure the GradientProjection and L2 overhead.
        peer: measure diffusers' StableDiffusionPipeline, one image a call.
        seed: seed of the random weights, anchor latents and sampling.
        model_path: a local diffusers folder to measure instead of random ``size`` parts (``size`` still picks
            the default batch sizes and whether targets are judged).
    """
    default_batches, default_samples, default_variants = DEFAULTS[size]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = SpeedSettings(
        size=size, device=device, groups=list(groups or ["xattn_kv", "full"]),
        batch_sizes=list(batch_sizes or default_batches),
        sample_batch_sizes=list(sample_batch_sizes or default_samples),
        variants=list(dict.fromkeys(variants or default_variants)), warmup=warmup, steps=steps, repeats=repeats,
        sampler=sampler, sample_steps=sample_steps, guidance=guidance, regularizers=regularizers, peer=peer, seed=seed,
        model_path=model_path,
    )
    check(settings)
    # the report so far after every row: a run stopped early (a time limit) leaves what it measured
    result = run_speed(settings, on_row=lambda partial: write_report(partial, Path(output)))
    print(write_report(result, Path(output)), end="")
    say(f"wrote {Path(output) / 'speed.md'} and {Path(output) / 'speed.json'}")


def check(settings: SpeedSettings) -> None:
    """Bad values a user can fix, before anything is built (reported as one ``cuig: error:`` line)."""
    for name in ("batch_sizes", "sample_batch_sizes"):
        if any(b < 1 for b in getattr(settings, name)):
            raise ValueError(f"speed {name} must all be >= 1, got {getattr(settings, name)}")
    if settings.warmup < 0 or settings.steps < 1 or settings.repeats < 1 or settings.sample_steps < 1:
        raise ValueError("speed needs warmup >= 0 and steps, repeats, sample_steps >= 1")
    try:
        device = settings.torch_device
    except RuntimeError as err:
        raise ValueError(f"speed: bad device {settings.device!r} ({err})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"speed measures on cpu or cuda, not {settings.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {settings.device!r} asked for, but CUDA is not available")
