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


#: GradProj's caption column: the last content token (trailing punctuation skipped) or the token before EOS.
ColumnToken = Literal["content", "last"]


def _after_prefix(tokens: list[str], prefixes: list[list[str]]) -> list[int] | None:
    """Indices of the tokens after the first of ``prefixes`` found in ``tokens`` (None: no prefix, or nothing
    after it)."""
    for prefix in prefixes:
        for start in range(len(tokens) - len(prefix) + 1):
            if tokens[start : start + len(prefix)] == prefix:
                after = list(range(start + len(prefix), len(tokens)))
                return after or None
    return None


def _is_punctuation(token: str) -> bool:
    text = token.removesuffix("</w>").removeprefix("##").removeprefix("\u0120")
    return bool(text) and all(not c.isalnum() for c in text)


def _no_gradient_at_first_position(grad: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(grad[:, :1]), grad[:, 1:]], dim=1)


def _first_position_without_gradient(module: nn.Module, inputs, output: torch.Tensor) -> None:
    if output.requires_grad:
        output.register_hook(_no_gradient_at_first_position)


def detach_first_text_position(unet: nn.Module) -> list:
    """Train no cross-attention key / value of the first text position (BOS / CLS), as Concept Ablation and
    the paper's ConAbl / SculpMem code do (CUIG ``UnlearningMethods/ConAbl/src/model.py``: the key and value
    of position 0 are detached before attention). With a causal text encoder that position's state is the
    same for every prompt, so moving its key / value would move every prompt's output.

    A forward hook on each ``attn2.to_k`` / ``to_v`` hooks its output's gradient to zero position 0: the
    detach's gradients, the forward pass untouched (bitwise). Returns the handles (``remove()`` undoes it)."""
    handles = []
    for name, module in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            handles.append(module.register_forward_hook(_first_position_without_gradient))
    if not handles:
        raise ValueError("the UNet has no cross-attention (attn2.to_k / to_v) whose first position could be detached")
    return handles


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
        return self.text_states(self.token_ids(prompts))

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        """The prompts' token ids ``(batch, max_length)``, padded to ``max_length`` (what :meth:`text_states` reads)."""
        return self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt").input_ids

    def text_states(self, token_ids: torch.Tensor) -> torch.Tensor:
        """:meth:`encode_text` from token ids, with gradient (the soft-prompt attack differentiates through it):
        the one place the causal mask of a bidirectional encoder is applied."""
        device = next(self.text_encoder.parameters()).device
        mask, n = None, token_ids.shape[1]
        if self.causal_mask:
            mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None].expand(len(token_ids), 1, n, n)
        return self.text_encoder(token_ids.to(device), attention_mask=mask).last_hidden_state.float()

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

    #: Prompt prefixes after which GradProj's column is the mean of the following tokens (the paper's code).
    COLUMN_PREFIXES = ("an image in the style of", "an image of a", "an image of")

    @torch.no_grad()
    def prompt_columns(self, prompts: list[str], token: ColumnToken = "content", batch_size: int = 64) -> torch.Tensor:
        """GradProj's column per prompt, ``(len(prompts), d)``, from the states the UNet sees
        (:meth:`encode_text`), by the paper's rule (CUIG ``Regularizers/Projection/src/auxiliary_embeddings.py``):

        * a prompt with a prefix of :attr:`COLUMN_PREFIXES` ("An image of a Cat"): the mean of the states of
          the tokens after the prefix (special tokens excluded);
        * any other prompt (a caption): the state of its last content token: the last token before EOS /
          [SEP], trailing punctuation skipped (``token: content``; for the paper's LAION captions the token
          before EOS is nearly always a content word), or the token before EOS whatever it is (``token: last``,
          cuig before issue 33: a period for captions ending in ".").
        """
        if token not in ("content", "last"):
            raise ValueError(f"unknown column token {token!r}; use content or last")
        prefixes = [self.tokenizer.tokenize(p) for p in self.COLUMN_PREFIXES]
        special = set(self.tokenizer.all_special_ids)
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            states = self.encode_text(chunk)
            ids = self.tokenizer(chunk, truncation=True, max_length=self.max_length).input_ids
            for row, prompt_ids in enumerate(ids):
                positions = [j for j, t in enumerate(prompt_ids) if t not in special]
                tokens = self.tokenizer.convert_ids_to_tokens([prompt_ids[j] for j in positions])
                picked = _after_prefix(tokens, prefixes)
                if picked is None:
                    last = len(positions) - 1
                    while token == "content" and last > 0 and _is_punctuation(tokens[last]):
                        last -= 1
                    picked = [last]
                out.append(states[row, [positions[j] for j in picked]].mean(0))
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
    def sample(self, cond: torch.Tensor, uncond: torch.Tensor, generator: torch.Generator, steps: int = 25,
               guidance: float = 3.0, eta: float = 0.0, sampler: Sampler = "ddim") -> torch.Tensor:
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
