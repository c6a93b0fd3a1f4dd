"""``cuig benchmark --launcher slurm``: each run a SLURM job, submitted through submitit (``pip install
'cuig[cluster]'``) by the shared loop of :func:`cuig_lightning.benchmark.execute.execute` — a run is submitted once
the runs it needs have finished, and the benchmark waits for its jobs.

A job is one ``cuig fit`` process on the run folder, its output appended to ``<run folder>.log`` as with local
processes. Resources are submitit's :meth:`AutoExecutor.update_parameters` names: the shared ones
(``timeout_min``, ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``, ``name``) and sbatch's as
``slurm_<option>`` (``slurm_partition``, ``slurm_account``, ``slurm_qos``, ``slurm_constraint``, ``slurm_setup``:
shell lines before the job, ...; any other option in ``slurm_additional_parameters``). A job that times out or
is preempted is requeued (submitit's checkpointing, up to 3 times), and ``cuig fit`` resumes the folder from its
last checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Any

from cuig_lightning.benchmark.plan import Run

# A run is one `cuig fit` process, so one task on one node; one GPU and 4 h unless the resources say otherwise
# (submitit's own SLURM default is a 5-minute job).
DEFAULT_RESOURCES = {"gpus_per_node": 1, "timeout_min": 240}


class SlurmError(Exception):
    """The cluster cannot take the benchmark's jobs: submitit missing, resources it refuses, sbatch refusing."""


class FitJob:
    """One run's ``cuig fit`` inside its job (the function submitit pickles), in the job's own process: a child
    process could outlive a cancelled job (submitit's local executor kills the job's process alone) and race the
    next launch for the run folder. Its ``checkpoint`` makes the job requeue on timeout or preemption as it is:
    the run folder holds the progress."""

    def __init__(self, arguments: list[str], log: Path):
        self.arguments, self.log = arguments, log

    def __call__(self) -> None:
        from cuig_lightning.cli import main

        # the run's output beside its folder, as local processes write it (the descriptors, so that libraries'
        # and C-level output go there too); the job process does nothing else
        sys.stdout.flush()
        sys.stderr.flush()
        with open(self.log, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        try:
            main(self.arguments)
        except SystemExit as exit_:  # cuig's known errors, after their one line in the log
            if exit_.code:
                raise RuntimeError(f"cuig fit exited with {exit_.code}; see {self.log}") from None

    def checkpoint(self) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


class Slurm:
    """The benchmark's runs as submitit jobs (``cluster="local"``: submitit's local processes, as the tests run
    them); job files and submitit's logs under ``folder``."""

    poll_s = 2.0  # cheap: submitit spaces its sacct calls out however often a job is looked at

    def __init__(self, resources: dict[str, Any] | None, folder: Path, at_once: int | None = None,
                 cluster: str = "slurm"):
        try:
            import submitit
        except ImportError:
            raise SlurmError("the slurm launcher needs submitit: pip install 'cuig[cluster]'") from None
        self.resources = {**DEFAULT_RESOURCES, **(resources or {})}
        for key in ("nodes", "tasks_per_node"):
            if self.resources.get(key, 1) != 1:
                raise SlurmError(f"slurm {key}: {self.resources[key]}: a benchmark job is one `cuig fit` process "
                                 "(one node, one task); give it GPUs with gpus_per_node")
        if at_once is not None and at_once < 1:
            raise SlurmError(f"jobs must be >= 1 (jobs in the queue at once), got {at_once}")
        self.at_once = at_once
        try:
            self.executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        except RuntimeError as err:  # no srun on this machine
            raise SlurmError(f"the slurm launcher: {_one_line(err)}") from None
        try:
            self.executor.update_parameters(**self.resources)
        except (NameError, AssertionError, ValueError, TypeError) as err:  # submitit's words for it, first line
            raise SlurmError(f"slurm resources {self.resources}: {str(err).splitlines()[0]} (submitit's names, "
                             "sbatch options as slurm_<option>: see configs/slurm/benchmark.yaml)") from None

    def start(self, run: Run) -> Any:
        arguments = run.arguments()  # the tuned overlays are written here, now that the needs have finished
        name = "-".join(map(str, ("cuig", *run.key)))
        if "name" not in self.resources:
            self.executor.update_parameters(name=name)
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):  # submitit prints sbatch's complaint; it is said once, below
                return self.executor.submit(FitJob(arguments, run.run_dir.with_suffix(".log")))
        except Exception as err:  # noqa: BLE001 — sbatch's refusal (FailedJobError), a missing sbatch (OSError), ...
            reason = _one_line(err) or _one_line(said.getvalue()) or type(err).__name__
            raise SlurmError(f"sbatch refused {name} ({reason}); finished runs are kept, a rerun resumes") from None

    def outcome(self, run: Run, job: Any) -> str | None:
        if not job.done():
            return None
        return "" if run.finished else f"job {job.job_id} {job.state}"

    def stop(self, job: Any) -> None:
        job.cancel(check=False)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())
