"""The text-to-image model parts, loaded from a local diffusers folder.

One class serves Stable Diffusion 1.5 and Canvas-mini alike: a folder with ``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/`` and optionally ``vae/`` (absent means the UNet works in pixel space).
Nothing is downloaded: every ``from_pretrained`` call is ``local_files_only``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel,
                       UniPCMultistepScheduler)
from torch import nn
from transformers import AutoModel, AutoTokenizer, CLIPTextModel

from cuig_lightning.canvas_mini.paths import canvas_mini_model_path
from cuig_lightning.requests import concept_text

TrainableGroup = Literal["xattn_kv", "xattn", "full"]
#: The samplers of the evaluation (and exports): DDIM, or diffusers' multistep ODE solvers (DPM-Solver++ 2M,
#: UniPC), which reach DDIM's images in fewer steps. All read the model's own noise schedule.
Sampler = Literal["ddim", "dpm_solver", "unipc"]
SAMPLERS = {"ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}
_GROUP_PATTERNS = {
    "xattn_kv": ("attn2.to_k.", "attn2.to_v."),
    "xattn": ("attn2.to_q.", "attn2.to_k.", "attn2.to_v.", "attn2.to_out."),
}


class ModelLoadError(FileNotFoundError):
    """The model folder is missing or incomplete."""


def trainable_names(unet: nn.Module, group: TrainableGroup) -> list[str]:
    """UNet parameter names in a trainable group, sorted. ``xattn_kv`` keeps weights only (as SD-1.5 has)."""
    names = [n for n, _ in unet.named_parameters()]
    if group == "full":
        return sorted(names)
    if group not in _GROUP_PATTERNS:
        raise ValueError(f"unknown trainable group {group!r}; choose xattn_kv, xattn or full")
    picked = [n for n in names if any(p in n for p in _GROUP_PATTERNS[group])]
    if group == "xattn_kv":
        picked = [n for n in picked if n.endswith(".weight")]
    if not picked:
        raise ValueError(f"the UNet has no parameters in group {group!r} (no cross-attention?)")
    return sorted(picked)


class DiffusionModel(nn.Module):
    """UNet + text encoder + tokenizer + noise scheduler (+ VAE), with the few operations cuig needs."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler, vae=None, name: str = "model",
                 scheduler_config: dict | None = None):
        super().__init__()
        # The folder's scheduler config as written (any class: PNDM for SD-1.5); training and sampling use
        # the DDPM / DDIM schedulers made from it, an export writes this one back.
        self.scheduler_config = dict(scheduler_config or {}) or (
            {**scheduler.config, "_class_name": type(scheduler).__name__} if scheduler is not None else {})
        self.unet = unet
        self.text_encoder = text_encoder
        self.vae = vae
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.name = name
        # SD's CLIP is causal and its UNet attends to every position, padding included (the diffusers pipeline
        # passes no mask). A bidirectional (BERT-like) encoder gets a causal mask so that it conditions the same way:
        # a token's state never depends on the words after it.
        self.causal_mask = not isinstance(text_encoder, CLIPTextModel)
        self.max_length = min(int(tokenizer.model_max_length), 77)
        for module in (text_encoder, vae):
            if module is not None:
                module.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "DiffusionModel":
        """Load a local diffusers folder; ``canvas-mini`` names the embedded Canvas-mini model."""
        if str(path) == "canvas-mini":
            path = canvas_mini_model_path()
        path = Path(path).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"model folder {path} does not exist")
        missing = [p for p in ("unet", "text_encoder", "tokenizer", "scheduler") if not (path / p).is_dir()]
        if missing:
            raise ModelLoadError(f"model folder {path} lacks {', '.join(missing)} (expected a diffusers layout)")
        kw = {"local_files_only": True}
        unet = UNet2DConditionModel.from_pretrained(path / "unet", **kw)
        # fp32 whatever the checkpoint stores (transformers 5 would keep an fp16 file's dtype)
        text_encoder = AutoModel.from_pretrained(path / "text_encoder", dtype=torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", **kw)
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler", **kw)
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        vae = AutoencoderKL.from_pretrained(path / "vae", **kw) if (path / "vae").is_dir() else None
        return cls(unet, text_encoder, tokenizer, scheduler, vae, name=fingerprint(path),
                   scheduler_config=scheduler_config)

    def original_scheduler(self):
        """The scheduler of the class the model folder named (``_class_name``), from its own config."""
        import diffusers

        cls = getattr(diffusers, str(self.scheduler_config.get("_class_name")), None)
        if cls is None:
            raise ModelLoadError(f"unknown scheduler class {self.scheduler_config.get('_class_name')!r}")
        return cls.from_config(self.scheduler_config)

    # ----------------------------------------------------------------- text
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Per-token text states ``(batch, max_length, dim)`` that condition the UNet, padding positions included."""
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        device = next(self.text_encoder.parameters()).device
        mask = None
        if self.causal_mask:
            n = self.max_length
            mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None].expand(len(prompts), 1, n, n)
        out = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)
        return out.last_hidden_state.float()

    #: Where a concept's name stands when it is embedded on its own (GradProj, similarity): the prompt position
    #: it has in the evaluation captions. With causal states only the words before the name matter.
    CONCEPT_TEMPLATES = {"style": "An image in {} style.", "object": "A {} image."}

    @torch.no_grad()
    def concept_embeddings(self, names: list[str], domain: str = "style") -> torch.Tensor:
        """One vector per concept: the states of the concept's own tokens inside a prompt, as the UNet sees them, averaged."""
        template = self.CONCEPT_TEMPLATES[domain]
        prefix = template.split("{}")[0].strip()
        start = len(self.tokenizer(prefix).input_ids) - 1  # the prefix's tokens with BOS/CLS, without EOS/SEP
        states = self.encode_text([template.format(concept_text(n)) for n in names])
        out = []
        for i, name in enumerate(names):
            width = len(self.tokenizer(concept_text(name), add_special_tokens=False).input_ids)
            out.append(states[i, start : start + width].mean(0))
        return torch.stack(out)

    # ----------------------------------------------------------------- latents
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1]."""
        if self.vae is not None:
            latents = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        generator: torch.Generator,
        steps: int = 25,
        guidance: float = 3.0,
        eta: float = 0.0,
        sampler: Sampler = "ddim",
    ) -> torch.Tensor:
        """CFG sampling from fresh noise (DDIM unless ``sampler`` says otherwise); returns latents (the UNet's
        working space)."""
        scheduler = sampling_scheduler(self.scheduler, steps, sampler)
        shape = (cond.shape[0], *self.latent_shape)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(cond.device)
        return sample_cfg(self.unet, scheduler, noise, cond, uncond, guidance, eta=eta)[0]


# --------------------------------------------------------------------- the one CFG sampler
def sampling_scheduler(noise_scheduler, steps: int, sampler: Sampler = "ddim"):
    """A fresh ``sampler`` over ``steps`` steps (timesteps high to low) with the model's noise schedule.

    Fresh per trajectory: the multistep solvers keep the previous steps' outputs of the batch they sample."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose {', '.join(SAMPLERS)}")
    config = noise_scheduler.config
    extra = {}
    if sampler != "ddim" and config.get("clip_sample"):
        # DDIM clips its x0 predictions to ±clip_sample_range; the solvers' thresholding with that as the
        # largest threshold is the same clip (s = clamp(quantile, 1, max) = 1 when max is 1), so both
        # integrate the same clipped dynamics (a pixel-space model's x0 overshoots at high noise otherwise).
        extra = {"thresholding": True, "sample_max_value": config.get("clip_sample_range", 1.0)}
    scheduler = SAMPLERS[sampler].from_config(config, **extra)
    scheduler.set_timesteps(steps)
    return scheduler


def trajectory_stops(scheduler: DDIMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Per item, the DDIM step whose timestep is nearest to the item's t (ties: the earlier step)."""
    grid = scheduler.timesteps.to(timesteps.device)
    return (grid.view(1, -1) - timesteps.view(-1, 1)).abs().argmin(dim=1)


@torch.no_grad()
def sample_cfg(
    unet: nn.Module,
    scheduler,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: float,
    stops: torch.Tensor | None = None,
    eta: float = 0.0,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Classifier-free guided sampling from ``noise`` with ``scheduler`` (:func:`sampling_scheduler`):
    evaluation, anchors, exports and ESD's trajectories.

    Item i stops after ``stops[i]`` steps (default: every item runs the whole trajectory); returns each
    item's latent there and, with ``stops``, that latent's timestep ``scheduler.timesteps[stops[i]]``.
    Each step runs the UNet only on the items still on their way, so ``stops`` needs a one-step sampler
    (DDIM): a multistep solver's history belongs to the whole batch. ``eta``: DDIM's noise (0: deterministic).
    ``upcast``: combine the two predictions in float32 (ESD); otherwise in the UNet's output dtype
    (evaluation under autocast).
    """
    ddim = isinstance(scheduler, DDIMScheduler)
    if stops is not None and not ddim:
        raise ValueError("per-item trajectory stops need the DDIM sampler")
    grid = scheduler.timesteps.to(noise.device)
    latents = noise.float().clone()
    given = stops is not None
    stops = (stops if given else torch.full((len(noise),), len(grid))).to(noise.device)
    out = latents.clone()
    for k in range(int(stops.max()) + 1):
        here = stops == k
        out[here] = latents[here]
        going = (stops > k).nonzero().squeeze(1)
        if going.numel() == 0:
            break
        x, c = latents[going], cond[going]
        u = uncond.expand(len(going), *uncond.shape[1:]).to(c.dtype)
        both = unet(torch.cat([x, x]), grid[k], encoder_hidden_states=torch.cat([u, c])).sample
        e_uncond, e_cond = (both.float() if upcast else both).chunk(2)
        eps = e_uncond + guidance * (e_cond - e_uncond)
        step = scheduler.step(eps, grid[k], x, eta=eta) if ddim else scheduler.step(eps, grid[k], x)
        latents[going] = step.prev_sample.to(latents.dtype)
    return out, (grid[stops] if given else None)


def fingerprint(path: Path) -> str:
    """A short id of a model folder's contents (for cache keys: anchors and text states are per model).

    Weight files are hashed by content (a retrained model of the same architecture has files of the same
    size); files over 256 MB by their size and their first and last 16 MB, which is fast and still changes
    with any retraining.
    """
    digest = hashlib.sha256()
    # os.walk follows links: Canvas-mini's model folder is made of links (Path.rglob would see nothing)
    files = sorted(Path(root, name) for root, _, names in os.walk(path, followlinks=True) for name in names)
    for file in files:
        if file.is_file():
            digest.update(file.relative_to(path).as_posix().encode())
            size = file.stat().st_size
            digest.update(str(size).encode())
            with open(file, "rb") as f:
                if size <= 256 << 20:
                    digest.update(f.read())
                else:
                    digest.update(f.read(16 << 20))
                    f.seek(-(16 << 20), 2)
                    digest.update(f.read())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------- tiny SD-shaped model
def _byte_vocab() -> list[str]:
    """The 256 byte-level symbols of CLIP's BPE, so a char-level CLIP tokenizer needs no downloaded vocab."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tiny_sd(out_dir: str | Path, seed: int = 0, sample_size: int = 8, dim: int = 32) -> Path:
    """Write a random-init, SD-shaped diffusers pipeline folder (for tests and smoke runs).

    UNet2DConditionModel with cross-attention, a CLIP text encoder and a character-level CLIP tokenizer
    built offline, a tiny AutoencoderKL and a DDPM scheduler; ``StableDiffusionPipeline.from_pretrained``
    loads the result.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTokenizer

    out = Path(out_dir)
    torch.manual_seed(seed)
    chars = _byte_vocab()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tok_dir = out / "_tok_src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"), model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77,
            bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=dim,
        attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=sample_size * 2,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return out
