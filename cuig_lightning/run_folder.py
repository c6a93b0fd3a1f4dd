"""The one owner of a run folder's layout: who owns it, where each request writes, what a finished request
is, and loading one back for ``evaluate`` / ``export``.

::

    run_dir/
      job.json                       config hash and resolved config (ownership)
      metrics.{json,csv,md,png}      one row per request (evaluation/report.py)
      requests/01-<target>/
        unet_delta.safetensors       the trainable tensors after this request
        manifest.json                request, schedule, config hash, keys, erased so far, sha256 of every
                                     file, steps, wall time, metrics; written last
        samples.png                  the evaluation grid
        <recorded files>             what callbacks record (Regularizer.record -> record_file)
        partial/last.ckpt            mid-request checkpoint, removed once the request is finished

Files are written atomically by :mod:`cuig_lightning.checkpoints`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from cuig_lightning.checkpoints import (
    DELTA,
    MANIFEST,
    CheckpointError,
    load_tensors,
    read_manifest,
    save_tensors,
    write_json,
    write_manifest,
)
from cuig_lightning.requests import Request, Stage

JOB = "job.json"
SAMPLES = "samples.png"
PARTIAL = "partial"
LAST = "last.ckpt"


class RunFolderError(RuntimeError):
    """The run folder belongs to another configuration."""


def config_hash(config_text: str) -> str:
    return hashlib.sha256(config_text.encode()).hexdigest()[:16]


def record_file(stage: Stage, name: str, data: Any) -> None:
    """Write ``data`` as ``name`` into the stage's request folder and list it for the request's manifest:
    a dict of tensors for ``*.safetensors``, otherwise a JSON-able object."""
    path = Path(stage.request_dir) / name
    if name.endswith(".safetensors"):
        save_tensors(data, path)
    else:
        write_json(data, path)
    if name not in stage.recorded:
        stage.recorded.append(name)


class RunFolder:
    """Owns ``run_dir``: claims it for one configuration, names request folders, writes and finds finished
    requests, loads one back."""

    def __init__(self, root: str | Path, config_text: str):
        self.root = Path(root)
        self.config_text = config_text
        self.hash = config_hash(config_text)

    # -- ownership ---------------------------------------------------------------------------
    def check_owner(self) -> None:
        job = self.root / JOB
        if job.is_file():
            try:
                owner = json.loads(job.read_text()).get("config_hash")
            except json.JSONDecodeError:
                raise RunFolderError(f"{job} is corrupt; refusing to reuse {self.root}") from None
            if owner != self.hash:
                raise RunFolderError(
                    f"run folder {self.root} was made by a different config (hash {owner}, this config {self.hash}); "
                    "choose another trainer.run_dir"
                )
        elif (self.root / "requests").exists():
            raise RunFolderError(f"run folder {self.root} has requests but no job.json; refusing to reuse it")

    def claim(self) -> None:
        if not (self.root / JOB).is_file():
            write_json({"config_hash": self.hash, "config": self.config_text, "created": time.time()}, self.root / JOB)

    # -- requests ----------------------------------------------------------------------------
    def request_dir(self, index: int, requests: list[Request]) -> Path:
        slug = requests[0].slug if len(requests) == 1 else f"all-{len(requests)}"
        return self.root / "requests" / f"{index + 1:02d}-{slug}"

    def finished(self, folder: Path) -> dict | None:
        """The verified manifest of a finished request, or None if it is not finished."""
        if not (folder / MANIFEST).is_file():
            return None
        manifest = read_manifest(folder, verify=True)
        if manifest.get("config_hash") != self.hash:
            raise RunFolderError(f"{folder} was written by a different config")
        return manifest

    @staticmethod
    def partial_dir(folder: Path) -> Path:
        return folder / PARTIAL

    def resume_checkpoint(self, folder: Path) -> str | None:
        """The mid-request checkpoint to resume from (None: start the request); a damaged one stops the job
        with one clear line and is kept for inspection."""
        last = self.partial_dir(folder) / LAST
        if not last.is_file():
            return None
        try:
            torch.load(last, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to read means the file is unusable
            raise CheckpointError(
                f"corrupt mid-request checkpoint {last} ({type(err).__name__}); move it away to restart that request"
            ) from None
        return str(last)

    def write_request(self, stage: Stage, weights: dict[str, torch.Tensor], **fields: Any) -> dict:
        """Save a finished request: its delta, then the manifest (every file it vouches for, the requests,
        schedule, config hash, trainable keys and the concepts erased so far), then drop ``partial/``."""
        folder = stage.request_dir
        save_tensors(weights, folder / DELTA)
        files = [DELTA, *stage.recorded] + ([SAMPLES] if (folder / SAMPLES).is_file() else [])
        manifest = write_manifest(
            folder, sorted(set(files)), request=[vars(r) for r in stage.requests], index=stage.index + 1,
            schedule=stage.schedule, config_hash=self.hash, trainable_keys=sorted(weights), erased=stage.erased,
            **fields,
        )
        shutil.rmtree(self.partial_dir(folder), ignore_errors=True)
        return manifest

    def finished_requests(self) -> list[Path]:
        """Request folders that have a manifest, in order."""
        root = self.root / "requests"
        return sorted(p for p in root.glob("*") if (p / MANIFEST).is_file()) if root.is_dir() else []

    def load_request(self, model, request: int | None) -> dict:
        """Load the verified weights of a finished request (None or -1: the last) into ``model``; return its
        manifest."""
        self.check_owner()
        done = self.finished_requests()
        if not done:
            raise CheckpointError(f"no finished request in {self.root}")
        if request is None or request < 0:
            folder = done[-1]
        else:
            matches = [d for d in done if int(d.name.split("-")[0]) == request]
            if not matches:
                raise CheckpointError(f"request {request} is not finished in {self.root} (finished: {len(done)})")
            folder = matches[0]
        manifest = read_manifest(folder, verify=True)
        model.load_trainable(load_tensors(folder / DELTA))
        return manifest
