"""Benchmark execution: every unfinished run, each after the runs it needs, through a launcher — this process or
N local ``cuig fit`` processes (here), or SLURM jobs (:mod:`cuig_lightning.benchmark.slurm`)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from cuig_lightning.benchmark.plan import Run


class Launcher(Protocol):
    """Where runs go. ``start`` launches a run whose needs have finished and returns a handle; ``outcome`` is None
    while it runs, then ``""`` if the run finished or why not; ``stop`` ends one still running."""

    at_once: int | None  # runs at once (None: every run whose needs have finished)
    poll_s: float  # seconds between looks at the running ones

    def start(self, run: Run) -> Any: ...

    def outcome(self, run: Run, handle: Any) -> str | None: ...

    def stop(self, handle: Any) -> None: ...


class InProcess:
    """``fit(arguments)`` in this process, one run after another (its errors propagate)."""

    at_once, poll_s = 1, 0.0

    def __init__(self, fit: Callable[[list[str]], object]):
        self.fit = fit

    def start(self, run: Run) -> None:
        self.fit(run.arguments())

    def outcome(self, run: Run, handle: None) -> str:
        return ""  # it has returned

    def stop(self, handle: None) -> None:
        pass


class Processes:
    """``at_once`` ``python -m cuig_lightning fit`` processes, each run's output appended to ``<run folder>.log``."""

    poll_s = 1.0

    def __init__(self, at_once: int):
        self.at_once = at_once

    def start(self, run: Run) -> subprocess.Popen:
        run.run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(run.run_dir.with_suffix(".log"), "ab") as log:
            return subprocess.Popen([sys.executable, "-m", "cuig_lightning", *run.arguments()],
                                    stdout=log, stderr=subprocess.STDOUT)

    def outcome(self, run: Run, process: subprocess.Popen) -> str | None:
        if process.poll() is None:
            return None
        return "" if process.returncode == 0 and run.finished else f"exit {process.returncode}"

    def stop(self, process: subprocess.Popen) -> None:
        process.terminate()


def local(fit: Callable[[list[str]], object] | None, jobs: int = 1) -> Launcher:
    """This machine: ``jobs == 1`` runs ``fit(arguments)`` in this process, more run that many processes."""
    if jobs < 1:  # no run could ever start
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    return InProcess(fit) if jobs == 1 else Processes(jobs)


def execute(runs: list[Run], launcher: Launcher) -> list[Run]:
    """Launch every unfinished run once the runs it needs have finished (at most ``launcher.at_once`` at a time, in
    the order given) and wait for them all; return the failed ones (a run whose need failed fails too)."""
    pending = [r for r in runs if not r.finished]
    running: dict[Run, Any] = {}
    failed: list[Run] = []
    total, done, t0 = len(pending), 0, time.time()
    try:
        while pending or running:
            progressed = False
            for run in list(pending):
                if launcher.at_once is not None and len(running) >= launcher.at_once:
                    break
                if any(n in failed for n in run.needs):
                    pending.remove(run)
                    failed.append(run)
                    progressed = True
                    continue
                if not all(n.finished for n in run.needs):
                    continue
                pending.remove(run)
                progressed = True
                print(f"[benchmark] start {'/'.join(map(str, run.key))} -> {run.run_dir}", flush=True)
                running[run] = launcher.start(run)
            for run, handle in list(running.items()):
                why = launcher.outcome(run, handle)
                if why is None:
                    continue
                del running[run]
                done += 1
                progressed = True
                if why:
                    failed.append(run)
                print(f"[benchmark] {f'FAILED ({why})' if why else 'done'} {'/'.join(map(str, run.key))} "
                      f"({done}/{total}, {time.time() - t0:.0f} s)", flush=True)
            if running:
                time.sleep(launcher.poll_s)
            elif pending and not progressed:
                raise RuntimeError("benchmark runs wait on runs that never ran")  # a bug in plan(), not user input
    finally:
        # a run left going without its benchmark would race the next launch for its run folder; stopped, it resumes
        for handle in running.values():
            launcher.stop(handle)
    return failed
