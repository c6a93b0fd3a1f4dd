"""``cuig speed``: how fast cuig trains and samples, measured through its own module, data module and Trainer.

Parts with random weights are built from configs (nothing is downloaded) and written as a diffusers folder
in a temporary directory, which :class:`~cuig_lightning.module.UnlearningModule` loads as a user's model:

* ``size: sd15``: the Stable Diffusion 1.5 UNet, CLIP ViT-L/14 text encoder and VAE configs (random weights);
* ``size: tiny``: :func:`~cuig_lightning.models.diffusion.build_tiny_sd` (what the tests use; fast on a CPU).

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
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from callbacks.gradient_projection import GradientProjection
from callbacks.norm import NormRegularizer
from cuig_lightning.checkpoints import atomic_write, write_json
from cuig_lightning.data.anchors import PairedPrompts, StageTensors, UnlearningData
from cuig_lightning.evaluation.protocol import Evaluation
from cuig_lightning.methods import ConAbl
from cuig_lightning.models.diffusion import Sampler, build_tiny_sd, sampling_scheduler
from cuig_lightning.module import UnlearningModule
from cuig_lightning.requests import Request, Stage
from cuig_lightning.versions import library_versions

Size = Literal["tiny", "sd15"]
Group = Literal["xattn_kv", "xattn", "full"]
VariantName = Literal["fp32", "bf16", "bf16-classic-attn", "bf16-channels-last", "bf16-compile"]

#: Dense bf16 peak FLOP/s by device name (first match wins: the more specific names come first).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.5e12),
    ("H100", 989.4e12),  # SXM
    ("A100", 312e12),
)

#: The issue's targets, stated for SD-1.5 size on an H100 / H200.
TARGET_MFU = 0.45  # ConAbl step at batch 32, bf16
TARGET_BATCH = 32
TARGET_PEER_RATIO = 5.0  # cuig's batched evaluation vs the one-image pipeline
TARGET_OVERHEAD = 2.0  # percent, a regularizer callback on top of the plain step

STYLES = ["Van_Gogh", "Picasso", "Monet", "Ukiyoe", "Cubism", "Pop_Art", "Watercolor", "Winter"]
OBJECTS = ["Dogs", "Cats", "Birds", "Trees"]
PROMPTS = ["A Dogs image.", "A Cats image.", "A Birds image.", "A Trees image."]


@dataclass(frozen=True)
class Variant:
    """How the UNet runs: Trainer precision, attention processor, memory format, compilation."""

    name: str
    precision: str  # lightning.Trainer precision
    attention: Literal["sdpa", "classic"] = "sdpa"
    channels_last: bool = False
    compile: bool = False

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16-mixed"


VARIANTS = {v.name: v for v in (
    Variant("fp32", "32-true"),
    Variant("bf16", "bf16-mixed"),
    Variant("bf16-classic-attn", "bf16-mixed", attention="classic"),
    Variant("bf16-channels-last", "bf16-mixed", channels_last=True),
    Variant("bf16-compile", "bf16-mixed", compile=True),
)}

#: How FLOPs are counted: fp32 with the classic attention processor, whose attention is plain matmuls that
#: FlopCounterMode counts on every device (it has no formula for the CPU SDPA kernel).
FLOP_COUNTING = Variant("flop-count", "32-true", attention="classic")

#: Per size: (training batch sizes, sampling batch sizes, variants) when not given.
DEFAULTS: dict[str, tuple[list[int], list[int], list[str]]] = {
    "sd15": ([8, 32], [1, 8, 32], list(VARIANTS)),
    "tiny": ([2, 4], [1, 4], [n for n in VARIANTS if n != "bf16-compile"]),
}


@dataclass
class SpeedSettings:
    """One run's settings, resolved (recorded in ``speed.json``)."""

    size: str
    device: str
    groups: list[str]
    batch_sizes: list[int]
    sample_batch_sizes: list[int]
    variants: list[str]
    warmup: int
    steps: int
    repeats: int
    sampler: str
    sample_steps: int
    guidance: float
    regularizers: bool
    peer: bool
    seed: int
    model_path: str | None

    @property
    def reference(self) -> Variant:
        """The variant regularizers and the peer run under: bf16 when measured, else the first one."""
        return VARIANTS["bf16" if "bf16" in self.variants else self.variants[0]]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


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


# ============================================================================ model and data
def write_model(size: str, folder: Path, seed: int) -> Path:
    """A diffusers folder of random parts: ``build_tiny_sd`` (its tokenizer serves both sizes), with the UNet,
    text encoder, VAE and scheduler replaced by SD-1.5's for ``sd15``."""
    build_tiny_sd(folder, seed=seed)
    if size == "sd15":
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        tiny_text = json.loads((folder / "text_encoder" / "config.json").read_text())
        torch.manual_seed(seed)
        parts = {
            "scheduler": DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, clip_sample=False, steps_offset=1),  # SD-1.5's schedule
            "unet": UNet2DConditionModel(
                sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            ),
            "text_encoder": CLIPTextModel(CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                # the char-level tokenizer's special tokens
                bos_token_id=tiny_text["bos_token_id"], eos_token_id=tiny_text["eos_token_id"],
                pad_token_id=tiny_text["pad_token_id"],
            )),
            "vae": AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215, sample_size=512,
            ),
        }
        for name, part in parts.items():
            shutil.rmtree(folder / name)
            part.save_pretrained(folder / name)
    return folder


class SyntheticAnchors(UnlearningData):
    """The real data module (stream, batches, data loader) with anchor generation replaced by random anchor
    latents: anchor sampling is not the training step. Prompt embeddings are the text encoder's."""

    def prepare_stage(self, model, stage: Stage) -> None:
        pairs = PairedPrompts(stage.requests[0], self.prompts, self.object_templates, self.style_templates)
        n = len(pairs.anchor) * self.images_per_prompt
        latents = torch.randn((n, *model.latent_shape), generator=torch.Generator().manual_seed(self.seed))
        index = torch.arange(len(pairs.anchor)).repeat_interleave(self.images_per_prompt)
        self.stage = stage
        self.tensors = StageTensors([latents], [index], [model.encode_text(pairs.anchor).cpu()],
                                    [model.encode_text(pairs.target).cpu()])
        self._num_train_timesteps = model.scheduler.config.num_train_timesteps

    def batch(self, size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """One training batch of ``size`` items, on ``device``."""
        g = torch.Generator().manual_seed(self.seed)
        items = [self.tensors.item(g, self._num_train_timesteps) for _ in range(size)]
        return {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}


def make_stage(folder: Path) -> Stage:
    """One style request (Van_Gogh) with a vocabulary, so GradientProjection has neighbours to protect."""
    return Stage(index=0, requests=[Request("Van_Gogh", "style")], erased_before=[], vocabulary={"style": STYLES},
                 schedule="sequential", request_dir=folder / "requests" / "01-Van_Gogh", erased=["Van_Gogh"])


@contextlib.contextmanager
def applied(module: UnlearningModule, variant: Variant) -> Iterator[None]:
    """Run the module's UNet as ``variant`` says (attention, memory format, compile); restored afterwards."""
    from diffusers.models.attention_processor import AttnProcessor

    diffusion = module.diffusion
    unet = diffusion.unet
    processors = unet.attn_processors
    try:
        if variant.attention == "classic":
            unet.set_attn_processor(AttnProcessor())
        if variant.channels_last:
            unet.to(memory_format=torch.channels_last)
        if variant.compile:
            diffusion.unet = torch.compile(unet)
        yield
    finally:
        diffusion.unet = unet
        unet.set_attn_processor(processors)
        if variant.channels_last:
            unet.to(memory_format=torch.contiguous_format)
        if variant.compile:
            torch._dynamo.reset()


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
    timer, memory = fit(module, data, stage, settings, variant, batch, [])
    step_s = statistics.median(timer.step_s)
    flops = flops_1 * batch
    mfu = flops / step_s / peak_flops if peak_flops else None
    loop_ms = 1e3 * statistics.median(timer.loop_s) if timer.loop_s else None
    return {"variant": variant.name, "group": group, "batch": batch, "step_ms": 1e3 * step_s, "loop_ms": loop_ms,
            "images_per_s": batch / step_s, "flops_per_step": flops, "mfu": mfu, "peak_memory_gib": memory}


def measure_regularizers(module, data, stage, settings: SpeedSettings, group: str, batch: int,
                         plain_ms: float) -> list[dict]:
    """The step with GradientProjection and with the L2 NormRegularizer, against the plain step."""
    rows = []
    callbacks = {"GradientProjection": GradientProjection(k=5), "L2": NormRegularizer(p=2, weight=25000.0)}
    for name, callback in callbacks.items():
        say(f"regularizer overhead: {name}, {group}, batch {batch}")
        timer, _ = fit(module, data, stage, settings, settings.reference, batch, [callback])
        with_ms = 1e3 * statistics.median(timer.step_s)
        rows.append({"variant": settings.reference.name, "group": group, "batch": batch, "regularizer": name,
                     "plain_ms": plain_ms, "with_ms": with_ms, "overhead_pct": 100.0 * (with_ms / plain_ms - 1.0)})
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
    with applied(module, variant):
        seconds = timed(lambda: evaluation.generate(module.diffusion, pairs), settings.warmup, settings.repeats, device)
    return {"sampler": "cuig", "variant": variant.name, "batch": batch, "call_s": seconds,
            "images_per_s": batch / seconds, "peak_memory_gib": peak_memory_gib(device)}


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


# ============================================================================ targets and report
def peak_bf16_flops(device: torch.device) -> tuple[str, float | None]:
    """The device's name and its dense bf16 peak (None: CPU or a device not in :data:`PEAK_BF16_FLOPS`)."""
    if device.type != "cuda":
        return f"CPU {cpu_name()} ({torch.get_num_threads()} threads)", None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else the machine type."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def judge(value: float | None, ok: Callable[[float], bool], applies: bool, measurable: bool) -> str:
    """``-`` where the target is about other rows; ``n/a`` where it cannot be judged here; else met / missed."""
    if not applies:
        return "-"
    if not measurable or value is None or not math.isfinite(value):
        return "n/a"
    return "met" if ok(value) else "missed"


def add_targets(result: dict, settings: SpeedSettings) -> None:
    """The issue's targets, judged per row (only at SD-1.5 size on a GPU; the MFU one needs a known peak)."""
    gpu_sd15 = settings.size == "sd15" and settings.torch_device.type == "cuda"
    top_batch = max(settings.batch_sizes)
    for row in result["train"]:
        applies = VARIANTS[row["variant"]].bf16 and row["batch"] == top_batch
        measurable = gpu_sd15 and result["meta"]["peak_bf16_flops"] is not None and row["batch"] >= TARGET_BATCH
        row["target"] = judge(row["mfu"], lambda v: v >= TARGET_MFU, applies, measurable)
    for row in result["regularizers"]:
        row["target"] = judge(row["overhead_pct"], lambda v: v <= TARGET_OVERHEAD, True, gpu_sd15)
    peer = result["peer"]
    top_sample = max(settings.sample_batch_sizes)
    for row in result["sampling"]:
        row["vs_peer"] = row["images_per_s"] / peer["images_per_s"] if peer else None
        applies = row["variant"] == settings.reference.name and row["batch"] == top_sample
        row["target"] = judge(row["vs_peer"], lambda v: v >= TARGET_PEER_RATIO, applies, gpu_sd15 and peer is not None)


def si(value: float | None, unit: str = "") -> str:
    """1.23e12 -> '1.23 T' (three significant digits)."""
    if value is None:
        return "n/a"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def render(result: dict) -> str:
    """The report as markdown: a header line and one table per measurement."""
    meta, s = result["meta"], result["meta"]["settings"]
    v = meta["versions"]
    out = [f"# cuig speed: {s['size']} on {meta['device_name']}",
           "",
           f"device: {meta['device_name']} ({s['device']}) · dtype: {VARIANTS[meta['reference']].precision} "
           f"(reference; each row names its variant) · torch {v['torch']} · diffusers {v['diffusers']} · "
           f"lightning {v['lightning']} · {meta['date']}",
           "",
           f"## ConAbl training step (Trainer fit, median of {s['steps']} steps after {s['warmup']})",
           "",
           markdown_table(
               ["variant", "group", "batch", "step ms", "images/s", "FLOP/step", "MFU", "peak mem",
                f"target MFU>={TARGET_MFU:.0%} (bf16, batch {TARGET_BATCH})"],
               [[r["variant"], r["group"], str(r["batch"]), num(r["step_ms"]), num(r["images_per_s"]),
                 si(r["flops_per_step"]), "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}", gib(r["peak_memory_gib"]),
                 r["target"]] for r in result["train"]])]
    if result["regularizers"]:
        out += ["", f"## Regularizer overhead ({meta['reference']})", "",
                markdown_table(["group", "batch", "regularizer", "plain ms", "with ms", "overhead",
                                f"target <={TARGET_OVERHEAD:g}%"],
                               [[r["group"], str(r["batch"]), r["regularizer"], num(r["plain_ms"]), num(r["with_ms"]),
                                 f"{r['overhead_pct']:+.1f}%", r["target"]] for r in result["regularizers"]])]
    rows = [[r["sampler"], r["variant"], str(r["batch"]), num(r["call_s"]), num(r["images_per_s"]),
             "n/a" if r["vs_peer"] is None else f"{r['vs_peer']:.2f}x", gib(r["peak_memory_gib"]), r["target"]]
            for r in result["sampling"]]
    if result["peer"]:
        p = result["peer"]
        rows.append([p["sampler"] + " (1 image/call)", p["variant"], "1", num(p["call_s"]), num(p["images_per_s"]),
                     "1.00x", gib(p["peak_memory_gib"]), "-"])
    out += ["", f"## CFG sampling ({s['sampler']} {s['sample_steps']} steps, guidance {s['guidance']:g}, VAE decode included; "
                f"median of {s['repeats']} calls)", "",
            markdown_table(["sampler", "variant", "batch", "s/call", "images/s", "vs peer",
                            "peak mem", f"target >={TARGET_PEER_RATIO:g}x peer"], rows)]
    if meta["peak_rss_gib"] is not None:
        out += ["", f"Process peak RSS {meta['peak_rss_gib']:.2f} GiB (CPU run: no per-row memory)."]
    return "\n".join(out) + "\n"


def write_report(result: dict, output: Path) -> str:
    """``speed.md`` and ``speed.json`` in ``output`` (each written to a temporary file, then renamed)."""
    text = render(result)
    atomic_write(output / "speed.md", lambda tmp: Path(tmp).write_text(text))
    write_json(result, output / "speed.json")
    return text


# ============================================================================ the run
def run_speed(settings: SpeedSettings) -> dict:
    """Every measurement of ``settings``; the result as written to ``speed.json`` (None = n/a)."""
    device = settings.torch_device
    device_name, peak = peak_bf16_flops(device)
    result = {"meta": {"device_name": device_name, "peak_bf16_flops": peak, "reference": settings.reference.name,
                       "versions": library_versions(),
                       "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "settings": asdict(settings)},
              "train": [], "regularizers": [], "sampling": [], "peer": None}
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
                    if settings.regularizers and variant == settings.reference:
                        result["regularizers"] += measure_regularizers(module, data, stage, settings, group, batch,
                                                                       row["step_ms"])
            if gi == 0:  # sampling does not depend on the trainable group
                module.load_trainable(module.base_weights)
                for variant in variants:
                    for batch in settings.sample_batch_sizes:
                        result["sampling"].append(measure_sampling(module, settings, variant, batch))
                if settings.peer:
                    result["peer"] = measure_peer(module, settings)
            del module, data
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    result["meta"]["peak_rss_gib"] = rss if device.type != "cuda" else None
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
    result = run_speed(settings)
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
