"""The continual job: the stage loop. One fresh ``Trainer`` per request, resume where it stopped.

:class:`ContinualTrainer` is the ``trainer`` of the CLI. Its own ``fit`` walks the requests and builds a
plain ``lightning.Trainer`` for each stage from the same settings (callbacks are deep-copied so every
stage starts with fresh regularizer state). The walk is decided from the run folder before anything is
written, so DDP ranks, which re-run the whole command, walk the same stages. Where things are written
is :class:`cuig_lightning.run_folder.RunFolder`'s business.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from cuig_lightning.checkpoints import DELTA, load_tensors
from cuig_lightning.evaluation.protocol import Evaluation, drift
from cuig_lightning.evaluation.report import write_report
from cuig_lightning.requests import Request, Schedule, Stage, erased_after, plan_stages, validate_requests
from cuig_lightning.run_folder import SAMPLES, RunFolder


class ContinualTrainer(L.Trainer):
    """A Trainer whose ``fit`` runs a whole continual-unlearning job, one fresh Trainer per request.

    Args:
        requests: concepts to erase, in arrival order.
        schedule: ``sequential`` (request n starts from the model after n-1), ``simultaneous`` (one stage
            erases all targets) or ``independent`` (each request starts from the pretrained weights; the
            input of model merging).
        run_dir: where checkpoints, manifests and logs go; re-running the same config resumes it.
        checkpoint_every: optimizer steps between mid-request checkpoints (``last.ckpt``).
        evaluation: the UnlearnCanvas evaluation run after every request (None: no evaluation).
        **kwargs: every ``lightning.Trainer`` argument, used for each stage's Trainer.
    """

    def __init__(
        self,
        requests: list[Request] | None = None,
        schedule: Schedule = "sequential",
        run_dir: str = "runs/cuig",
        checkpoint_every: int = 50,
        evaluation: Evaluation | None = None,
        **kwargs: Any,
    ):
        self.requests = list(requests or [])
        self.schedule = schedule
        self.run_dir = Path(run_dir)
        self.checkpoint_every = checkpoint_every
        self.evaluation = evaluation
        self.config_text: str | None = None  # the resolved config, set by the CLI; its hash owns run_dir
        self._stage_kwargs = dict(kwargs)
        self._callback_templates: list[Callback] = list(kwargs.pop("callbacks", None) or [])
        kwargs.pop("logger", None)
        super().__init__(logger=False, **kwargs)

    def _stage_trainer(self, folder: Path) -> L.Trainer:
        kwargs = dict(self._stage_kwargs)
        callbacks = [copy.deepcopy(c) for c in self._callback_templates]
        callbacks.append(
            ModelCheckpoint(dirpath=RunFolder.partial_dir(folder), save_last=True, save_top_k=0,
                            every_n_train_steps=self.checkpoint_every, enable_version_counter=False)
        )
        kwargs["callbacks"] = callbacks
        kwargs.setdefault("default_root_dir", str(folder))
        kwargs.setdefault("logger", L.pytorch.loggers.CSVLogger(str(folder), name="logs", version=""))
        return L.Trainer(**kwargs)

    def fit(self, model, train_dataloaders=None, val_dataloaders=None, datamodule=None, ckpt_path=None, weights_only=None):
        """Run every request of the job (resuming a run folder made by the same config)."""
        if datamodule is None:
            raise ValueError("the continual trainer needs the data module (the `data:` section)")
        validate_requests(self.requests, datamodule.vocabulary)
        config_text = self.config_text or json.dumps([vars(r) for r in self.requests], sort_keys=True)
        run = RunFolder(self.run_dir, config_text)
        run.check_owner()
        stages = plan_stages(self.requests, self.schedule)
        # Decide the whole walk (and verify finished requests) before writing anything.
        folders = [run.request_dir(i, reqs) for i, reqs in enumerate(stages)]
        manifests = [run.finished(f) for f in folders]
        if self.is_global_zero:
            run.claim()

        base = model.base_weights
        current = base
        erased: list[str] = []
        rows = []
        for i, (reqs, folder, manifest) in enumerate(zip(stages, folders, manifests)):
            stage = Stage(index=i, requests=reqs, erased_before=list(erased), vocabulary=datamodule.vocabulary,
                          schedule=self.schedule, request_dir=folder, previous_dirs=folders[:i],
                          erased=erased_after(stages, i))
            if manifest is not None:
                current = load_tensors(folder / DELTA)
                rank_zero_info(f"[cuig] request {i + 1}/{len(stages)} ({', '.join(stage.targets)}): finished earlier, skipped")
            else:
                start = current if self.schedule == "sequential" else base
                current, manifest = self._run_stage(model, datamodule, stage, start, run)
            erased += stage.targets
            rows.append({"request": i + 1, "targets": " ".join(stage.targets), **manifest.get("metrics", {})})
        model.load_trainable(current)
        if self.is_global_zero and self.evaluation is not None:
            rank_zero_info("\n" + write_report(self.run_dir, rows))

    def _run_stage(self, model, datamodule, stage: Stage, start: dict, run: RunFolder) -> tuple[dict, dict]:
        folder = stage.request_dir
        t0 = time.time()
        trainer = self._stage_trainer(folder)
        # Anchor images come from the base model, generated on this rank's device (then cached).
        model.to(trainer.strategy.root_device)
        model.load_trainable(model.base_weights)
        datamodule.prepare_stage(model.diffusion, stage)
        model.begin_stage(stage, start)
        resume = run.resume_checkpoint(folder)
        if resume:
            rank_zero_info(f"[cuig] request {stage.index + 1} ({', '.join(stage.targets)}): resuming from {resume}")
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume, weights_only=True)
        if trainer.interrupted:
            raise KeyboardInterrupt
        weights = model.snapshot()
        manifest = {}
        if trainer.is_global_zero:
            metrics = self._evaluate(model, stage, trainer) if self.evaluation is not None else {}
            manifest = run.write_request(stage, weights, steps=trainer.global_step,
                                         wall_time_s=round(time.time() - t0, 2), metrics=metrics)
        trainer.strategy.barrier("cuig-request-saved")
        return weights, manifest

    def _evaluate(self, model, stage: Stage, trainer: L.Trainer) -> dict:
        """UA / RA-I / RA-C over every concept of this stage's domain erased so far, plus drift."""
        t0 = time.time()
        model.to(trainer.strategy.root_device)
        result = self.evaluation.evaluate(model.diffusion, stage.erased, stage.domain, stage.request_dir / SAMPLES)
        metrics = {k: round(v, 3) for k, v in result.items() if k in ("UA", "RA_I", "RA_C")}
        metrics.update({k: round(v, 6) for k, v in drift(model.snapshot(), model.base_weights).items()})
        metrics["per_concept"] = result["per_concept"]
        rank_zero_info(f"[cuig] request {stage.index + 1} ({', '.join(stage.targets)}): "
                       f"UA {metrics['UA']:.1f}  RA-I {metrics['RA_I']:.1f}  RA-C {metrics['RA_C']:.1f}  "
                       f"drift {metrics['drift']:.4g} ({time.time() - t0:.0f} s evaluation)")
        return metrics
