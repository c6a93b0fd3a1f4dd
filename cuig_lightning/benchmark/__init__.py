"""``cuig benchmark``: the paper's main table on Canvas-mini — every row × method × seed, then the report.

Each run is an ordinary ``cuig fit`` with the base config, the row's overlay and the seed, in its own run
folder under ``output``; finished runs are skipped, so an interrupted benchmark resumes where it stopped.

With a ``tuning`` section, each tuned row first runs its hyperparameter grid on a *validation* sequence
of concepts that the reported sequence does not contain; the selection rule (:func:`choose`) picks one
candidate per (method, row), and the reported runs use it. Choices and candidates go to
``report/tuning.md``. ``jobs > 1`` runs that many ``cuig fit`` processes at once (logs next to each run
folder); a run starts when the tuning runs it depends on have finished.

The report (table, per-request CSV, curves, drift and similarity scatters, summary.json) is rebuilt from
the runs' metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cuig_lightning.benchmark.execute import execute
from cuig_lightning.benchmark.plan import Run, Tuning, apply_updates, candidates, choose, plan, tag
from cuig_lightning.benchmark.report import pearson, write_benchmark_report, write_tuning_report

__all__ = ["Run", "Tuning", "apply_updates", "candidates", "choose", "execute", "pearson", "plan", "run_benchmark",
           "tag", "write_benchmark_report", "write_tuning_report"]


def run_benchmark(base: list[str], methods: dict[str, str], rows: list[str], seeds: list[int], output: str,
                  report: str, tuning: Tuning | None = None, jobs: int = 1, report_only: bool = False,
                  fit: Callable[[list[str]], object] | None = None) -> Path:  # fmt: skip
    """Run every (method, row, seed) of the main table (after the tuning runs) and write the report.

    The arguments are those of ``cuig benchmark`` (:func:`cuig_lightning.commands.benchmark`, where they are
    documented), plus ``fit``, which runs one ``cuig fit`` in this process when ``jobs == 1``.
    """
    runs, tuned = plan(base, methods, rows, seeds, Path(output), tuning)
    failed = [] if report_only else execute(runs, fit, jobs)
    path = write_benchmark_report([r for r in runs if r.key[0] != "tuning"], Path(report), base[0],
                                  tuning.min_ua if tuning else None)
    if tuning:
        write_tuning_report(tuned, tuning, Path(report))
    if failed:
        logs = ", ".join(str(r.run_dir.with_suffix(".log")) for r in failed[:3])
        raise RuntimeError(f"{len(failed)} benchmark run(s) failed; logs: {logs}")
    return path
