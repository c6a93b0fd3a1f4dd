"""Request checkpoints: trained tensors as safetensors plus a JSON manifest with sha256 of every file.

Every write is atomic (temporary file in the same folder, then ``os.replace``), and the manifest is
written last, so a request folder either has a manifest that vouches for its files or is unfinished.
Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
DELTA = "unet_delta.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not belong to this run."""


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, flush it to disk, then rename it over ``path``
    (same filesystem, so the rename is atomic: a full disk or a kill leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Atomically write ``tensors`` (detached, contiguous, on CPU) as safetensors."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        atomic_write(Path(path), lambda tmp: save_file(cpu, tmp))
    except SafetensorError as err:  # e.g. "No space left on device": an OSError the CLI reports in one line
        raise OSError(f"cannot write {path}: {err}") from None


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"corrupt checkpoint file {path}: {err}") from None


def write_json(data: Any, path: str | Path) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, files: list[str], **fields: Any) -> dict:
    """Write ``folder/manifest.json`` recording ``fields`` and the sha256 of each listed file."""
    manifest = dict(fields, files={name: sha256_file(folder / name) for name in sorted(files)})
    write_json(manifest, folder / MANIFEST)
    return manifest


def read_manifest(folder: Path, verify: bool = True, required: tuple[str, ...] = ()) -> dict:
    """Read a request's manifest; with ``verify`` every listed file must match its sha256. A manifest
    vouches only for what it lists: its ``files`` map must be non-empty and name every ``required`` file."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing manifest {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"corrupt manifest {path}: {err}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        raise CheckpointError(f"manifest {path} lists no files with their sha256; it vouches for nothing")
    missing = [name for name in required if name not in files]
    if missing:
        raise CheckpointError(f"manifest {path} does not cover {', '.join(missing)}")
    if verify:
        for name, expected in files.items():
            file = folder / name
            if not file.is_file():
                raise CheckpointError(f"{file} is listed in {path} but missing")
            if sha256_file(file) != expected:
                raise CheckpointError(f"sha256 of {file} does not match its manifest {path}")
    return manifest
