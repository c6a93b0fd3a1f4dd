"""UnlearnCanvas' style and object classifiers (ViT-L/16, trained by the benchmark's authors), loaded without timm.

UnlearnCanvas judges every generated image with two timm ``vit_large_patch16_224.augreg_in21k`` networks whose
head is replaced by ``Linear(1024, 51)`` (styles) or ``Linear(1024, 20)`` (objects); their weights are stored
under ``model_state_dict`` in a torch pickle (upstream names ``cls_model/style50.pth`` and
``cls_model/style50_cls.pth``). Here the same network is plain torch: timm's VisionTransformer blocks are
``nn.TransformerEncoderLayer`` (pre-norm, LayerNorm eps 1e-6, exact GELU; its packed ``in_proj`` is timm's
``qkv``), so timm's state dict loads after renaming a few keys. The architecture (width, depth, patch and
image size, classes; heads = width / 64 as in every timm ViT) is read from the weights' shapes, so a tiny ViT
saved in the same layout loads too. Files are read as weights only (safetensors, or
``torch.load(weights_only=True)``, which unpickles tensors and plain containers only).

From the UnlearnCanvas repository (github.com/OPTML-Group/UnlearnCanvas):

* the class-index order of the two heads is ``theme_available`` (50 styles and ``Seed_Images``, the
  dataset's unstylized photos, alphabetically: 51) and ``class_available`` (20 objects) in
  ``machine_unlearning/evaluation/constants/const.py``;
* the input is ``transforms.Resize((224, 224))`` (PIL bilinear, antialiased) of the 8-bit image the
  sampling script saved, then ``ToTensor()`` and ``Normalize([0.5], [0.5])``
  (``machine_unlearning/evaluation/quantitative/accuracy.py``). :meth:`UnlearnCanvasClassifiers.prepare`
  does the same on tensors (8-bit levels, antialiased bilinear resize: PIL's to within one level, 8-bit
  levels); the JPEG round trip of the saved images is not reproduced.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from cuig_lightning.checkpoints import save_tensors
from cuig_lightning.evaluation.classifiers import register_classifiers

#: The style classifier's classes in head order (UnlearnCanvas ``theme_available``).
STYLES: list[str] = [
    "Abstractionism", "Artist_Sketch", "Blossom_Season", "Bricks", "Byzantine", "Cartoon", "Cold_Warm",
    "Color_Fantasy", "Comic_Etch", "Crayon", "Cubism", "Dadaism", "Dapple", "Defoliation", "Early_Autumn",
    "Expressionism", "Fauvism", "French", "Glowing_Sunset", "Gorgeous_Love", "Greenfield", "Impressionism",
    "Ink_Art", "Joy", "Liquid_Dreams", "Magic_Cube", "Meta_Physics", "Meteor_Shower", "Monet", "Mosaic",
    "Neon_Lines", "On_Fire", "Pastel", "Pencil_Drawing", "Picasso", "Pop_Art", "Red_Blue_Ink", "Rust",
    "Seed_Images", "Sketch", "Sponge_Dabbed", "Structuralism", "Superstring", "Surrealism", "Ukiyoe", "Van_Gogh",
    "Vibrant_Flow", "Warm_Love", "Warm_Smear", "Watercolor", "Winter",
]  # fmt: skip
#: The object classifier's classes in head order (UnlearnCanvas ``class_available``).
OBJECTS: list[str] = [
    "Architectures", "Bears", "Birds", "Butterfly", "Cats", "Dogs", "Fishes", "Flame", "Flowers", "Frogs", "Horses",
    "Human", "Jellyfish", "Rabbits", "Sandwiches", "Sea", "Statues", "Towers", "Trees", "Waterfalls",
]  # fmt: skip
assert len(STYLES) == 51 and len(OBJECTS) == 20

#: The shape of UnlearnCanvas' classifiers (timm ``vit_large_patch16_224``), as :func:`timm_vit_state` takes it.
VIT_L16 = {"width": 1024, "depth": 24, "patch": 16, "image_size": 224}

#: timm's names inside a block -> nn.TransformerEncoderLayer's (norm1 / norm2 are the same).
_BLOCK_RENAMES = {"attn.qkv.": "self_attn.in_proj_", "attn.proj.": "self_attn.out_proj.", "mlp.fc1.": "linear1.",
                  "mlp.fc2.": "linear2."}
_REQUIRED_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "norm.weight",
                  "head.weight")


class ViTClassifier(nn.Module):
    """timm's VisionTransformer as UnlearnCanvas uses it: patch embedding, class token and learned position
    embedding (the class token's included), pre-norm blocks, final LayerNorm, linear head on the class token.
    Takes images normalized to [-1, 1] at ``image_size``; returns logits."""

    def __init__(self, width: int, depth: int, mlp_width: int, patch: int, image_size: int, num_classes: int):
        super().__init__()
        self.image_size = image_size
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, width))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, width // 64, mlp_width, dropout=0.0, activation="gelu",
                                       layer_norm_eps=1e-6, batch_first=True, norm_first=True)
            for _ in range(depth)
        )  # fmt: skip
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))

    @classmethod
    def from_timm(cls, state: dict[str, torch.Tensor], where: str) -> "ViTClassifier":
        """The network of a timm ViT state dict, its architecture read from the tensors' shapes."""
        missing = [k for k in _REQUIRED_KEYS if k not in state]
        if missing:
            raise ValueError(f"{where} is not a timm ViT state dict: no {', '.join(missing)}")
        width, patches = state["cls_token"].shape[-1], state["pos_embed"].shape[1] - 1
        patch, side = state["patch_embed.proj.weight"].shape[-1], math.isqrt(patches)
        if width % 64:
            raise ValueError(f"{where}: width {width} is not a multiple of 64 (timm ViTs have 64-wide heads)")
        if side * side != patches:
            raise ValueError(f"{where}: {patches} position embeddings do not make a square patch grid")
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        model = cls(width, depth, state["blocks.0.mlp.fc1.weight"].shape[0], patch, side * patch,
                    state["head.weight"].shape[0])
        renamed = {}
        for key, value in state.items():
            key = key.replace("patch_embed.proj.", "patch_embed.")
            for timm_name, torch_name in _BLOCK_RENAMES.items():
                key = key.replace(timm_name, torch_name)
            renamed[key] = value
        try:
            model.load_state_dict(renamed)
        except RuntimeError as err:
            reason = "; ".join(line.strip() for line in str(err).splitlines()[1:])
            raise ValueError(f"{where} does not fit a timm ViT: {reason}") from None
        return model.eval()


def read_timm_state(path: Path, where: str) -> dict[str, torch.Tensor]:
    """The state dict of a classifier file: a ``.safetensors`` file, or a torch pickle holding it under
    ``model_state_dict`` (UnlearnCanvas' layout) or as its whole content; read as weights only."""
    if not path.is_file():
        raise FileNotFoundError(f"{where} {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # it holds objects besides tensors: unpickling them could run code
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        raise ValueError(f"{where} {path} cannot be read as weights only: it pickles "
                         f"{found.group(1) if found else 'more than tensors'}; save its model_state_dict as "
                         f".safetensors") from None
    except Exception as err:  # a truncated or foreign file: the file, not the code, is at fault
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise ValueError(f"{where} {path} cannot be read as weights only: {reason}") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model_state_dict"), dict):
        checkpoint = checkpoint["model_state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{where} {path} holds no state dict (expected tensors under 'model_state_dict')")
    return checkpoint


def timm_vit_state(num_classes: int, width: int = 64, depth: int = 1, patch: int = 4, image_size: int = 16,
                   seed: int = 0, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Random weights of a timm VisionTransformer (class token, pre-norm blocks, MLP ratio 4) under timm's names:
    ``scale`` times a standard normal (around 1 for LayerNorm weights). Tests use tiny ones; ``**VIT_L16`` with
    ``scale=0.02`` (timm's init) is UnlearnCanvas' size."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, around: float = 0.0) -> torch.Tensor:
        return around + scale * torch.randn(*shape, generator=g)

    state = {"cls_token": rand(1, 1, width), "pos_embed": rand(1, (image_size // patch) ** 2 + 1, width),
             "patch_embed.proj.weight": rand(width, 3, patch, patch), "patch_embed.proj.bias": rand(width)}
    for i in range(depth):
        for name, shape in (("norm1", (width,)), ("attn.qkv", (3 * width, width)), ("attn.proj", (width, width)),
                            ("norm2", (width,)), ("mlp.fc1", (4 * width, width)), ("mlp.fc2", (width, 4 * width))):
            state[f"blocks.{i}.{name}.weight"] = rand(*shape, around=1.0 if name.startswith("norm") else 0.0)
            state[f"blocks.{i}.{name}.bias"] = rand(shape[0])
    state.update({"norm.weight": rand(width, around=1.0), "norm.bias": rand(width),
                  "head.weight": rand(num_classes, width), "head.bias": rand(num_classes)})
    return state


def write_timm_vit(path: str | Path, num_classes: int, **shape) -> Path:
    """A random ViT classifier file (:func:`timm_vit_state` with ``shape``) as UnlearnCanvas stores its classifiers
    (``model_state_dict`` in a torch pickle), or flat in a ``.safetensors`` file."""
    path = Path(path)
    state = timm_vit_state(num_classes, **shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_tensors(state, path)
    else:
        torch.save({"model_state_dict": state, "epoch": 9}, path)
    return path


def load_classifier(path: str | Path, classes: list[str], domain: str) -> ViTClassifier:
    """The UnlearnCanvas ``domain`` classifier stored at ``path``; its head must have one output per class."""
    where = f"the UnlearnCanvas {domain} classifier"
    path = Path(path).expanduser()
    model = ViTClassifier.from_timm(read_timm_state(path, where), f"{where} {path}")
    if model.head.out_features != len(classes):
        raise ValueError(f"{where} {path} has {model.head.out_features} outputs, but UnlearnCanvas has "
                         f"{len(classes)} {domain} classes")
    return model


class UnlearnCanvasClassifiers:
    """UnlearnCanvas' style and object classifiers (:class:`~cuig_lightning.evaluation.classifiers.Classifiers`;
    the ``unlearncanvas`` classifier kind).

    Args:
        style_path, object_path: the two checkpoints (``.pth`` with ``model_state_dict``, or ``.safetensors``).
        batch_size: images classified at once.
    """

    def __init__(self, style_path: str | Path, object_path: str | Path, batch_size: int = 64):
        self.style = load_classifier(style_path, STYLES, "style")
        self.object = load_classifier(object_path, OBJECTS, "object")
        if self.style.image_size != self.object.image_size:  # one prepared image feeds both
            raise ValueError(f"the UnlearnCanvas classifiers read different image sizes: style "
                             f"{self.style.image_size}, object {self.object.image_size}")
        self.styles, self.objects = list(STYLES), list(OBJECTS)
        self.batch_size = batch_size

    def to(self, device: torch.device | str) -> "UnlearnCanvasClassifiers":
        """Classify on ``device`` (the evaluated model's: a ViT-L is slow on CPUs)."""
        self.style.to(device)
        self.object.to(device)
        return self

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] as the classifiers read them: 8-bit levels, resized to the input size as PIL's
        antialiased bilinear ``Resize`` does, 8-bit levels again (what UnlearnCanvas saved and reloaded)."""
        size = self.style.image_size
        x = (images.float() * 255).round()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x.round().clamp(0, 255) / 255

    @torch.no_grad()
    def logits(self, network: ViTClassifier, images: torch.Tensor) -> torch.Tensor:
        """``network``'s logits for images in [0, 1] (any size), ``batch_size`` at a time, on the CPU."""
        device = next(network.parameters()).device
        out = [network(self.prepare(batch.to(device)) * 2 - 1).float().cpu() for batch in images.split(self.batch_size)]
        return torch.cat(out)

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted (style, object) class indices of images in [0, 1]."""
        return self.logits(self.style, images).argmax(-1), self.logits(self.object, images).argmax(-1)

    def style_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """The style classifier's softmax over :attr:`styles`, one row per image."""
        return torch.softmax(self.logits(self.style, images), dim=-1)


def _unlearncanvas_classifiers(*, style_classifier: str, object_classifier: str, batch_size: int,
                               **_) -> UnlearnCanvasClassifiers:
    return UnlearnCanvasClassifiers(style_classifier, object_classifier, batch_size)


register_classifiers("unlearncanvas", _unlearncanvas_classifiers)
