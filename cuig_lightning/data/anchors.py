"""Anchor data for unlearning: prompts, anchor images generated once by the base model, and the
deterministic stream of training batches.

Anchor latents and prompt embeddings are cached on disk under ``cache_dir`` keyed by model, prompts and
seed, so reruns and later requests reuse them. Every training item is drawn from a generator seeded by
(seed, stage, item index) and the stream starts at the trainer's ``global_step``: an interrupted stage
resumed from ``last.ckpt`` sees exactly the batches an uninterrupted one would, on every DDP rank.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from cuig_lightning.checkpoints import CheckpointError, load_tensors, save_tensors
from cuig_lightning.models.diffusion import DiffusionModel
from cuig_lightning.progress import progress
from cuig_lightning.requests import DEFAULT_STYLE_TEMPLATES, Request, Stage, concept_text

DEFAULT_PROMPTS = ["A painting.", "An image.", "A picture of a scene.", "A drawing."]
DEFAULT_OBJECT_TEMPLATES = ["A {} image.", "A photo of {}.", "A painting of {}."]


def style_prompt(prompt: str, style: str, template: str = DEFAULT_STYLE_TEMPLATES[0]) -> str:
    """Insert a style into a neutral prompt with a template of ``{prompt}`` (the prompt without its final
    period) and ``{style}``: "A dog image." -> "A dog image in Van Gogh style."."""
    return template.format(prompt=prompt.rstrip().rstrip("."), style=concept_text(style))


class PairedPrompts:
    """The anchor prompts of a request and the target prompts made from them, index for index.
    A style request pairs every anchor prompt with every style template (anchor prompts repeat)."""

    def __init__(self, request: Request, prompts: list[str], object_templates: list[str],
                 style_templates: list[str] = DEFAULT_STYLE_TEMPLATES):
        if request.domain == "style":
            neutral = list(request.prompts or prompts)
            self.anchor = [p for _ in style_templates for p in neutral]
            self.target = [style_prompt(p, request.target, tpl) for tpl in style_templates for p in neutral]
        else:
            if request.prompts:  # explicit prompts name the anchor; swap it for the target
                self.anchor = list(request.prompts)
                a, t = concept_text(request.anchor or ""), concept_text(request.target)
                self.target = [p.replace(a, t) for p in self.anchor]
            else:
                self.anchor = [tpl.format(concept_text(request.anchor)) for tpl in object_templates]
                self.target = [tpl.format(concept_text(request.target)) for tpl in object_templates]


class StageTensors:
    """Everything a stage trains on, already on CPU: per request the anchor latents and prompt embeddings."""

    def __init__(self, latents: list[torch.Tensor], prompt_index: list[torch.Tensor],
                 cond_anchor: list[torch.Tensor], cond_target: list[torch.Tensor]):
        self.latents, self.prompt_index = latents, prompt_index
        self.cond_anchor, self.cond_target = cond_anchor, cond_target

    def item(self, generator: torch.Generator, num_train_timesteps: int, timestep: int | None = None) -> dict:
        r = int(torch.randint(len(self.latents), (1,), generator=generator))
        i = int(torch.randint(len(self.latents[r]), (1,), generator=generator))
        t = torch.randint(num_train_timesteps, (1,), generator=generator)[0] if timestep is None else torch.tensor(timestep)
        z0 = self.latents[r][i]
        p = int(self.prompt_index[r][i])
        return {
            "latents": z0,
            "noise": torch.randn(z0.shape, generator=generator),
            "timesteps": t.long(),
            "cond_target": self.cond_target[r][p],
            "cond_anchor": self.cond_anchor[r][p],
        }


class StepStream(IterableDataset):
    """A stage's endless deterministic item stream from item ``start``, this rank's share only.

    Endless (no length) so that a resumed stage is not cut into a new "epoch" by Lightning; the trainer's
    ``max_steps`` ends it. Rank ``r`` of ``world`` takes items ``start + r, start + r + world, ...``.
    """

    def __init__(self, tensors: StageTensors, seed: int, stage_index: int, start: int, rank: int, world: int,
                 num_train_timesteps: int):
        self.tensors, self.seed, self.stage_index = tensors, seed, stage_index
        self.start, self.rank, self.world, self.T = start, rank, world, num_train_timesteps

    def __iter__(self):
        index = self.start + self.rank
        while True:
            seed = ((self.seed * 1_000_003 + self.stage_index) * 1_000_000_007 + index) % 2**62
            yield self.tensors.item(torch.Generator().manual_seed(seed), self.T)
            index += self.world


class UnlearningData(L.LightningDataModule):
    """Anchor prompts/images for each stage and the batches a stage trains on.

    Args:
        prompts: neutral anchor prompts for style requests (the target prompt appends "in {style} style").
        object_templates: templates with ``{}`` for object requests (filled with anchor and target).
        style_templates: how a style request's target prompts are made from the anchor prompts, with
            ``{prompt}`` (an anchor prompt without its final period) and ``{style}``; every anchor prompt
            is paired with every template. The paper's code inserts the style as a suffix or a prefix, so
            training prompts are not the evaluation template.
        images_per_prompt: anchor images generated per anchor prompt.
        batch_size: training batch size per device.
        sample_steps: DDIM steps of the sampler that generates the anchor images (with the base model).
        guidance: classifier-free guidance of that sampler.
        seed: seed of anchor generation and of the training stream.
        cache_dir: where anchor latents and prompt embeddings are cached (default ``$CUIG_CACHE`` or
            ``~/.cache/cuig``).
        vocabulary: the benchmark's concepts per domain; requests are checked against it and regularizers
            draw their concept pools from it. Empty lists mean "any concept".
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        object_templates: list[str] | None = None,
        style_templates: list[str] | None = None,
        images_per_prompt: int = 2,
        batch_size: int = 4,
        sample_steps: int = 25,
        guidance: float = 3.0,
        seed: int = 0,
        cache_dir: str | None = None,
        vocabulary: dict[str, list[str]] | None = None,
    ):
        super().__init__()
        for name, value in (("images_per_prompt", images_per_prompt), ("batch_size", batch_size),
                            ("sample_steps", sample_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be an integer >= 1, got {value!r}")
        self.prompts = prompts or list(DEFAULT_PROMPTS)
        self.object_templates = object_templates or list(DEFAULT_OBJECT_TEMPLATES)
        self.style_templates = style_templates or list(DEFAULT_STYLE_TEMPLATES)
        for template in self.style_templates:
            if "{prompt}" not in template or "{style}" not in template:
                raise ValueError(f"data.style_templates: {template!r} needs both {{prompt}} and {{style}}")
        self.images_per_prompt = images_per_prompt
        self.batch_size = batch_size
        self.sample_steps, self.guidance, self.seed = sample_steps, guidance, seed
        self.cache_dir = Path(cache_dir or os.environ.get("CUIG_CACHE", "~/.cache/cuig")).expanduser()
        self.vocabulary = vocabulary or {}
        self.stage: Stage | None = None
        self.tensors: StageTensors | None = None
        self._num_train_timesteps = 1000

    # ------------------------------------------------------------------ caching
    def _cached(self, kind: str, key: dict, make) -> torch.Tensor:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        path = self.cache_dir / kind / f"{digest}.safetensors"
        if path.is_file():
            try:
                return load_tensors(path)["value"]
            except CheckpointError:
                pass  # a damaged cache entry is simply rebuilt
        value = make()
        save_tensors({"value": value}, path)
        return value

    def _embeddings(self, model: DiffusionModel, prompts: list[str]) -> torch.Tensor:
        return self._cached("text", {"model": model.name, "prompts": prompts}, lambda: model.encode_text(prompts).cpu())

    def _anchor_latents(self, model: DiffusionModel, prompts: list[str]) -> torch.Tensor:
        key = {"model": model.name, "prompts": prompts, "n": self.images_per_prompt, "seed": self.seed,
               "steps": self.sample_steps, "guidance": self.guidance}

        def make() -> torch.Tensor:
            device = next(model.unet.parameters()).device
            cond = self._embeddings(model, prompts).to(device).repeat_interleave(self.images_per_prompt, 0)
            uncond = self._embeddings(model, [""]).to(device)
            out, g = [], torch.Generator().manual_seed(self.seed)
            chunks = cond.split(16)
            for chunk in progress(chunks, f"anchor images ({len(cond)}, cached afterwards)", len(chunks)):
                out.append(model.sample(chunk, uncond, g, steps=self.sample_steps, guidance=self.guidance).cpu())
            return torch.cat(out)

        return self._cached("anchors", key, make)

    # ------------------------------------------------------------------ stages
    def prepare_stage(self, model: DiffusionModel, stage: Stage) -> None:
        """Build (or load from cache) the anchor images and prompt embeddings of a stage's requests."""
        latents, index, anchor, target = [], [], [], []
        for request in stage.requests:
            pairs = PairedPrompts(request, self.prompts, self.object_templates, self.style_templates)
            latents.append(self._anchor_latents(model, pairs.anchor))
            index.append(torch.arange(len(pairs.anchor)).repeat_interleave(self.images_per_prompt))
            anchor.append(self._embeddings(model, pairs.anchor))
            target.append(self._embeddings(model, pairs.target))
        self.stage = stage
        self.tensors = StageTensors(latents, index, anchor, target)
        self._num_train_timesteps = model.scheduler.config.num_train_timesteps

    def anchor_prompts(self, stage: Stage) -> list[str]:
        """The anchor prompts of a stage's requests, each once, in order (what the anchor images show)."""
        prompts = [p for request in stage.requests
                   for p in PairedPrompts(request, self.prompts, self.object_templates, self.style_templates).anchor]
        return list(dict.fromkeys(prompts))

    def train_dataloader(self) -> DataLoader:
        if self.tensors is None:
            raise RuntimeError("prepare_stage() must run before training")
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps <= 0:
            raise ValueError("trainer.max_steps must be set (> 0): it is the number of steps per request")
        start = trainer.global_step * self.batch_size * trainer.accumulate_grad_batches * trainer.world_size
        stream = StepStream(self.tensors, self.seed, self.stage.index, start, trainer.global_rank,
                            trainer.world_size, self._num_train_timesteps)
        return DataLoader(stream, batch_size=self.batch_size, shuffle=False, num_workers=0)

    def trajectory_batches(self, num_timesteps: int, device: torch.device):
        """Batches of the stage's target prompts at the timesteps of a DDIM trajectory (high noise to low)."""
        g = torch.Generator().manual_seed(self.seed)
        for t in torch.linspace(self._num_train_timesteps - 1, 0, num_timesteps).long().tolist():
            items = [self.tensors.item(g, self._num_train_timesteps, timestep=t) for _ in range(self.batch_size)]
            yield {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}
