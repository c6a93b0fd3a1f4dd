"""The one owner of a run folder's layout: who owns it, where each request writes, what a finished request
is, and loading one back for ``evaluate`` / ``export``.

::

    run_dir/
      job.json                       run identity hash, resolved config, library versions (ownership)
      .lock                          held (flock) by the one ``fit`` process working on the folder
      logs/<NN-target>/metrics.csv   one row per logged step (TensorBoard events too when installed)
      metrics.{json,csv,md,png}      one row per request (evaluation/report.py)
      requests/01-<target>/
        unet_delta.safetensors       the trainable tensors after this request
        manifest.json                request, schedule, config hash, keys, erased so far, sha256 of every
                                     file, steps, wall time, metrics; written last
        samples.png                  the evaluation grid
        <recorded files>             what callbacks record (Regularizer.record -> record_file)
        partial/last.ckpt            mid-request checkpoint, removed once the request is finished
        partial/last.json            its sha256 and whose it is (request, run identity, start weights)

Files are written atomically by :mod:`cuig_lightning.checkpoints`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
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
    sha256_file,
    write_json,
    write_manifest,
)
from cuig_lightning.requests import DEFAULT_STYLE_TEMPLATES, Request, Stage

JOB = "job.json"
LOCK = ".lock"
LOGS = "logs"
SAMPLES = "samples.png"
PARTIAL = "partial"
LAST = "last.ckpt"
LAST_INFO = "last.json"

#: The ``trainer`` keys that decide the trained weights, hence the run identity (with ``seed_everything``,
#: ``model`` and ``data``). Everything else (run_dir, evaluation, devices, accelerator, strategy, logging,
#: progress bar, checkpoint_every, ...) can change between ``fit`` / ``evaluate`` / ``export`` of one run.
IDENTITY_TRAINER_KEYS = (
    "requests", "schedule", "max_steps", "max_epochs", "min_steps", "min_epochs", "callbacks", "precision",
    "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "deterministic",
    "limit_train_batches", "overfit_batches", "plugins", "until_ua", "until_ua_every",
)
#: ``data`` keys that do not change what is trained (where the anchor cache lives).
NON_IDENTITY_DATA_KEYS = ("cache_dir",)
#: Options added after run folders existed, at the values that train exactly as before they existed (a
#: resolved config holds the argument's default, e.g. None, or the value spelled out): left out of the identity
#: at those values, so that upgrading cuig does not disown finished runs.
LATER_OPTIONS = {("trainer", "until_ua"): (None,), ("trainer", "until_ua_every"): (20,),
                 ("data", "style_templates"): (None, DEFAULT_STYLE_TEMPLATES),
                 ("model", "optimizer"): ("adamw",), ("model", "momentum"): (0.0,)}
#: The same for callbacks' init_args (the resolved config lists every one, defaults included): class_path ->
#: {init arg: the value that trains as before it existed} (issue 33's options: cuig's earlier behaviour).
LATER_CALLBACK_OPTIONS = {
    **{f"callbacks.{path}GradientProjection": {"source": "names", "captions": None, "dedup": 0.95,
                                               "caption_set": "generic", "caption_token": "last"}
       for path in ("", "gradient_projection.")},
    **{f"callbacks.{path}SelectiveFineTuning": {"masking": "held"} for path in ("", "selective_finetuning.")},
}
#: The same for the base method (``model.method``).
LATER_METHOD_OPTIONS = {
    "cuig_lightning.methods.ConAbl": {"detach_first_token": False},
    "cuig_lightning.methods.SculpMem": {"detach_first_token": False, "masking": "held", "warmup": "frozen"},
}
#: Callback options that mean nothing for some values of another option (dropped from the identity there).
UNUSED_CALLBACK_OPTIONS = {k: ("source", ("names", "bare_names")) for k in ("caption_token", "caption_set")}


class RunFolderError(RuntimeError):
    """The run folder belongs to another configuration, is in use, or its job.json is unreadable."""


def run_identity(config: dict) -> dict:
    """The part of a resolved config (sections ``seed_everything``, ``trainer``, ``model``, ``data``) that
    decides the trained weights; its hash owns the run folder."""
    trainer = config.get("trainer") or {}
    data = config.get("data") or {}
    identity = {
        "seed_everything": config.get("seed_everything"),
        "trainer": {k: trainer.get(k) for k in IDENTITY_TRAINER_KEYS},
        "model": dict(config["model"]) if isinstance(config.get("model"), dict) else config.get("model"),
        "data": {k: v for k, v in data.items() if k not in NON_IDENTITY_DATA_KEYS},
    }
    if identity["trainer"].get("until_ua") is None:  # the check interval means nothing without the rule
        identity["trainer"].pop("until_ua_every", None)
    for (section, key), before in LATER_OPTIONS.items():
        if isinstance(identity[section], dict) and key in identity[section] and identity[section][key] in before:
            identity[section].pop(key)
    if isinstance(identity["trainer"].get("callbacks"), list):
        identity["trainer"]["callbacks"] = [_without_later_options(c, LATER_CALLBACK_OPTIONS)
                                            for c in identity["trainer"]["callbacks"]]
    if isinstance(identity["model"], dict) and isinstance(identity["model"].get("method"), dict):
        identity["model"]["method"] = _without_later_options(identity["model"]["method"], LATER_METHOD_OPTIONS)
    return identity


def _without_later_options(entry: Any, later_options: dict[str, dict]) -> Any:
    """An entry without its later options at old-behaviour values or unused (:data:`UNUSED_CALLBACK_OPTIONS`)."""
    later = later_options.get(entry.get("class_path")) if isinstance(entry, dict) else None
    args = entry.get("init_args") if later else None
    if not isinstance(args, dict):
        return entry
    unused = {k for k, (other, values) in UNUSED_CALLBACK_OPTIONS.items() if args.get(other) in values}
    return {**entry, "init_args": {k: v for k, v in args.items()
                                   if k not in unused and (k not in later or later[k] != v)}}


def identity_hash(config: dict) -> str:
    text = json.dumps(run_identity(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors (names, dtypes, shapes, bytes), to tell which weights a stage started from."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def read_job(root: str | Path) -> dict:
    """A run folder's ``job.json`` (its identity hash, resolved config, library versions)."""
    path = Path(root) / JOB
    if not path.is_file():
        raise RunFolderError(f"{path} not found: {root} is not a cuig run folder")
    try:
        job = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFolderError(f"{path} is corrupt ({err}); move it away or choose another run_dir") from None
    if not isinstance(job, dict) or not isinstance(job.get("config_hash"), str):
        raise RunFolderError(f"{path} is not a cuig job file (no config_hash); move it away or choose another run_dir")
    return job


def saved_config(root: str | Path) -> dict:
    """The resolved config a run was fitted with (what ``evaluate`` / ``export --run_dir`` use)."""
    job = read_job(root)
    config = job.get("config")
    if isinstance(config, str):  # job.json of older runs: the config as JSON text
        config = json.loads(config)
    if not isinstance(config, dict):
        raise RunFolderError(f"{Path(root) / JOB} holds no config")
    return config


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


def _request_number(folder: Path) -> int:
    """1-based request number of a request folder (``03-Cartoon`` -> 3)."""
    return int(folder.name.split("-")[0])


class RunFolder:
    """Owns ``run_dir``: claims it for one configuration, names request folders, writes and finds finished
    requests, loads one back."""

    def __init__(self, root: str | Path, config: dict):
        self.root = Path(root)
        self.config = config
        self.hash = identity_hash(config)

    # -- ownership ---------------------------------------------------------------------------
    def check_owner(self) -> None:
        if (self.root / JOB).exists():
            owner = read_job(self.root)["config_hash"]
            if owner != self.hash:
                raise RunFolderError(
                    f"run folder {self.root} was made by a different config (run identity {owner}, this config "
                    f"{self.hash}; the keys that count are listed in docs/run_folder.md); choose another "
                    "trainer.run_dir, or use `--run_dir` with evaluate / export"
                )
        elif (self.root / "requests").exists():
            raise RunFolderError(f"run folder {self.root} has requests but no job.json; refusing to reuse it")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's exclusive lock (one ``fit`` process per run folder); refuse if another holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    raise RunFolderError(f"run folder {self.root} is in use by another cuig process") from None
                raise
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def claim(self, versions: dict | None = None) -> bool:
        """Write job.json (identity hash, the resolved config, library versions) if the folder has none;
        True if this call claimed it."""
        if (self.root / JOB).is_file():
            return False
        write_json({"config_hash": self.hash, "identity": run_identity(self.config), "config": self.config,
                    "versions": versions or {}, "created": time.time()}, self.root / JOB)
        return True

    def has_progress(self) -> bool:
        """Whether anything resumable was written (a finished request or a mid-request checkpoint)."""
        root = self.root / "requests"
        return root.is_dir() and any(
            (d / MANIFEST).is_file() or (d / PARTIAL / LAST).is_file() for d in root.iterdir()
        )

    def release(self) -> None:
        """Undo a claim that led to nothing resumable (a job that failed before its first checkpoint), so a
        corrected config can use the folder: job.json, logs and the (empty of results) request folders go."""
        if self.has_progress():
            return
        for name in ("requests", LOGS):
            shutil.rmtree(self.root / name, ignore_errors=True)
        (self.root / JOB).unlink(missing_ok=True)

    # -- requests ----------------------------------------------------------------------------
    def request_dir(self, index: int, requests: list[Request]) -> Path:
        slug = requests[0].slug if len(requests) == 1 else f"all-{len(requests)}"
        return self.root / "requests" / f"{index + 1:02d}-{slug}"

    def finished(self, folder: Path) -> dict | None:
        """The verified manifest of a finished request, or None if it is not finished."""
        if not (folder / MANIFEST).is_file():
            return None
        manifest = read_manifest(folder, verify=True, required=(DELTA,))
        if manifest.get("config_hash") != self.hash:
            raise RunFolderError(f"{folder} was written by a different config (run identity "
                                 f"{manifest.get('config_hash')}, this run {self.hash}); it was not made by this run")
        return manifest

    def tidy(self, folder: Path, manifest: dict) -> None:
        """Remove what a kill can leave in a finished request (its verified ``manifest``): ``partial/`` (a kill
        between the manifest and its removal) and ``*.tmp`` files (a kill inside an atomic write); files the
        manifest lists are kept."""
        shutil.rmtree(self.partial_dir(folder), ignore_errors=True)
        listed = set(manifest.get("files") or {})
        for path in folder.glob("*.tmp"):
            if path.name not in listed and path.is_file():
                path.unlink(missing_ok=True)

    @staticmethod
    def partial_dir(folder: Path) -> Path:
        return folder / PARTIAL

    def resume_checkpoint(self, folder: Path, owner: dict) -> str | None:
        """The mid-request checkpoint to resume from (None: start the request). It must be one this run
        wrote for this request: its sha256 as recorded in ``last.json`` and its ``owner`` (request, run
        identity, start weights; see :class:`cuig_lightning.continual.StageCheckpoint`) as expected. A
        damaged or foreign one stops the job with one clear line and is kept for inspection."""
        last = self.partial_dir(folder) / LAST
        if not last.is_file():
            return None
        hint = "move partial/ away to restart that request"
        info_path = last.with_name(LAST_INFO)
        try:
            info = json.loads(info_path.read_text())
            known = {info["sha256"], info.get("previous")}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"corrupt mid-request checkpoint {last} (no valid {LAST_INFO} beside it); {hint}") from None
        if sha256_file(last) not in known:
            raise CheckpointError(f"corrupt mid-request checkpoint {last} (sha256 does not match {LAST_INFO}); {hint}")
        try:
            saved = torch.load(last, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to read means the file is unusable
            raise CheckpointError(f"corrupt mid-request checkpoint {last} ({type(err).__name__}); {hint}") from None
        found = saved.get("cuig") if isinstance(saved, dict) else None
        if found != owner:
            raise CheckpointError(
                f"mid-request checkpoint {last} belongs to another request, config or start weights "
                f"({found and {k: v for k, v in found.items() if owner.get(k) != v}}); {hint}"
            )
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
            matches = [d for d in done if _request_number(d) == request]
            if not matches:
                raise CheckpointError(f"request {request} is not finished in {self.root} (finished: {len(done)})")
            folder = matches[0]
        manifest = self.finished(folder)  # verified, and written by this run (not copied in from another)
        model.load_trainable(load_tensors(folder / DELTA))
        return manifest

    def finished_through(self, index: int) -> list[dict]:
        """The verified manifests of the finished requests 1..``index``, in order (each checked as
        :meth:`finished` does: sha256 of its files, written by this run)."""
        return [m for m in (self.finished(folder) for folder in self.finished_requests()
                            if _request_number(folder) <= index) if m]
