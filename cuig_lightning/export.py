"""Use a finished request of a run: export it as a diffusers folder that loads with one call, or evaluate it.

An export is self-contained: real files (no links into a wheel or a cache), the model folder's own
scheduler class, no absolute local paths, and a model card (``README.md``: Hugging Face's YAML metadata block,
then what was erased).

* Stable Diffusion (a VAE): ``StableDiffusionPipeline.from_pretrained(OUT)``.
* Canvas-mini and other pixel-space models: ``CanvasMiniPipeline.from_pretrained(OUT)``
  (``from cuig_lightning.export import CanvasMiniPipeline``), recorded in ``model_index.json``; or with plain
  diffusers, without cuig, from the pipeline's source that the export carries as ``pipeline.py`` (diffusers runs
  a folder's code only when asked to: ``trust_remote_code=True``)::

      DiffusionPipeline.from_pretrained(OUT, custom_pipeline=f"{OUT}/pipeline.py", trust_remote_code=True)
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
import yaml
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput

from cuig_lightning.checkpoints import write_json
from cuig_lightning.evaluation.protocol import describe_protocol, drift
from cuig_lightning.evaluation.robustness import measure_robustness
from cuig_lightning.models.diffusion import DiffusionModel
from cuig_lightning.run_folder import RunFolder, read_job

CARD = "README.md"
PIPELINE_FILE = "pipeline.py"  # the pixel-space pipeline's own source, for diffusers' custom_pipeline
TAGS = ["text-to-image", "diffusers", "cuig", "concept-unlearning"]

#: :class:`CanvasMiniPipeline` as one self-contained file (no cuig import): written into a pixel-space export as
#: ``pipeline.py`` so that ``DiffusionPipeline.from_pretrained(OUT, custom_pipeline=f"{OUT}/pipeline.py",
#: trust_remote_code=True)`` loads it with plain diffusers. A copy of the few lines it runs of
#: :meth:`DiffusionModel.encode_text` (the causal mask of a non-CLIP encoder), :func:`sampling_scheduler` (DDIM over
#: the model's noise schedule, read as DDPM) and :func:`sample_cfg` (classifier-free guidance); tests check that it
#: generates what :class:`CanvasMiniPipeline` generates.
PIPELINE_SOURCE = '''"""A cuig export's text-to-image pipeline for a pixel-space model (Canvas-mini), for diffusers:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(FOLDER, custom_pipeline=f"{FOLDER}/pipeline.py", trust_remote_code=True)
    image = pipe("A Cats image in Monet style.", generator=torch.Generator().manual_seed(0)).images[0]

Written by cuig's export (cuig_lightning.export.PIPELINE_SOURCE); it needs torch, diffusers and transformers only.
The prompts are encoded as in training (a causal attention mask for a bidirectional text encoder such as BERT: a
token's state never depends on the words after it; CLIP is causal already), padding positions included, and
sampled with DDIM over the model's noise schedule and classifier-free guidance, as cuig samples.
"""

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput
from transformers import CLIPTextModel


class CanvasMiniPipeline(DiffusionPipeline):
    """Text-to-image with a pixel-space cuig model (the UNet works on images in [-1, 1]: no VAE)."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @torch.no_grad()
    def encode_text(self, prompts):
        """Per-token text states (batch, max_length, dim) that condition the UNet, padding positions included."""
        max_length = min(int(self.tokenizer.model_max_length), 77)
        tokens = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                                return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        mask = None
        if not isinstance(self.text_encoder, CLIPTextModel):
            n = max_length
            mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None].expand(len(prompts), 1, n, n)
        out = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)
        return out.last_hidden_state.float()

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps=20, guidance_scale=1.5, generator=None, output_type="pil",
                 eta=0.0):
        """Images for ``prompt`` (one per prompt): PIL images (``output_type="pil"``) or an array in [0, 1]."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = next(self.unet.parameters()).device
        cond = self.encode_text(prompts).to(device)
        uncond = self.encode_text([""]).to(device)
        # the model's noise schedule read as DDPM (as in training), then DDIM over it
        noise_schedule = DDPMScheduler.from_config(self.scheduler.config)
        sampler = DDIMScheduler.from_config(noise_schedule.config)
        sampler.set_timesteps(num_inference_steps)
        generator = generator or torch.Generator().manual_seed(0)
        config = self.unet.config
        shape = (cond.shape[0], config.in_channels, config.sample_size, config.sample_size)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        for t in sampler.timesteps.to(device):
            u = uncond.expand(len(latents), *uncond.shape[1:]).to(cond.dtype)
            both = self.unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([u, cond])).sample
            e_uncond, e_cond = both.chunk(2)
            eps = e_uncond + guidance_scale * (e_cond - e_uncond)
            latents = sampler.step(eps, t, latents, eta=eta).prev_sample.to(latents.dtype)
        images = (latents.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return ImagePipelineOutput(images=self.numpy_to_pil(images) if output_type == "pil" else images)
'''


class CanvasMiniPipeline(DiffusionPipeline):
    """Text-to-image with a pixel-space cuig model (Canvas-mini): the prompts encoded exactly as in
    training (:meth:`DiffusionModel.encode_text`, causal mask included), then cuig's DDIM sampler with
    classifier-free guidance (:func:`cuig_lightning.models.diffusion.sample_cfg`)."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 20, guidance_scale: float = 1.5,
                 generator: torch.Generator | None = None, output_type: str = "pil", eta: float = 0.0):
        """Images for ``prompt`` (one per prompt): PIL images (``output_type="pil"``) or an array in [0, 1]."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        # the noise schedule as cuig reads any scheduler folder (DDPM), so sampling matches training and evaluation
        noise = DDPMScheduler.from_config(self.scheduler.config)
        model = DiffusionModel(self.unet, self.text_encoder, self.tokenizer, noise)
        device = next(self.unet.parameters()).device
        cond = model.encode_text(prompts).to(device)
        uncond = model.encode_text([""]).to(device)
        latents = model.sample(cond, uncond, generator or torch.Generator().manual_seed(0),
                               steps=num_inference_steps, guidance=guidance_scale, eta=eta)
        images = model.decode(latents).permute(0, 2, 3, 1).cpu().numpy()
        return ImagePipelineOutput(images=self.numpy_to_pil(images) if output_type == "pil" else images)


def save_pipeline(model: DiffusionModel, out: Path, name: str | None = None) -> None:
    """Save as a loadable diffusers pipeline with the folder's original scheduler class (``name``: the
    folder's final name, when ``out`` is a temporary folder that is renamed afterwards). Every part is saved in
    the UNet's dtype: a run with ``frozen_dtype: bfloat16`` holds its text encoder and VAE in bf16, and a pipeline
    loaded with parts of two dtypes cannot generate (their bf16-rounded weights are what the run used)."""
    parts = dict(unet=model.unet, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                 scheduler=model.original_scheduler())
    frozen = [part for part in (model.text_encoder, model.vae) if part is not None]
    dtypes = [part.dtype for part in frozen]
    try:
        for part in frozen:
            part.to(model.unet.dtype)
        if model.vae is not None:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline(vae=model.vae, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False, **parts)
        else:
            pipe = CanvasMiniPipeline(**parts)
        pipe.save_pretrained(out)
    finally:
        for part, dtype in zip(frozen, dtypes):
            part.to(dtype)
    if model.vae is None:  # plain diffusers loads it with custom_pipeline (the source of this class)
        (out / PIPELINE_FILE).write_text(PIPELINE_SOURCE)
    # the model folder's scheduler config as it was (a class's from_config drops the keys it does not know)
    write_json(model.scheduler_config, out / "scheduler" / "scheduler_config.json")
    _drop_local_paths(out, name or out.name)


def _drop_local_paths(out: Path, name: str) -> None:
    """Configs record where their parts were loaded from (``_name_or_path``): a local path, dropped."""
    for path in out.rglob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "_name_or_path" in data:
            data["_name_or_path"] = name if path.parent == out else path.parent.name
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _describe(entry) -> str:
    if not isinstance(entry, dict):
        return str(entry)
    args = ", ".join(f"{k}={v}" for k, v in (entry.get("init_args") or {}).items())
    return f"{entry.get('class_path')}({args})"


def card_metadata(base: str | None, manifests: list[dict]) -> dict:
    """The model card's metadata (Hugging Face's YAML block): the library that loads it, the base model (the
    model folder's name), tags, and the concepts erased through the exported request, in order."""
    metadata = {"library_name": "diffusers", "pipeline_tag": "text-to-image"}
    if base:
        metadata["base_model"] = base
    metadata["tags"] = list(TAGS)
    metadata["erased_concepts"] = [str(r["target"]) for m in manifests for r in m["request"]]
    return metadata


def model_card(job: dict, manifests: list[dict], loader: str) -> str:
    """What the export is: Hugging Face's YAML metadata block (:func:`card_metadata`), then base model, method,
    regularizers, the concepts erased in order, metrics."""
    config = job.get("config") if isinstance(job.get("config"), dict) else {}
    trainer, model = config.get("trainer") or {}, config.get("model") or {}
    base = Path(str(model.get("model_path", "?"))).name  # the folder's name only: no local path
    last = manifests[-1]
    metadata = yaml.safe_dump(card_metadata(base if model.get("model_path") else None, manifests), sort_keys=False,
                              allow_unicode=True)
    metrics = {k: v for k, v in (last.get("metrics") or {}).items() if not isinstance(v, dict)}  # numbers only
    callbacks = trainer.get("callbacks") or []
    lines = [
        "---",
        metadata.rstrip("\n"),
        "---",
        "",
        f"# cuig export: request {last['index']} of {len(trainer.get('requests') or []) or '?'}",
        "",
        f"- **base model**: `{base}`",
        f"- **method**: `{_describe(model.get('method'))}`, learning rate {model.get('learning_rate')}, "
        f"{trainer.get('max_steps')} steps per request, schedule `{last.get('schedule')}`",
        f"- **regularizers**: {', '.join(f'`{_describe(c)}`' for c in callbacks) or 'none'}",
        "- **erased concepts, in order**: " + ", ".join(
            f"{m['index']}. {' + '.join(r['target'] for r in m['request'])} ({m['request'][-1]['domain']})"
            for m in manifests),
        f"- **metrics after request {last['index']}**: "
        + (", ".join(f"{k} {v}" for k, v in metrics.items()) + f" (evaluation: {describe_protocol(last['metrics'].get('evaluation'))})"
           if metrics else "not evaluated"),
        f"- **made with**: {', '.join(f'{k} {v}' for k, v in (job.get('versions') or {}).items()) or 'unknown'}",
        "",
        "```python",
        loader,
        "```",
        "",
    ]
    return "\n".join(lines)


def export_request(model, run_dir: Path, config: dict, request: int | None, output: Path) -> Path:
    """Save the model after a finished request as a diffusers folder ``output`` (which must not exist or
    be empty). Everything is verified first (the request and those before it: sha256, written by this run),
    then written into a temporary folder beside ``output`` that is renamed to it at the end: a failure
    leaves no output folder behind."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"export folder {output} already exists and is not empty")
    run = RunFolder(run_dir, config)
    manifest = run.load_request(model, request)
    manifests = run.finished_through(manifest["index"])
    job = read_job(run_dir)
    if model.diffusion.vae is not None:
        loader = (f"from diffusers import StableDiffusionPipeline\n"
                  f"pipe = StableDiffusionPipeline.from_pretrained({str(output.name)!r})")
    else:
        loader = (f"from cuig_lightning.export import CanvasMiniPipeline\n"
                  f"pipe = CanvasMiniPipeline.from_pretrained({str(output.name)!r})\n"
                  f"# or with plain diffusers, without cuig (the pipeline's source: {PIPELINE_FILE})\n"
                  f"from diffusers import DiffusionPipeline\n"
                  f"pipe = DiffusionPipeline.from_pretrained({str(output.name)!r}, "
                  f"custom_pipeline={str(output.name + '/' + PIPELINE_FILE)!r}, trust_remote_code=True)")
    loader += '\nimage = pipe("A Cats image in Monet style.").images[0]'
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        staging.mkdir()
        save_pipeline(model.diffusion, staging, name=output.name)
        (staging / CARD).write_text(model_card(job, manifests, loader))
        os.replace(staging, output)  # an empty output folder is replaced; a non-empty one is an error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def evaluate_request(model, run_dir: Path, config: dict, evaluation, request: int) -> dict:
    """Metrics of a finished request (UA / RA-I / RA-C over the concepts its manifest records as erased so
    far, drift, and the evaluation's robustness probes: ASR, relearn_UA), or with ``request == 0`` the base
    model's style/object accuracy over the full grid."""
    probes = evaluation.attack is not None or evaluation.relearn is not None
    if request == 0:
        if probes:
            raise ValueError("the attack and the relearning probe need erased concepts: request 0 is the base model")
        return {"request": 0, **evaluation.base_accuracy(model.diffusion, run_dir / "base_samples.png"),
                "evaluation": evaluation.settings()}
    manifest = RunFolder(run_dir, config).load_request(model, request)
    erased, domain = manifest["erased"], manifest["request"][-1]["domain"]
    if evaluation.attack is not None:  # an unknown attack.concepts name: refused before anything is sampled
        evaluation.attack.targets(erased)
    result = evaluation.evaluate(model.diffusion, erased, domain)
    weights = model.snapshot()
    robustness = measure_robustness(evaluation, model.diffusion, weights, model.base_weights, erased, domain,
                                    lambda probe: True, cache={}) if probes else {}
    return {"request": manifest["index"], "erased": erased, **result, **drift(weights, model.base_weights),
            **robustness, "evaluation": evaluation.settings()}
