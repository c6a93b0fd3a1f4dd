"""Benchmark execution: every unfinished run, at most ``jobs`` at once, each after the runs it needs."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

from cuig_lightning.benchmark.plan import Run


def execute(runs: list[Run], fit: Callable[[list[str]], object], jobs: int = 1) -> list[Run]:
    """Run every unfinished run, at most ``jobs`` at once, each after the runs it needs; return the failed.

    ``jobs == 1`` runs ``fit(arguments)`` in this process (errors propagate); otherwise each run is a
    ``python -m cuig_lightning fit`` process whose output goes to ``<run folder>.log``.
    """
    if jobs < 1:  # no run could ever start
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    pending = [r for r in runs if not r.finished]
    running: dict[int, tuple[Run, subprocess.Popen]] = {}
    failed: list[Run] = []
    total, done, t0 = len(pending), 0, time.time()
    while pending or running:
        progressed = False
        for run in list(pending):
            if len(running) >= jobs:
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
            if jobs == 1:
                fit(run.arguments())
                done += 1
                continue
            run.run_dir.parent.mkdir(parents=True, exist_ok=True)
            with open(run.run_dir.with_suffix(".log"), "ab") as log:
                process = subprocess.Popen([sys.executable, "-m", "cuig_lightning", *run.arguments()],
                                           stdout=log, stderr=subprocess.STDOUT)
            running[process.pid] = (run, process)
        for pid, (run, process) in list(running.items()):
            if process.poll() is None:
                continue
            del running[pid]
            done += 1
            progressed = True
            ok = process.returncode == 0 and run.finished
            if not ok:
                failed.append(run)
            print(f"[benchmark] {'done' if ok else f'FAILED (exit {process.returncode})'} {'/'.join(map(str, run.key))} ({done}/{total}, "
                  f"{time.time() - t0:.0f} s)", flush=True)
        if running:
            time.sleep(1)
        elif pending and not progressed:
            raise RuntimeError("benchmark runs wait on runs that never ran")  # a bug in plan(), not user input
    return failed
