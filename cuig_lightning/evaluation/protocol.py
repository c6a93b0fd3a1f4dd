"""The UnlearnCanvas evaluation protocol: generate the grid, classify it, compute UA / RA-I / RA-C and drift.

Knows the prompts, seeds, sampler settings and classifiers; knows nothing of training. The continual
trainer calls :meth:`Evaluation.evaluate` after every request; ``cuig evaluate`` calls it for any saved
request or for the base model (``request 0``: plain style/object accuracy over the full grid).
Classifiers of any registered kind judge the images (:class:`~cuig_lightning.evaluation.classifiers.Classifiers`,
found by ``classifier_kind``): the embedded world's (``canvas-mini``, registered by its package) and UnlearnCanvas'
ViTs for Stable Diffusion (:class:`cuig_lightning.evaluation.unlearncanvas.UnlearnCanvasClassifiers`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from cuig_lightning.evaluation import unlearncanvas  # noqa: F401  (registers the unlearncanvas classifier kind)
from cuig_lightning.evaluation.classifiers import Classifiers, load_classifiers
from cuig_lightning.evaluation.metrics import unlearn_accuracy, unlearncanvas_metrics
from cuig_lightning.evaluation.robustness_options import Attack, Relearn
from cuig_lightning.models.diffusion import SAMPLERS, DiffusionModel, Sampler, sample_cfg, sampling_scheduler
from cuig_lightning.progress import progress
from cuig_lightning.requests import NEUTRAL_STYLE, caption

UNLEARNCANVAS_SEEDS = [188, 288, 588, 688, 888]

ClassifierKind = Literal["canvas-mini", "unlearncanvas"]
#: Each classifier kind's sampling protocol: what ``seeds`` / ``sampler`` / ``steps`` / ``guidance`` left unset
#: mean. Canvas-mini: 2 seeds, DDIM 20, guidance 1.5 (its base model is most accurate there); UnlearnCanvas on
#: SD-1.5: its 5 seeds, DDIM 100, guidance 9 (docs/method.md, as UnlearnCanvas' sampling scripts).
PROTOCOLS: dict[str, dict] = {
    "canvas-mini": {"seeds": UNLEARNCANVAS_SEEDS[:2], "sampler": "ddim", "steps": 20, "guidance": 1.5},
    "unlearncanvas": {"seeds": UNLEARNCANVAS_SEEDS, "sampler": "ddim", "steps": 100, "guidance": 9.0},
}
#: What a sampler is called in reports.
SAMPLER_NAMES = {"ddim": "DDIM", "dpm_solver": "DPM-Solver++ 2M", "unipc": "UniPC"}
#: Images the VAE decodes at once: SD's 512x512 decoder activations are large, and sampling batches may not be.
DECODE_BATCH = 8


def describe_protocol(settings: dict | None) -> str:
    """An evaluation's recorded settings (:meth:`Evaluation.settings`) in words, e.g. "DPM-Solver++ 2M 8 steps,
    guidance 1.5, seeds 188, 288, 588" (runs evaluated before settings were recorded: DDIM, unrecorded steps)."""
    if not settings:
        return "not recorded (DDIM; before cuig recorded evaluation settings)"
    seeds = ", ".join(str(s) for s in settings.get("seeds", []))
    return (f"{SAMPLER_NAMES.get(settings.get('sampler'), settings.get('sampler'))} {settings.get('steps')} steps, "
            f"guidance {settings.get('guidance'):g}, seeds {seeds}")


def drift(weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖θ − θ0‖ over the trainable tensors, absolute and relative to ‖θ0‖."""
    diff = sum(float((weights[k].double() - base[k].double()).pow(2).sum()) for k in base) ** 0.5
    norm = sum(float(base[k].double().pow(2).sum()) for k in base) ** 0.5
    return {"drift": diff, "drift_rel": diff / norm if norm else float("nan")}


class Evaluation:
    """UA / RA-I / RA-C after each request, on the grid "A {object} image in {style} style." × seeds.

    The classifiers are Canvas-mini's (``classifier_kind: canvas-mini``, the default: ``classifiers`` names
    them) or UnlearnCanvas' ViT-L pair for SD-1.5 (``classifier_kind: unlearncanvas``: ``style_classifier``
    and ``object_classifier`` name the two files). Every concept evaluated (retain sets, erased targets) must
    be one of the classifiers' classes: :meth:`check_vocabulary` says which are not before anything is sampled.

    Args:
        classifiers: folder of the Canvas-mini style/object classifiers (``canvas-mini``: the shipped ones);
            only with classifier_kind canvas-mini.
        classifier_kind: ``canvas-mini`` or ``unlearncanvas`` (UnlearnCanvas' 51-style / 20-object ViTs). It
            also sets what unset seeds, steps and guidance mean (:data:`PROTOCOLS`).
        style_classifier: UnlearnCanvas' style classifier checkpoint (``style50.pth``, weights under
            ``model_state_dict``; or ``.safetensors``); required with classifier_kind unlearncanvas.
        object_classifier: UnlearnCanvas' object classifier checkpoint (``style50_cls.pth`` or
            ``.safetensors``); required with classifier_kind unlearncanvas.
        retain_styles: the retained styles (RA-I of style requests, RA-C of object requests); required.
        retain_objects: the retained objects (RA-C of style requests, RA-I of object requests); required.
        seeds: one image per prompt and seed (unset: canvas-mini 188, 288; unlearncanvas 188, 288, 588,
            688, 888).
        sampler: the evaluation sampler: ``ddim`` (unset: both kinds' protocol), ``dpm_solver`` (diffusers'
            DPM-Solver++ 2M) or ``unipc`` (UniPC), the multistep solvers reaching DDIM's images in fewer steps.
            Part of the recorded evaluation settings (:meth:`settings`), not of the run identity.
        steps: sampler steps (unset: canvas-mini 20, unlearncanvas 100).
        guidance: classifier-free guidance of the evaluation sampler (unset: canvas-mini 1.5, where the
            base Canvas-mini model is most accurate; unlearncanvas 9).
        batch_size: images sampled at once (one seed per batch with canvas-mini, (seed, prompt) images across
            seeds with unlearncanvas), and images classified at once by UnlearnCanvas' classifiers.
        save_samples: write a PNG grid of the first seed's images into each request folder.
        bf16: sample under bfloat16 autocast (about 2.5x faster on CPUs with bf16 support).
        attack: the soft-prompt attack and paraphrases on the erased concepts (ASR; None: not run; robustness.py).
        relearn: the relearning probe (relearn_UA; None: not run; robustness.py).
    """

    def __init__(
        self,
        classifiers: str = "canvas-mini",
        classifier_kind: ClassifierKind = "canvas-mini",
        style_classifier: str | None = None,
        object_classifier: str | None = None,
        retain_styles: list[str] | None = None,
        retain_objects: list[str] | None = None,
        seeds: list[int] | None = None,
        sampler: Sampler | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        batch_size: int = 96,
        save_samples: bool = True,
        bf16: bool = True,
        attack: Attack | None = None,
        relearn: Relearn | None = None,
    ):
        if classifier_kind not in PROTOCOLS:
            raise ValueError(f"trainer.evaluation.classifier_kind must be one of {', '.join(PROTOCOLS)}, "
                             f"got {classifier_kind!r}")
        if classifier_kind == "unlearncanvas" and (style_classifier is None or object_classifier is None):
            raise ValueError("trainer.evaluation.classifier_kind unlearncanvas needs style_classifier and "
                             "object_classifier (UnlearnCanvas' classifier checkpoints)")
        if classifier_kind == "unlearncanvas" and classifiers != "canvas-mini":
            raise ValueError("trainer.evaluation.classifiers names Canvas-mini classifiers; with classifier_kind "
                             "unlearncanvas set style_classifier and object_classifier instead")
        if classifier_kind == "canvas-mini" and (style_classifier is not None or object_classifier is not None):
            raise ValueError("trainer.evaluation.style_classifier and object_classifier are UnlearnCanvas "
                             "checkpoints: set classifier_kind: unlearncanvas (or leave them unset)")
        protocol = PROTOCOLS[classifier_kind]
        steps = protocol["steps"] if steps is None else steps
        sampler = protocol["sampler"] if sampler is None else sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"trainer.evaluation.sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if seeds is not None and not seeds:
            raise ValueError("trainer.evaluation.seeds is empty: give at least one seed (or evaluation: null)")
        if steps < 1 or batch_size < 1:
            raise ValueError(f"trainer.evaluation.steps and batch_size must be >= 1, got {steps} and {batch_size}")
        self.classifiers_spec = classifiers
        self.classifier_kind = classifier_kind
        self.classifier_files = {"style": style_classifier, "object": object_classifier}
        self.retain = {"style": list(retain_styles or []), "object": list(retain_objects or [])}
        self.seeds = list(seeds if seeds is not None else protocol["seeds"])
        self.sampler, self.steps, self.batch_size = sampler, steps, batch_size
        self.guidance = protocol["guidance"] if guidance is None else guidance
        self.save_samples = save_samples
        self.bf16, self.attack, self.relearn = bf16, attack, relearn
        self._classifiers: Classifiers | None = None

    def settings(self) -> dict:
        """What decides the evaluation's images (recorded beside every request's metrics): sampler, steps,
        guidance, seeds, bf16 autocast."""
        return {"sampler": self.sampler, "steps": self.steps, "guidance": self.guidance, "seeds": list(self.seeds),
                "bf16": self.bf16}

    @property
    def classifiers(self) -> Classifiers:
        """The style and object classifiers of :attr:`classifier_kind`, made by the factory registered for it
        (:func:`~cuig_lightning.evaluation.classifiers.load_classifiers`), loaded on first use (a missing or unfit
        file is an error here)."""
        if self._classifiers is None:
            files = self.classifier_files
            self._classifiers = load_classifiers(self.classifier_kind, classifiers=self.classifiers_spec,
                                                 style_classifier=files["style"], object_classifier=files["object"],
                                                 batch_size=self.batch_size)
        return self._classifiers

    def classifiers_for(self, model: DiffusionModel) -> Classifiers:
        """The classifiers, on the model's device where they follow it (UnlearnCanvas' ViTs do)."""
        return self.classifiers.to(next(model.unet.parameters()).device)

    def check_vocabulary(self, concepts: dict[str, list[str]] | None = None) -> None:
        """Raise ValueError unless the classifiers have a class for every retain concept and every concept
        in ``concepts`` (``{"style": [...], "object": [...]}``, e.g. a job's targets): never a silent miss."""
        clf = self.classifiers
        for domain, classes in (("style", clf.styles), ("object", clf.objects)):
            wanted = self.retain[domain] + list((concepts or {}).get(domain, []))
            unknown = list(dict.fromkeys(c for c in wanted if c not in classes))
            if unknown:
                raise ValueError(f"the {self.classifier_kind} {domain} classifier has no class for "
                                 f"{', '.join(unknown)}; retained and erased concepts must be among its "
                                 f"{len(classes)} classes")

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, model: DiffusionModel, pairs: list[tuple[str, str]], seeds: list[int] | None = None,
                 cond: torch.Tensor | None = None, latents: bool = False,
                 grid: list[tuple[str, str]] | None = None) -> torch.Tensor:
        """Images in [0, 1] as the classifiers read them (:meth:`Classifiers.prepare`: SD's 512x512
        images are shrunk batch by batch, so a 5-seed grid fits in memory), seed-major then pair, one per
        (seed, pair); ``seeds``: these instead of :attr:`seeds` (a seed's images do not depend on the others).
        ``cond``: one text state per pair instead of its caption's (the soft-prompt attack's);
        ``latents``: the sampled latents (float32, before decoding) instead of images; ``grid``: the grid the
        pairs are a part of (in its order): each keeps its noise there, so the stop rule's UA is the evaluation's.

        Each image's starting noise is drawn as it always was: one generator per seed, drawn from in chunks
        of ``batch_size`` prompts in order. UnlearnCanvas' grid is then sampled ``batch_size`` (seed, prompt)
        images at a time across seeds; Canvas-mini keeps one seed per batch, the batches its reported numbers
        were sampled in (a batch's size can change float rounding).
        """
        device = next(model.unet.parameters()).device
        clf = self.classifiers
        was_training = model.unet.training
        model.unet.eval()
        cond_all = (model.encode_text([caption(s, o) for s, o in pairs]) if cond is None else cond).to(device)
        uncond = model.encode_text([""]).to(device)
        seeds = self.seeds if seeds is None else seeds
        place, n_noise = (_places(pairs, grid), len(grid)) if grid is not None else (slice(None), len(pairs))
        noise = torch.cat([self._seed_noise(seed, n_noise, model.latent_shape)[place] for seed in seeds])
        pair_index = torch.arange(len(pairs)).repeat(len(seeds))  # job j: seed j // len(pairs), pair_index[j]
        jobs = torch.arange(len(noise))
        groups = jobs.split(len(pairs)) if self.classifier_kind == "canvas-mini" else [jobs]
        batches = [batch for group in groups for batch in group.split(self.batch_size)]
        images = []
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            for batch in progress(batches, f"evaluation ({len(pairs)} prompts x {len(seeds)} seeds)"):
                scheduler = sampling_scheduler(model.scheduler, self.steps, self.sampler)
                batch_cond = cond_all[pair_index[batch].to(device)]
                sampled = sample_cfg(model.unet, scheduler, noise[batch].to(device), batch_cond, uncond, self.guidance)[0]
                if latents:
                    images.append(sampled.float().cpu())
                else:
                    images += [clf.prepare(model.decode(part.float()).float()).cpu()
                               for part in sampled.split(DECODE_BATCH)]
        model.unet.train(was_training)
        return torch.cat(images)

    def _seed_noise(self, seed: int, n: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The starting noise of ``n`` prompts under one seed: one generator, drawn in chunks of ``batch_size``."""
        g, step = torch.Generator().manual_seed(seed), self.batch_size
        sizes = [min(step, n - start) for start in range(0, n, step)]
        return torch.cat([torch.randn((size, *shape), generator=g, dtype=torch.float32) for size in sizes])

    def grid(self, erased: list[str], domain: str) -> list[tuple[str, str]]:
        """(style, object) pairs: erased + retain concepts of the domain × the other domain's retain set."""
        missing = [d for d in ("style", "object") if not self.retain[d]]
        if missing:
            raise ValueError(f"evaluation needs retain sets: set trainer.evaluation.retain_{missing[0]}s")
        self.check_vocabulary({domain: erased})
        if domain == "style":
            return [(s, o) for s in erased + self.retain["style"] for o in self.retain["object"]]
        return [(s, o) for s in self.retain["style"] for o in erased + self.retain["object"]]

    # ------------------------------------------------------------------ metrics
    def evaluate(self, model: DiffusionModel, erased: list[str], domain: str, sample_path: Path | None = None,
                 seeds: list[int] | None = None) -> dict:
        """UA / RA-I / RA-C (percent) of the model with ``erased`` concepts (all of one domain), from
        ``seeds`` (default: :attr:`seeds`)."""
        clf = self.classifiers_for(model)
        pairs = self.grid(erased, domain)
        seeds = self.seeds if seeds is None else seeds
        images = self.generate(model, pairs, seeds)
        pred_style, pred_object = clf.predict(images)
        n = len(seeds)
        prompt_style = torch.tensor([clf.styles.index(s) for s, _ in pairs] * n)
        prompt_object = torch.tensor([clf.objects.index(o) for _, o in pairs] * n)
        other = "object" if domain == "style" else "style"
        metrics = unlearncanvas_metrics(
            prompt_style, prompt_object, pred_style, pred_object, domain=domain, erased=erased,
            retain=self.retain[domain], cross_retain=self.retain[other], styles=clf.styles, objects=clf.objects,
        )
        if sample_path is not None and self.save_samples:
            styles = list(dict.fromkeys(s for s, _ in pairs))
            objects = list(dict.fromkeys(o for _, o in pairs))
            save_image_grid(images[: len(pairs)], styles, objects, sample_path, erased)
        return metrics

    def unlearn_accuracy(self, model: DiffusionModel, erased: list[str], domain: str,
                         seeds: list[int] | None = None) -> float:
        """UA alone (percent): only the erased concepts' part of the grid is sampled (the stop rule's check),
        from ``seeds`` (default: :attr:`seeds`)."""
        clf = self.classifiers_for(model)
        seeds = self.seeds if seeds is None else seeds
        side, vocab = (0, clf.styles) if domain == "style" else (1, clf.objects)  # a pair is (style, object)
        grid = self.grid(erased, domain)  # an object grid interleaves erased and retained objects: keep their noise
        pairs = [p for p in grid if p[side] in erased]
        pred = clf.predict(self.generate(model, pairs, seeds, grid=grid))[side]
        prompted = torch.tensor([vocab.index(p[side]) for p in pairs] * len(seeds))
        return unlearn_accuracy(prompted, pred, [vocab.index(c) for c in erased], len(vocab))

    def base_accuracy(self, model: DiffusionModel, sample_path: Path | None = None) -> dict:
        """Style and object accuracy (percent) over every style class × every object (the base-model check).

        A style class without a style (Canvas-mini's neutral look) is prompted without one and counts
        apart, as ``neutral_accuracy``.
        """
        clf = self.classifiers_for(model)
        pairs = [(s, o) for s in clf.styles for o in clf.objects]
        images = self.generate(model, pairs)
        pred_style, pred_object = clf.predict(images)
        n = len(self.seeds)
        true_style = torch.tensor([clf.styles.index(s) for s, _ in pairs] * n)
        true_object = torch.tensor([clf.objects.index(o) for _, o in pairs] * n)
        style_ok, object_ok = pred_style == true_style, pred_object == true_object
        styled = torch.tensor([s != NEUTRAL_STYLE for s, _ in pairs] * n)
        if sample_path is not None and self.save_samples:
            save_image_grid(images[: len(pairs)], clf.styles, clf.objects, sample_path)
        per_style = {s: 100.0 * float(style_ok[true_style == i].float().mean()) for i, s in enumerate(clf.styles)}
        result = {
            "style_accuracy": 100.0 * float(style_ok[styled].float().mean()),
            "object_accuracy": 100.0 * float(object_ok.float().mean()),
            "n_images": len(images),
            "per_style": per_style,
            "per_object": {o: 100.0 * float(object_ok[true_object == i].float().mean()) for i, o in enumerate(clf.objects)},
        }
        if not bool(styled.all()):
            result["neutral_accuracy"] = per_style[NEUTRAL_STYLE]
        return result


def save_image_grid(images: torch.Tensor, rows: list[str], cols: list[str], path: Path,
                    erased: list[str] = ()) -> None:
    """Write images (N, 3, H, W) in [0, 1], row-major, as a PNG grid with its row and column names; rows and
    columns of erased concepts are labelled "(erased)" in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, _, h, w = images.shape
    canvas = np.ones((len(rows) * (h + 1), len(cols) * (w + 1), 3), dtype=np.float32)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()[: len(rows) * len(cols)]):
        r, c = divmod(i, len(cols))
        canvas[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = img
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(cols), 0.6 + 0.45 * len(rows)))
    ax.imshow(canvas, interpolation="nearest")

    def labels(names, size):
        return [n + (" (erased)" if n in erased else "") for n in names], [(i + 0.5) * (size + 1) - 1 for i in range(len(names))]

    text, at = labels(rows, h)
    ax.set_yticks(at, text, fontsize=7)
    for tick, name in zip(ax.get_yticklabels(), rows):
        tick.set_color("red" if name in erased else "black")
    text, at = labels(cols, w)
    ax.set_xticks(at, text, fontsize=7, rotation=60, ha="right")
    for tick, name in zip(ax.get_xticklabels(), cols):
        tick.set_color("red" if name in erased else "black")
    ax.tick_params(length=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _places(pairs: list[tuple[str, str]], grid: list[tuple[str, str]]) -> torch.Tensor:
    """Where ``pairs`` sit in ``grid`` (a part of it, in its order; a pair listed twice is two places)."""
    places, j = [], 0
    for i, pair in enumerate(grid):
        if j < len(pairs) and pair == pairs[j]:
            places.append(i)
            j += 1
    if j < len(pairs):
        raise ValueError(f"pairs are not a part of the grid in its order (from {pairs[j]})")
    return torch.tensor(places)
