"""What one request's ``lightning.Trainer`` is built from: its mid-request checkpoint, its loggers (inside
``run_dir``), its progress bar (which names the request), the optional stop once the request is forgotten,
and the silencing of Lightning's per-Trainer noise.

The continual trainer (:mod:`cuig_lightning.continual`) builds one such Trainer per request.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE, _TENSORBOARDX_AVAILABLE
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from cuig_lightning.checkpoints import sha256_file, write_json
from cuig_lightning.config_checks import accepted_arguments
from cuig_lightning.requests import Stage
from cuig_lightning.run_folder import LAST_INFO, LOGS, RunFolder


class StageCheckpoint(ModelCheckpoint):
    """``partial/last.ckpt`` every ``every_n_train_steps`` steps, written so that a resume can trust it.

    * Written next to its final place and renamed over it (a full disk or a kill leaves the previous
      checkpoint whole; Lightning alone stages it in ``$TMPDIR`` and moves it, a copy across filesystems).
    * ``last.json`` beside it records its sha256 (and the previous one's, for a kill between the two
      renames); the checkpoint itself carries ``owner`` (request, run identity, start weights), checked by
      :meth:`cuig_lightning.run_folder.RunFolder.resume_checkpoint`.
    * Never written at the last step: Lightning skips a finished loop on resume, so the stage's end-of-fit
      work (``on_train_end``, e.g. the TIES merge) would never run. A kill after the last step resumes from
      the previous checkpoint and replays the last steps (bitwise the same) and the end-of-stage work.
    """

    def __init__(self, folder: Path, every: int, owner: dict[str, Any]):
        super().__init__(dirpath=RunFolder.partial_dir(folder), save_last=True, save_top_k=0,
                         every_n_train_steps=every, enable_version_counter=False)
        self.owner = owner

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["cuig"] = dict(self.owner)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            return
        final = Path(filepath)
        tmp = final.with_name(f".{final.name}.tmp")  # the same name on every rank (saving is collective)
        try:
            trainer.save_checkpoint(tmp, self.save_weights_only)
        except BaseException as err:
            tmp.unlink(missing_ok=True)  # e.g. a full disk: the previous last.ckpt stays as it was
            if isinstance(err, RuntimeError) and ("failed writing" in str(err) or "No space left" in str(err)):
                # torch.save's writer reports a full disk as a RuntimeError: an OSError the CLI reports in one line
                raise OSError(f"cannot write mid-request checkpoint {final}: "
                              f"{' '.join(str(err).split())}") from None
            raise
        if trainer.is_global_zero:
            info_path = final.with_name(LAST_INFO)
            previous = json.loads(info_path.read_text()).get("sha256") if info_path.is_file() else None
            write_json({"sha256": sha256_file(tmp), "previous": previous, "step": trainer.global_step,
                        "owner": self.owner}, info_path)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        trainer.strategy.barrier("cuig-last-ckpt")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath


class StopWhenForgotten(Callback):
    """Ends a request's training once its UA reaches ``min_ua`` ("trained until UA >= 95", the paper's
    simultaneous reference), checked every ``every`` optimizer steps on the evaluation grid's erased part;
    ``max_steps`` stays the cap. Rank 0 samples and judges; every rank stops at the same step."""

    def __init__(self, evaluation, erased: list[str], domain: str, min_ua: float, every: int):
        self.evaluation, self.erased, self.domain = evaluation, list(erased), domain
        self.min_ua, self.every = min_ua, every

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every or step >= (trainer.max_steps or 0):
            return  # the last step is evaluated by the job anyway
        ua = self.evaluation.unlearn_accuracy(pl_module.diffusion, self.erased, self.domain) if trainer.is_global_zero else 0.0
        ua = float(trainer.strategy.broadcast(ua, src=0))
        if trainer.is_global_zero:  # one row at the checked step (self.log would repeat it on every later row)
            for logger in trainer.loggers:
                logger.log_metrics({"forgetting/ua_check": ua}, step=step)
        if ua >= self.min_ua:
            trainer.should_stop = True


class RequestProgressBar(TQDMProgressBar):
    """The training bar named after the request ("request 3/12 Green_Checks"), counting its steps."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.set_description(self.label, refresh=False)
        return bar

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        total = trainer.max_steps if trainer.max_steps > 0 else convert_inf(self.total_train_batches)
        self.train_progress_bar.reset(total=total)
        self.train_progress_bar.n = self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.set_description(self.label)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.train_progress_bar is not None:
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
            self.train_progress_bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class RequestLogLines(ProgressBar):
    """The training progress as plain lines when stderr is not a terminal (a log file): one line every 10% of
    the request's steps (at least every 50 steps) and one at its end, e.g.
    ``request 3/12 Cartoon: step 30/60, loss/unlearn 0.0123``, instead of a bar redrawn every step."""

    def __init__(self, label: str, max_every: int = 50):
        super().__init__()
        self.label, self.max_every = label, max_every
        self._enabled = True
        self._last_printed: int | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def _total(self, trainer: L.Trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        total = self.total_train_batches
        return int(total) if total != float("inf") else None

    def _every(self, trainer: L.Trainer) -> int:
        total = self._total(trainer)
        return self.max_every if total is None else max(1, min(self.max_every, total // 10))

    def _line(self, trainer: L.Trainer, pl_module) -> None:
        step, total = trainer.global_step, self._total(trainer)
        metrics = ", ".join(f"{k} {float(v):.4g}" if isinstance(v, (int, float)) or hasattr(v, "item") else f"{k} {v}"
                            for k, v in self.get_metrics(trainer, pl_module).items())
        print(f"{self.label}: step {step}/{total if total is not None else '?'}" + (f", {metrics}" if metrics else ""),
              file=sys.stderr, flush=True)
        self._last_printed = step

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._last_printed = trainer.global_step  # a resumed request says nothing until its next line is due

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step, total = trainer.global_step, self._total(trainer)
        if self._enabled and step != self._last_printed and (step % self._every(trainer) == 0 or step == total):
            self._line(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._enabled and trainer.global_step != self._last_printed:  # e.g. stopped early once forgotten
            self._line(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def stage_loggers(run_dir: Path, stage: Stage, user: Any) -> list[Logger]:
    """CSV (always) and TensorBoard (when installed) under ``run_dir/logs/NN-target/``, plus fresh copies
    of the loggers given as ``trainer.logger``; ``trainer.logger: false`` logs nothing."""
    if user is False:
        return []
    name = stage.request_dir.name
    loggers: list[Logger] = [CSVLogger(run_dir / LOGS, name="", version=name)]
    if _TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE:
        loggers.append(TensorBoardLogger(run_dir / LOGS, name="", version=name, default_hp_metric=False))
    if isinstance(user, (str, Logger)):
        user = [user]
    for logger in user if isinstance(user, (list, tuple)) else []:
        loggers.append(_logger_from_class_path(logger, run_dir / LOGS / name) if isinstance(logger, str)
                       else copy.deepcopy(logger))
    return loggers


def _logger_from_class_path(class_path: str, save_dir: Path) -> Logger:
    """``--trainer.logger lightning.pytorch.loggers.CSVLogger`` (a class path alone, checked to be a Logger
    when the config was parsed): that logger, writing into the request's log folder when it takes one."""
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    accepted = accepted_arguments(cls)
    return cls(save_dir=str(save_dir)) if accepted is None or "save_dir" in accepted else cls()


def stage_callbacks(templates: list[Callback], checkpoint: StageCheckpoint, label: str,
                    progress_bar: bool, stop: StopWhenForgotten | None = None) -> list[Callback]:
    """Fresh copies of the configured callbacks (regularizer state belongs to one stage), the checkpoint,
    the stop rule if any, and the request-named progress bar unless one was configured or bars are off (plain
    lines every few steps instead of a bar when stderr is not a terminal, so a log file stays readable)."""
    callbacks = [copy.deepcopy(c) for c in templates] + [checkpoint] + ([stop] if stop else [])
    if progress_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(RequestProgressBar(label) if _stderr_is_terminal() else RequestLogLines(label))
    return callbacks


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class _QuietLightning(logging.Filter):
    """Drops what every fresh Trainer repeats: the litlogger tip, the "`Trainer.fit` stopped" line, and
    the hardware lines after the first request."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "litlogger" in message or message.startswith("`Trainer.fit` stopped"):
            return False
        if message.startswith(("GPU available", "TPU available", "HPU available")):
            first = message not in self.seen
            self.seen.add(message)
            return first
        return True


def silence_lightning_noise() -> None:
    """Install the filter once per process and drop warnings that each stage would repeat."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _QuietLightning) for f in logger.filters):
        logger.addFilter(_QuietLightning())
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")
