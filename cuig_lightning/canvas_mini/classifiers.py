"""Canvas-mini judges: one small CNN for styles, one for objects.

Both take float images ``N x 3 x 32 x 32`` in ``[-1, 1]`` (what the diffusion model samples;
uint8 ``N x 32 x 32 x 3`` arrays are converted by :func:`predict`) and return logits over
``world.STYLE_CLASSES`` (the 48 styles and the neutral look) or ``world.GLYPHS`` (the 20 objects and the 5
categories' looks: an object erased towards its category is then judged as that category, as an erased style is
judged neutral).

They are trained on freshly drawn images (a new batch every step, so no epoch and no
overfitting) with augmentation that imitates a small diffusion model's samples: gaussian noise,
small brightness/contrast/per-channel colour jitter, slight blur or a 2x down/up-sampling.
A judge trained on clean drawings only is too brittle for generated samples.

Stored as ``{kind}.safetensors`` (weights, fp16 by default) plus ``{kind}.json`` (class names,
architecture, training settings, held-out accuracies); nothing is unpickled.

Train from the shell with ``cuig train-classifier --kind style|object`` (the defaults write the
shipped judges under ``cuig_lightning/assets/canvas_mini/classifiers/``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from cuig_lightning.canvas_mini import world
from cuig_lightning.canvas_mini.paths import ASSET_ROOT

Kind = Literal["style", "object"]

#: Where the shipped Canvas-mini judges live.
DEFAULT_DIR = ASSET_ROOT / "classifiers"
#: Seed of the held-out drawings used to report accuracy (never used for training).
EVAL_SEED = 999_983
#: Gaussian noise std (in [-1, 1] units) of the "mild noise" held-out check.
EVAL_NOISE = 0.1


def class_names(kind: Kind) -> list[str]:
    if kind == "style":
        return list(world.STYLE_CLASSES)
    if kind == "object":
        return list(world.GLYPHS)  # the 20 objects and the 5 categories' own looks (ConAbl's object anchors)
    raise ValueError(f"kind must be 'style' or 'object', got {kind!r}")


def _cbr(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ConceptClassifier(nn.Module):
    """A 7-conv CNN (32 -> 16 -> 8 -> 4 px, global average pool, linear head), ~0.24M params at width 24.

    Args:
        num_classes: number of output logits.
        width: channels of the first stage (then 2x, 4x).
        classes: optional class names, kept as plain attribute ``classes`` (not in the state dict).
    """

    def __init__(self, num_classes: int, width: int = 24, classes: list[str] | None = None):
        super().__init__()
        if classes is not None and len(classes) != num_classes:
            raise ValueError("len(classes) must equal num_classes")
        w = width
        self.num_classes = num_classes
        self.width = width
        self.classes = list(classes) if classes is not None else None
        self.features = nn.Sequential(
            *_cbr(3, w), nn.MaxPool2d(2),
            *_cbr(w, 2 * w), *_cbr(2 * w, 2 * w), nn.MaxPool2d(2),
            *_cbr(2 * w, 4 * w), *_cbr(4 * w, 4 * w), nn.MaxPool2d(2),
            *_cbr(4 * w, 4 * w),
        )  # fmt: skip
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.head(h.mean(dim=(2, 3)))


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image 3x3 gaussian blur; sigma: (N,)."""
    n, c, h, w = x.shape
    t = torch.tensor([-1.0, 0.0, 1.0], device=x.device)
    k1 = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(c, 0)[:, None]  # (n*c, 1, 3, 3)
    out = F.conv2d(F.pad(x.reshape(1, n * c, h, w), (1, 1, 1, 1), mode="replicate"), k2, groups=n * c)
    return out.reshape(n, c, h, w)


def augment(x: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Robustness augmentation for images in [-1, 1] (N, 3, H, W); returns a new tensor in [-1, 1].

    Per image: contrast x U(0.8, 1.2) about its mean, brightness +- 0.1, per-channel gain +- 5%
    and offset +- 0.05; with p=0.35 a 3x3 gaussian blur (sigma U(0.4, 0.9)), with p=0.15 a 2x
    average-pool + bilinear upsample; then gaussian noise with std U(0, 0.2) (p=0.8).
    """
    n = x.shape[0]

    def u(*shape: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
        return torch.rand(*shape, generator=gen) * (hi - lo) + lo

    s = strength
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + 0.2 * s * u(n, 1, 1, 1)) + mean
    x = x + 0.1 * s * u(n, 1, 1, 1)
    x = x * (1 + 0.05 * s * u(n, 3, 1, 1)) + 0.05 * s * u(n, 3, 1, 1)

    blur = torch.rand(n, generator=gen) < 0.35 * s
    if blur.any():
        sig = u(int(blur.sum()), lo=0.4, hi=0.9)
        x[blur] = _gaussian_blur(x[blur], sig)
    down = torch.rand(n, generator=gen) < 0.15 * s
    if down.any():
        x[down] = F.interpolate(F.avg_pool2d(x[down], 2), scale_factor=2, mode="bilinear", align_corners=False)

    noisy = (torch.rand(n, 1, 1, 1, generator=gen) < 0.8 * s).float()
    std = 0.2 * s * torch.rand(n, 1, 1, 1, generator=gen) * noisy
    x = x + std * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


# --------------------------------------------------------------------------------------------
# Inference, evaluation, storage
# --------------------------------------------------------------------------------------------


def _as_input(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError("numpy images must be uint8 (N, H, W, 3); pass float tensors in [-1, 1] as torch")
        return world.to_tensor(images)
    return images.float()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor | np.ndarray, batch_size: int = 1024) -> torch.Tensor:
    """Predicted class indices (int64, on CPU) for float ``(N, 3, 32, 32)`` in [-1, 1] or uint8 ``(N, 32, 32, 3)``."""
    x = _as_input(images)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def held_out_accuracy(
    model: nn.Module, kind: Kind, n_per_class: int = 10, seed: int = EVAL_SEED, noise_std: float = 0.0, blur_sigma: float = 0.0
) -> float:
    """Accuracy on ``n_per_class`` fresh drawings of every (style class, glyph) pair, optionally noised/blurred."""
    images, style_idx, object_idx = world.make_dataset(n_per_class, seed, objects=world.GLYPHS)
    x = world.to_tensor(images)
    gen = torch.Generator().manual_seed(seed)
    if blur_sigma > 0:
        x = _gaussian_blur(x, torch.full((len(x),), float(blur_sigma)))
    if noise_std > 0:
        x = (x + noise_std * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    target = torch.from_numpy(style_idx if kind == "style" else object_idx)
    return (predict(model, x) == target).float().mean().item()


def save_classifier(
    model: ConceptClassifier, directory: str | Path, kind: Kind, info: dict | None = None, half: bool = True
) -> Path:
    """Write ``{kind}.safetensors`` (+ ``{kind}.json``) into ``directory``; returns the weights path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    state = {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    path = directory / f"{kind}.safetensors"
    save_file(state, str(path), metadata={"kind": kind, "format": "cuig-canvas-mini-classifier"})
    path.chmod(0o644)  # safetensors writes 0600
    meta = {
        "kind": kind,
        "classes": model.classes if model.classes is not None else class_names(kind),
        "num_classes": model.num_classes,
        "width": model.width,
        "dtype": str(dtype).replace("torch.", ""),
        "input": "float32 N x 3 x 32 x 32 in [-1, 1] (world.to_tensor)",
        "params": sum(p.numel() for p in model.parameters()),
        **(info or {}),
    }
    (directory / f"{kind}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_classifier(kind: Kind, directory: str | Path | None = None, device: str | torch.device = "cpu") -> ConceptClassifier:
    """Load a judge saved by :func:`save_classifier` (float32, eval mode, ``.classes`` set)."""
    directory = Path(directory) if directory is not None else DEFAULT_DIR
    meta_path, weights_path = directory / f"{kind}.json", directory / f"{kind}.safetensors"
    if not meta_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"no {kind} classifier in {directory}; train one with "
            f"`cuig train-classifier --kind {kind} --out_dir {directory}`"
        )
    meta = json.loads(meta_path.read_text())
    model = ConceptClassifier(meta["num_classes"], width=meta["width"], classes=meta["classes"])
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(weights_path)).items()}
    model.load_state_dict(state)
    return model.to(device).eval()


class CanvasClassifiers:
    """The Canvas-mini style and object judges as the evaluation protocol reads them (images in [0, 1], 32×32):
    :class:`cuig_lightning.evaluation.classifiers.Classifiers`, the ``canvas-mini`` classifier kind."""

    def __init__(self, directory: str | Path | None = None):
        self.style = load_classifier("style", directory)
        self.object = load_classifier("object", directory)
        self.styles, self.objects = list(self.style.classes), list(self.object.classes)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images * 2 - 1
        return predict(self.style, x), predict(self.object, x)

    @torch.no_grad()
    def style_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """The style classifier's softmax over :attr:`styles`, one row per image."""
        return torch.softmax(self.style(images * 2 - 1), dim=-1)

    def to(self, device: torch.device | str) -> CanvasClassifiers:
        """Stay on the CPU, wherever the model is: Canvas-mini's reported numbers were classified there."""
        return self

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] as the classifiers read them: Canvas-mini's 32x32 samples, unchanged."""
        return images


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train_classifier(
    kind: Kind,
    steps: int = 400,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    width: int = 24,
    out_dir: str | Path | None = None,
    eval_per_class: int = 10,
    half: bool = True,
    progress: bool = True,
    num_threads: int | None = None,
) -> tuple[ConceptClassifier, dict]:
    """Train a style or object judge on freshly drawn, augmented Canvas-mini images.

    Every step draws ``batch_size`` images with uniformly random (style, object) labels. AdamW,
    one-cycle LR (10% warm-up, cosine decay), label smoothing 0.05. After training, reports
    held-out accuracy on ``eval_per_class`` drawings per (style, object) pair from ``EVAL_SEED``:
    clean, with gaussian noise std ``EVAL_NOISE`` and with a 3x3 blur (sigma 0.7). With
    ``out_dir`` the model is saved there (:func:`save_classifier`), and the accuracies reported
    are those of the saved (e.g. fp16-rounded) weights.

    Returns ``(model, report)``; ``report`` has ``acc_clean``, ``acc_noise``, ``acc_blur``,
    ``seconds`` and the settings.
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    classes = class_names(kind)
    torch.manual_seed(seed)
    model = ConceptClassifier(len(classes), width=width, classes=classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1, anneal_strategy="cos"
    )
    rng = np.random.default_rng([seed, 1])
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(range(steps), desc=f"train {kind} classifier", disable=not progress, dynamic_ncols=True)
    ema = None
    for step in bar:
        images, s_idx, o_idx = world.sample_batch(batch_size, rng, neutral_share=1 / len(world.STYLE_CLASSES),
                                                  category_share=len(world.CATEGORIES) / len(world.GLYPHS))
        x = augment(world.to_tensor(images), gen)
        y = torch.from_numpy(s_idx if kind == "style" else o_idx)
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        acc = (logits.argmax(1) == y).float().mean().item()
        ema = acc if ema is None else 0.9 * ema + 0.1 * acc
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{ema:.3f}")
    train_seconds = time.perf_counter() - t0
    model.eval()

    report = {
        "train": {
            "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
            "width": width, "seconds": round(train_seconds, 1), "torch_threads": torch.get_num_threads(),
        },
    }  # fmt: skip
    judged = model
    if out_dir is not None:
        save_classifier(model, out_dir, kind, info=report, half=half)
        judged = load_classifier(kind, out_dir)
    report["held_out"] = {
        "n_images": eval_per_class * len(world.STYLE_CLASSES) * len(world.GLYPHS),
        "seed": EVAL_SEED,
        "acc_clean": held_out_accuracy(judged, kind, eval_per_class),
        "acc_noise": held_out_accuracy(judged, kind, eval_per_class, noise_std=EVAL_NOISE),
        "acc_blur": held_out_accuracy(judged, kind, eval_per_class, blur_sigma=0.7),
        "noise_std": EVAL_NOISE,
        "blur_sigma": 0.7,
    }
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if out_dir is not None:  # rewrite the JSON with the held-out accuracies
        save_classifier(model, out_dir, kind, info=report, half=half)
    return model, report
