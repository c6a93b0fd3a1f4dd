"""``cuig speed``'s measurements: timing on the device (:func:`timed`, :class:`StepTimer` inside the Trainer), peak
memory, and one function per table row: the training step (:func:`measure_step`, FLOPs by :func:`step_flops`),
the regularizers' overhead, cuig's CFG sampling and the diffusers pipeline it is compared with (the peer)."""

from __future__ import annotations

import contextlib
import gc
import logging
import statistics
import sys
import time
import warnings
from typing import Callable, Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from callbacks.gradient_projection import GradientProjection
from callbacks.norm import NormRegularizer
from cuig_lightning.evaluation.protocol import Evaluation
from cuig_lightning.models.diffusion import sampling_scheduler
from cuig_lightning.module import UnlearningModule
from cuig_lightning.requests import Stage
from cuig_lightning.speed_setup import FLOP_COUNTING, OBJECTS, STYLES, SpeedSettings, SyntheticAnchors, Variant, applied


# ============================================================================ timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], warmup: int, repeat: int, device: torch.device) -> float:
    """Median seconds of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones (device synchronized)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class StepTimer(Callback):
    """Times training steps inside the Trainer: ``on_train_batch_start`` -> ``on_train_batch_end`` (the step),
    and ``on_train_batch_end`` -> the next one (the loop, data loading included), after ``warmup`` steps."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.step_s: list[float] = []
        self.loop_s: list[float] = []
        self._start = self._last_end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        synchronize(pl_module.device)
        end = time.perf_counter()
        if batch_idx >= self.warmup:
            self.step_s.append(end - self._start)
            if self._last_end is not None:
                self.loop_s.append(end - self._last_end)
        self._last_end = end


def release_memory(module: UnlearningModule) -> None:
    for p in module.trainable.values():
        p.grad = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory_start(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since :func:`peak_memory_start`; None on CPU (the process peak RSS is in meta)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


#: Warnings every fit or sampling call would repeat (messages, as regular expressions).
QUIET_WARNINGS = (
    r".*does not have many workers.*", r".*infer the `batch_size`.*", r".*module\(s\) in eval mode.*",
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*", r".*GPU available but not used.*",
    r"(?s).*steps_offset.*", r".*lru_cache`-wrapped function.*",
)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No per-Trainer info lines or known warnings while measuring (the peer pipeline's complaint about the tiny
    scheduler's ``steps_offset`` included); stdout goes to stderr (the table owns stdout)."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        for pattern in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def say(message: str) -> None:
    print(f"[speed] {message}", file=sys.stderr, flush=True)


# ============================================================================ measurements
def fit(module: UnlearningModule, data: SyntheticAnchors, stage: Stage, settings: SpeedSettings, variant: Variant,
        batch: int, callbacks: list[Callback]) -> tuple[StepTimer, float | None]:
    """One stage fit of ``warmup + steps`` steps as ``cuig fit`` runs it; the timer and the peak memory."""
    device = settings.torch_device
    timer = StepTimer(settings.warmup)
    data.batch_size = batch
    module.begin_stage(stage, module.base_weights)  # the real stage start: base weights, no earlier loss terms
    gpu = device.type == "cuda"
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu", devices=[device.index or 0] if gpu else 1, precision=variant.precision,
        max_steps=settings.warmup + settings.steps, gradient_clip_val=1.0, log_every_n_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*callbacks, timer], default_root_dir=str(stage.request_dir.parent),
    )
    peak_memory_start(device)
    with applied(module, variant):
        trainer.fit(module, datamodule=data)
    peak = peak_memory_gib(device)
    release_memory(module)
    return timer, peak


def step_flops(module: UnlearningModule, data: SyntheticAnchors, device: torch.device) -> int:
    """FLOPs of one forward + backward of the module's loss at batch 1 (the step is linear in the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    module.to(device)
    batch = data.batch(1, device)
    counter = FlopCounterMode(display=False)
    with applied(module, FLOP_COUNTING), counter:
        module.unlearning_loss(batch).backward()
    release_memory(module)
    return counter.get_total_flops()


def measure_step(module, data, stage, settings: SpeedSettings, variant: Variant, group: str, batch: int,
                 flops_1: int, peak_flops: float | None) -> dict:
    """The ConAbl training step of one (variant, group, batch) in a real Trainer fit."""
    say(f"training step: {variant.name}, {group}, batch {batch}")
    row = {"variant": variant.name, "group": group, "batch": batch}
    try:
        timer, memory = fit(module, data, stage, settings, variant, batch, [])
    except torch.OutOfMemoryError:
        timer = None  # released after the handler: its traceback holds the step's tensors
    if timer is None:
        return out_of_memory(module, row, "step_ms", "loop_ms", "images_per_s", "flops_per_step", "mfu",
                             "peak_memory_gib")
    step_s = statistics.median(timer.step_s)
    flops = flops_1 * batch
    mfu = flops / step_s / peak_flops if peak_flops else None
    loop_ms = 1e3 * statistics.median(timer.loop_s) if timer.loop_s else None
    return {**row, "step_ms": 1e3 * step_s, "loop_ms": loop_ms, "images_per_s": batch / step_s, "flops_per_step": flops,
            "mfu": mfu, "peak_memory_gib": memory}


def out_of_memory(module: UnlearningModule, row: dict, *keys: str) -> dict:
    """The row of a measurement that ran out of GPU memory (its numbers None, ``error`` says so); the memory is
    released so that the next (smaller) measurement can run."""
    say(f"out of memory: {row}")
    release_memory(module)
    return {**row, **dict.fromkeys(keys), "error": "out of memory"}


def measure_regularizers(module, data, stage, settings: SpeedSettings, group: str, batch: int,
                         plain_ms: float) -> list[dict]:
    """The step with GradientProjection and with the L2 NormRegularizer, against the plain step."""
    rows = []
    callbacks = {"GradientProjection": GradientProjection(k=5), "L2": NormRegularizer(p=2, weight=25000.0)}
    for name, callback in callbacks.items():
        say(f"regularizer overhead: {name}, {group}, batch {batch}")
        row = {"variant": settings.reference.name, "group": group, "batch": batch, "regularizer": name,
               "plain_ms": plain_ms}
        try:
            timer, _ = fit(module, data, stage, settings, settings.reference, batch, [callback])
        except torch.OutOfMemoryError:
            timer = None
        if timer is None:
            rows.append(out_of_memory(module, row, "with_ms", "overhead_pct"))
            continue
        with_ms = 1e3 * statistics.median(timer.step_s)
        rows.append({**row, "with_ms": with_ms, "overhead_pct": 100.0 * (with_ms / plain_ms - 1.0)})
    return rows


def prompt_pairs(n: int) -> list[tuple[str, str]]:
    grid = [(s, o) for s in STYLES for o in OBJECTS]
    return [grid[i % len(grid)] for i in range(n)]


def measure_sampling(module, settings: SpeedSettings, variant: Variant, batch: int) -> dict:
    """Images/s of cuig's evaluation sampler (``Evaluation.generate``: text encoding, batched CFG sampling,
    VAE decode, images to the CPU) at one batch size."""
    say(f"sampling: {variant.name}, batch {batch}")
    device = settings.torch_device
    module.to(device)
    evaluation = Evaluation(seeds=[settings.seed], sampler=settings.sampler, steps=settings.sample_steps,
                            guidance=settings.guidance, batch_size=batch, save_samples=False, bf16=variant.bf16)
    pairs = prompt_pairs(batch)
    peak_memory_start(device)
    row = {"sampler": "cuig", "variant": variant.name, "batch": batch}
    try:
        with applied(module, variant):
            seconds = timed(lambda: evaluation.generate(module.diffusion, pairs), settings.warmup, settings.repeats,
                            device)
    except torch.OutOfMemoryError:
        seconds = None
    if seconds is None:
        return out_of_memory(module, row, "call_s", "images_per_s", "peak_memory_gib")
    return {**row, "call_s": seconds, "images_per_s": batch / seconds, "peak_memory_gib": peak_memory_gib(device)}


def measure_peer(module, settings: SpeedSettings) -> dict:
    """Images/s of diffusers' ``StableDiffusionPipeline`` from the same parts, one image a call."""
    from diffusers import StableDiffusionPipeline

    variant = settings.reference
    say(f"peer: StableDiffusionPipeline, {variant.name}, batch 1")
    device = settings.torch_device
    module.to(device)
    d = module.diffusion
    prompt = "A Dogs image in Van Gogh style."
    generator = torch.Generator(device).manual_seed(settings.seed)
    peak_memory_start(device)
    with applied(module, variant):  # the pipeline gets the UNet as the variant runs it
        pipe = StableDiffusionPipeline(
            vae=d.vae, text_encoder=d.text_encoder, tokenizer=d.tokenizer, unet=d.unet,
            scheduler=sampling_scheduler(d.scheduler, settings.sample_steps, settings.sampler), safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)

        def one_image():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.bf16):
                return pipe(prompt, num_inference_steps=settings.sample_steps, guidance_scale=settings.guidance,
                            generator=generator, output_type="pt").images.cpu()

        seconds = timed(one_image, settings.warmup, settings.repeats, device)
    return {"sampler": "diffusers StableDiffusionPipeline", "variant": variant.name, "batch": 1, "call_s": seconds,
            "images_per_s": 1 / seconds, "peak_memory_gib": peak_memory_gib(device)}
