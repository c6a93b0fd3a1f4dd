"""The continual job: the stage loop. One fresh ``Trainer`` per request, resume where it stopped.

:class:`ContinualTrainer` is the ``trainer`` of the CLI. Its own ``fit`` walks the requests and builds a
plain ``lightning.Trainer`` for each stage from the same settings (callbacks are deep-copied so every
stage starts with fresh regularizer state). The walk is decided from the run folder before anything is
written, so DDP ranks, which re-run the whole command, walk the same stages. Where things are written
is :class:`cuig_lightning.run_folder.RunFolder`'s business.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from cuig_lightning.checkpoints import DELTA, load_tensors
from cuig_lightning.evaluation.protocol import Evaluation, drift
from cuig_lightning.evaluation.report import write_report
from cuig_lightning.evaluation.robustness import measure_robustness
from cuig_lightning.requests import Request, Schedule, Stage, erased_after, plan_stages, validate_requests
from cuig_lightning.run_folder import SAMPLES, RunFolder, weights_digest
from cuig_lightning.stage import (StageCheckpoint, StopWhenForgotten, silence_lightning_noise, stage_callbacks,
                                  stage_loggers)
from cuig_lightning.versions import library_versions


class ContinualTrainer(L.Trainer):
    """A Trainer whose ``fit`` runs a whole continual-unlearning job, one fresh Trainer per request.

    Args:
        requests: concepts to erase, in arrival order.
        schedule: ``sequential`` (request n starts from the model after n-1), ``simultaneous`` (one stage
            erases all targets) or ``independent`` (each request starts from the pretrained weights; the
            input of model merging).
        run_dir: where checkpoints, manifests, metrics and logs go; re-running the same config resumes it.
        checkpoint_every: optimizer steps between mid-request checkpoints (``last.ckpt``).
        evaluation: the UnlearnCanvas evaluation run after every request (None: no evaluation).
        until_ua: train each request only until its UA reaches this (percent), checked on the evaluation
            grid's erased part every ``until_ua_every`` steps; ``max_steps`` is the cap. None: always
            ``max_steps`` (the paper's sequential protocol); the simultaneous reference uses 95.
        until_ua_every: optimizer steps between those checks.
        stop_below_ua: end the job after the first request whose UA is below this (percent): the rest of the
            sequence is not run (a tuning candidate that stops erasing can no longer be chosen). It does not
            change what is trained, so a later run of the folder without it continues the sequence.
        measure_retention: when RA-I / RA-C are measured: ``every_request`` (the curves need them),
            ``last_request`` (and at a ``stop_below_ua`` stop), or after the requests of a list (1-based, e.g.
            ``[1, 4, 8, 12]``; the last request always): elsewhere only UA is sampled, the erased concepts' part
            of the grid (what a tuning candidate's rule reads, about 2.5x less evaluation over 12 requests with
            ``last_request``). Like ``stop_below_ua`` it changes nothing that is trained: not part of the run
            identity.
        curve_seeds: with ``every_request``, RA-I / RA-C between the first and the last request from the first
            ``curve_seeds`` evaluation seeds (metrics key ``RA_seeds``), UA still from every seed (the
            matched-forgetting check reads it at every request): a 12-request run at about 64% of the
            sampling with one seed of three. The first request (the similarity finding reads it) and the last
            (the table) use every seed. None: every seed throughout. Not part of the run identity either.
        **kwargs: every ``lightning.Trainer`` argument, used for each stage's Trainer (``logger``: extra
            loggers beside the CSV / TensorBoard logs in ``run_dir/logs``; ``false``: no logs).
    """

    def __init__(
        self,
        requests: list[Request] | None = None,
        schedule: Schedule = "sequential",
        run_dir: str = "runs/cuig",
        checkpoint_every: int = 50,
        evaluation: Evaluation | None = None,
        until_ua: float | None = None,
        until_ua_every: int = 20,
        stop_below_ua: float | None = None,
        measure_retention: Literal["every_request", "last_request"] | list[int] = "every_request",
        curve_seeds: int | None = None,
        **kwargs: Any,
    ):
        if checkpoint_every < 1:
            raise ValueError(f"trainer.checkpoint_every must be >= 1, got {checkpoint_every}")
        if until_ua is not None and (evaluation is None or until_ua_every < 1):
            raise ValueError("trainer.until_ua needs trainer.evaluation (its grid and classifiers) and "
                             f"until_ua_every >= 1 (got {until_ua_every})")
        if stop_below_ua is not None and evaluation is None:
            raise ValueError("trainer.stop_below_ua needs trainer.evaluation (it reads each request's UA)")
        if not (measure_retention in ("every_request", "last_request") or (
                isinstance(measure_retention, list) and all(isinstance(n, int) and n >= 1 for n in measure_retention))):
            raise ValueError("trainer.measure_retention must be every_request, last_request or a list of request "
                             f"numbers (>= 1), got {measure_retention!r}")
        if curve_seeds is not None and (evaluation is None or curve_seeds < 1):
            raise ValueError("trainer.curve_seeds needs trainer.evaluation and must be >= 1, "
                             f"got {curve_seeds}")
        self.until_ua, self.until_ua_every, self.stop_below_ua = until_ua, until_ua_every, stop_below_ua
        self.measure_retention, self.curve_seeds = measure_retention, curve_seeds
        self.requests = list(requests or [])
        self.schedule = schedule
        self.run_dir = Path(run_dir)
        self.checkpoint_every = checkpoint_every
        self.evaluation = evaluation
        self._base_latents: dict = {}  # θ0's images the robustness probes reuse at every request
        # The resolved config (sections seed_everything, trainer, model, data), set by the CLI: stored in
        # job.json; its run identity (run_folder.run_identity) owns run_dir.
        self.job_config: dict | None = None
        self._callback_templates: list[Callback] = list(kwargs.pop("callbacks", None) or [])
        self._user_logger = kwargs.pop("logger", None)
        kwargs["default_root_dir"] = str(self.run_dir)  # nothing Lightning writes lands outside run_dir
        if kwargs.get("log_every_n_steps") is None:
            kwargs["log_every_n_steps"] = 1  # one logged row per step
        self._stage_kwargs = dict(kwargs)
        silence_lightning_noise()
        super().__init__(logger=False, **kwargs)

    def _stage_trainer(self, stage: Stage, total: int, owner: dict) -> L.Trainer:
        checkpoint = StageCheckpoint(stage.request_dir, self.checkpoint_every, owner)
        label = f"request {stage.index + 1}/{total} {' '.join(stage.targets)}"
        bar = self._stage_kwargs.get("enable_progress_bar") is not False
        stop = None if self.until_ua is None else StopWhenForgotten(
            self.evaluation, stage.erased, stage.domain, self.until_ua, self.until_ua_every)
        kwargs = dict(self._stage_kwargs, callbacks=stage_callbacks(self._callback_templates, checkpoint, label, bar, stop),
                      logger=stage_loggers(self.run_dir, stage, self._user_logger))
        return L.Trainer(**kwargs)

    def fit(self, model, train_dataloaders=None, val_dataloaders=None, datamodule=None, ckpt_path=None, weights_only=None):
        """Run every request of the job (resuming a run folder made by the same config)."""
        if datamodule is None:
            raise ValueError("the continual trainer needs the data module (the `data:` section)")
        validate_requests(self.requests, datamodule.vocabulary)
        if self.evaluation is not None:
            # every request's evaluation grid needs both retain sets: refused now, not after request 1 trained
            missing = [d for d in ("style", "object") if not self.evaluation.retain.get(d)]
            if missing:
                raise ValueError(f"trainer.evaluation has no retain_{missing[0]}s: the evaluation after each request "
                                 f"needs both retain sets; set trainer.evaluation.retain_{missing[0]}s")
            # the classifiers load and know every concept before anything is sampled
            self.evaluation.check_vocabulary({d: [r.target for r in self.requests if r.domain == d]
                                              for d in ("style", "object")})
            if self.evaluation.attack is not None:  # an attack.concepts name no request erases: refused now
                self.evaluation.attack.targets([], [r.target for r in self.requests])
        config = self.job_config or {"trainer": {"requests": [vars(r) for r in self.requests]}}
        run = RunFolder(self.run_dir, config)
        # One process per run folder (rank 0 holds the lock; the other DDP ranks follow it).
        with run.lock() if self.is_global_zero else contextlib.nullcontext():
            run.check_owner()
            stages = plan_stages(self.requests, self.schedule)
            # Decide the whole walk (and verify finished requests) before writing anything.
            folders = [run.request_dir(i, reqs) for i, reqs in enumerate(stages)]
            manifests = [run.finished(f) for f in folders]
            if self.is_global_zero:  # all verified: what a kill left in finished requests goes
                for folder, manifest in zip(folders, manifests):
                    if manifest is not None:
                        run.tidy(folder, manifest)
            claimed = self.is_global_zero and run.claim(library_versions())
            try:
                self._walk(model, datamodule, run, stages, folders, manifests)
            except BaseException:
                if claimed:  # a job that failed before any checkpoint never locks its folder
                    run.release()
                raise

    def _walk(self, model, datamodule, run: RunFolder, stages, folders, manifests) -> None:
        base = model.base_weights
        current = base
        erased: list[str] = []
        rows, table = [], None
        for i, (reqs, folder, manifest) in enumerate(zip(stages, folders, manifests)):
            stage = Stage(index=i, requests=reqs, erased_before=list(erased), vocabulary=datamodule.vocabulary,
                          schedule=self.schedule, request_dir=folder, previous_dirs=folders[:i],
                          erased=erased_after(stages, i))
            if manifest is not None:
                current = load_tensors(folder / DELTA)
                rank_zero_info(f"[cuig] request {i + 1}/{len(stages)} ({', '.join(stage.targets)}): finished earlier, skipped")
            else:
                start = current if self.schedule == "sequential" else base
                current, manifest = self._run_stage(model, datamodule, stage, start, run, len(stages))
            erased += stage.targets
            rows.append({"request": i + 1, "targets": " ".join(stage.targets), "steps": manifest.get("steps"),
                         **manifest.get("metrics", {})})
            if self.is_global_zero and manifest.get("metrics"):  # the table so far, readable if the job stops
                table = write_report(self.run_dir, rows)
            ua = (manifest.get("metrics") or {}).get("UA")
            if self.stop_below_ua is not None and ua is not None and ua < self.stop_below_ua and i + 1 < len(stages):
                rank_zero_info(f"[cuig] request {i + 1}: UA {ua:.1f} < trainer.stop_below_ua {self.stop_below_ua:g}; "
                               f"the job ends here ({len(stages) - i - 1} request(s) not run)")
                break
        model.load_trainable(current)
        if table:
            rank_zero_info("\n" + table)

    def _run_stage(self, model, datamodule, stage: Stage, start: dict, run: RunFolder, total: int) -> tuple[dict, dict]:
        folder = stage.request_dir
        t0 = time.time()
        # Whose a mid-request checkpoint is: resuming from one of another request, config or start is refused.
        owner = {"request": stage.index + 1, "targets": stage.targets, "run_identity": run.hash,
                 "start_weights": weights_digest(start)}
        trainer = self._stage_trainer(stage, total, owner)
        # Anchor images come from the base model, generated on this rank's device (then cached).
        model.to(trainer.strategy.root_device)
        model.load_trainable(model.base_weights)
        datamodule.prepare_stage(model.diffusion, stage)
        model.begin_stage(stage, start)
        resume = run.resume_checkpoint(folder, owner)
        if resume:
            rank_zero_info(f"[cuig] request {stage.index + 1} ({', '.join(stage.targets)}): resuming from {resume}")
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume, weights_only=True)
        if trainer.interrupted:
            raise KeyboardInterrupt
        weights = model.snapshot()
        manifest = {}
        if trainer.is_global_zero:
            last = stage.index + 1 == total
            metrics = self._evaluate(model, stage, trainer, last) if self.evaluation is not None else {}
            manifest = run.write_request(stage, weights, steps=trainer.global_step,
                                         wall_time_s=round(time.time() - t0, 2), metrics=metrics)
        trainer.strategy.barrier("cuig-request-saved")
        return weights, manifest

    def _evaluate(self, model, stage: Stage, trainer: L.Trainer, last: bool) -> dict:
        """UA / RA-I / RA-C over every concept of this stage's domain erased so far, plus drift; before the
        last request, unless the job stops here, UA alone under ``measure_retention: last_request`` and RA-I /
        RA-C from the first ``curve_seeds`` seeds after request 1."""
        t0 = time.time()
        model.to(trainer.strategy.root_device)
        result, samples, evaluation = None, stage.request_dir / SAMPLES, self.evaluation
        fewer_seeds = self.curve_seeds is not None and stage.index > 0 and self.curve_seeds < len(evaluation.seeds)
        measured_here = (self.measure_retention == "every_request" or (
            isinstance(self.measure_retention, list) and stage.index + 1 in self.measure_retention))
        if not last and not measured_here:
            ua = evaluation.unlearn_accuracy(model.diffusion, stage.erased, stage.domain)
            if self.stop_below_ua is None or ua >= self.stop_below_ua:
                result = {"UA": ua}
        elif not last and fewer_seeds:
            # the curve seeds' whole grid, then the other seeds' erased part alone: UA from every seed without
            # sampling the curve seeds' erased images twice (each seed has the same images per concept, so the
            # seed-weighted mean is the pooled UA)
            seeds, rest = evaluation.seeds[: self.curve_seeds], evaluation.seeds[self.curve_seeds:]
            curve = evaluation.evaluate(model.diffusion, stage.erased, stage.domain, samples, seeds)
            ua = (curve["UA"] * len(seeds) + evaluation.unlearn_accuracy(
                model.diffusion, stage.erased, stage.domain, rest) * len(rest)) / len(evaluation.seeds)
            if self.stop_below_ua is None or ua >= self.stop_below_ua:
                per_concept = {k: v for k, v in curve["per_concept"].items() if k != "unlearn"}  # UA's: all seeds
                result = {**curve, "UA": ua, "RA_seeds": len(seeds), "per_concept": per_concept}
        if result is None:  # the whole grid: every request, the last one, or where stop_below_ua ends the job
            result = evaluation.evaluate(model.diffusion, stage.erased, stage.domain, samples)
        metrics = {k: round(v, 3) for k, v in result.items() if k in ("UA", "RA_I", "RA_C", "RA_seeds")}
        metrics.update({k: round(v, 6) for k, v in drift(model.snapshot(), model.base_weights).items()})
        if "per_concept" in result:
            metrics["per_concept"] = result["per_concept"]
        metrics["evaluation"] = evaluation.settings()  # which protocol measured this request (not the run identity)
        metrics.update(measure_robustness(evaluation, model.diffusion, model.snapshot(), model.base_weights,
                                          stage.erased, stage.domain, lambda probe: probe.due(stage.index + 1, last),
                                          self._base_latents))
        measured = "  ".join(f"{label} {metrics[k]:.1f}" for k, label in (("UA", "UA"), ("RA_I", "RA-I"), ("RA_C", "RA-C"))
                             if k in metrics)
        probes = metrics.get("robustness", {})
        measured += "".join(f"  {label} {metrics[k]:.1f}" for k, label in (
            ("ASR", "ASR"), ("ASR_paraphrase", "ASR-paraphrase"), ("relearn_UA", "relearn-UA")) if k in metrics)
        cost = "".join(f", {name} {probes[name]['seconds']:.0f} s" for name in ("attack", "relearn") if name in probes)
        rank_zero_info(f"[cuig] request {stage.index + 1} ({', '.join(stage.targets)}): {measured}  "
                       f"drift {metrics['drift']:.4g} ({time.time() - t0:.0f} s evaluation{cost})")
        return metrics
