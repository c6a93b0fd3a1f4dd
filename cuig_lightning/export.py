"""Use a finished request of a run: export it as a diffusers folder that loads with one call, or evaluate it.

An export is self-contained: real files (no links into a wheel or a cache), the model folder's own
scheduler class, no absolute local paths, and a model card (``README.md``) saying what was erased.

* Stable Diffusion (a VAE): ``StableDiffusionPipeline.from_pretrained(OUT)``.
* Canvas-mini and other pixel-space models: ``CanvasMiniPipeline.from_pretrained(OUT)``
  (``from cuig_lightning.export import CanvasMiniPipeline``), recorded in ``model_index.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput

from cuig_lightning.checkpoints import write_json
from cuig_lightning.evaluation.protocol import describe_protocol, drift
from cuig_lightning.models.diffusion import DiffusionModel
from cuig_lightning.run_folder import RunFolder, read_job

CARD = "README.md"


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
    folder's final name, when ``out`` is a temporary folder that is renamed afterwards)."""
    parts = dict(unet=model.unet, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                 scheduler=model.original_scheduler())
    if model.vae is not None:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=model.vae, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **parts)
    else:
        pipe = CanvasMiniPipeline(**parts)
    pipe.save_pretrained(out)
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


def model_card(job: dict, manifests: list[dict], loader: str) -> str:
    """What the export is: base model, method, regularizers, the concepts erased in order, metrics."""
    config = job.get("config") if isinstance(job.get("config"), dict) else {}
    trainer, model = config.get("trainer") or {}, config.get("model") or {}
    base = Path(str(model.get("model_path", "?"))).name  # the folder's name only: no local path
    last = manifests[-1]
    metrics = {k: v for k, v in (last.get("metrics") or {}).items() if k not in ("per_concept", "evaluation")}
    callbacks = trainer.get("callbacks") or []
    lines = [
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
                  f"pipe = CanvasMiniPipeline.from_pretrained({str(output.name)!r})")
    loader += '\nimage = pipe("A Circle image in Monet style.").images[0]'
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
    far, drift), or with ``request == 0`` the base model's style/object accuracy over the full grid."""
    if request == 0:
        return {"request": 0, **evaluation.base_accuracy(model.diffusion, run_dir / "base_samples.png"),
                "evaluation": evaluation.settings()}
    manifest = RunFolder(run_dir, config).load_request(model, request)
    erased, domain = manifest["erased"], manifest["request"][-1]["domain"]
    result = evaluation.evaluate(model.diffusion, erased, domain)
    return {"request": manifest["index"], "erased": erased, **result, **drift(model.snapshot(), model.base_weights),
            "evaluation": evaluation.settings()}
