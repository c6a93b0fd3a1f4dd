"""What ``cuig speed`` measures and how: its settings (:class:`SpeedSettings`), the UNet variants (:data:`VARIANTS`),
the random-weight model it writes (:func:`write_model`), the training data with synthetic anchors
(:class:`SyntheticAnchors`) and the one style request it trains (:func:`make_stage`)."""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch

from cuig_lightning.data.anchors import PairedPrompts, StageTensors, UnlearningData
from cuig_lightning.models.tiny_sd import build_tiny_sd, clip_bpe_tokenizer, read_bpe_merges
from cuig_lightning.module import UnlearningModule
from cuig_lightning.requests import Request, Stage

Size = Literal["tiny", "sd15"]
Group = Literal["xattn_kv", "xattn", "full"]
VariantName = Literal["fp32", "bf16", "bf16-classic-attn", "bf16-channels-last", "bf16-compile"]

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


def write_model(size: str, folder: Path, seed: int, bpe_file: Path | None = None) -> Path:
    """A diffusers folder of random parts: ``build_tiny_sd`` (its character-level tokenizer serves both sizes), with
    the UNet, text encoder, VAE and scheduler replaced by SD-1.5's for ``sd15``; with ``bpe_file`` (OpenAI's CLIP
    merges, :func:`~cuig_lightning.models.tiny_sd.find_bpe_file`) the tokenizer is SD's real BPE one (``sd15``)."""
    build_tiny_sd(folder, seed=seed)
    if size == "sd15":
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        if bpe_file is not None:
            tokenizer = clip_bpe_tokenizer(read_bpe_merges(bpe_file))
            shutil.rmtree(folder / "tokenizer")
            tokenizer.save_pretrained(folder / "tokenizer")
            special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                       "pad_token_id": tokenizer.pad_token_id}
        else:  # the char-level tokenizer's special tokens
            tiny_text = json.loads((folder / "text_encoder" / "config.json").read_text())
            special = {k: tiny_text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
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
                **special,
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
