"""``cuig benchmark``: the paper's main table on Canvas-mini — every row × method × seed, then the report.

Each run is an ordinary ``cuig fit`` with the base config(s), the row's overlay and the seed, in its own run
folder under ``output``; finished runs are skipped, so an interrupted benchmark resumes where it stopped.

With a ``tuning`` section, each tuned row first runs its hyperparameter grid (callback arguments and config
paths such as ``model.learning_rate``; see :class:`Tuning`) on a *validation* sequence of concepts that the
reported sequence does not contain; the selection rule (:func:`choose`) picks one candidate per (method, row),
and the reported runs use it. Choices and candidates go to ``report/tuning.md``, every candidate's final
validation UA and RA-I to ``report/tradeoff.png`` / ``tradeoff.json`` (the trade-off frontier, the sequential
row's sweep as the reference). With ``simultaneous_n``, the simultaneous row is also run from θ0 on the first n
reported targets for each n (the simultaneous curve). ``jobs > 1`` runs that many ``cuig fit`` processes at once
(logs next to each run folder), a ``launcher`` (:mod:`cuig_lightning.benchmark.slurm`) runs them as SLURM jobs; a
run starts when the tuning runs it depends on have finished.

The report (table, simultaneous curve, per-request CSV, curves, drift and similarity scatters, summary.json,
tuning and trade-off, and the GradProj ablation's ``gradproj_ablation.md`` from its runs under ``output``) is
rebuilt from the runs' metrics. The report step also writes each row's chosen hyperparameters (learning rate
included) as a ready overlay ``chosen/<method>/<row>.yaml`` beside the first base config (for the paper's table,
``configs/chosen/``; :func:`write_chosen_configs`): ``cuig fit --config BASE... --config configs/chosen/M/ROW.yaml``
trains what the table's run of the row trained.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cuig_lightning.benchmark.ablation import gradproj_ablation_plan, write_gradproj_ablation
from cuig_lightning.benchmark.execute import Launcher, execute, local
from cuig_lightning.benchmark.plan import Plan, Run, Tuning, apply_updates, candidates, choose, plan, tag
from cuig_lightning.benchmark.chosen_configs import chosen_overlay, write_chosen_configs
from cuig_lightning.benchmark.report import pearson, write_benchmark_report
from cuig_lightning.benchmark.tuning_report import tuning_points, write_tuning_report

__all__ = ["Plan", "Run", "Tuning", "apply_updates", "candidates", "choose", "chosen_overlay", "execute", "pearson",
           "plan", "run_benchmark", "tag", "tuning_points", "write_benchmark_report", "write_chosen_configs",
           "write_tuning_report"]


def run_benchmark(base: list[str], methods: dict[str, str], rows: list[str], seeds: list[int], output: str,
                  report: str, tuning: Tuning | None = None, jobs: int = 1, report_only: bool = False,
                  fit: Callable[[list[str]], object] | None = None,
                  simultaneous_n: list[int] | None = None, gradproj_ablation: bool = False,
                  curve_seeds: int | None = None, chosen: str | Path | None = None,
                  launcher: Launcher | None = None) -> Path:
    """Run every (method, row, seed) of the main table (after the tuning runs) and the simultaneous curve,
    then write the report.

    The arguments are those of ``cuig benchmark`` (:func:`cuig_lightning.commands.benchmark`, where they are
    documented), plus ``fit``, which runs one ``cuig fit`` in this process when ``jobs == 1``, ``chosen``: the
    folder of the rows' chosen overlays (None: ``chosen`` beside the first base config, e.g. configs/chosen), and
    ``launcher``: where the runs go (None: this machine, ``fit`` or ``jobs`` processes; a
    :class:`cuig_lightning.benchmark.slurm.Slurm`: SLURM jobs).
    """
    planned = plan(base, methods, rows, seeds, Path(output), tuning, simultaneous_n, curve_seeds)
    ablation = gradproj_ablation_plan(base, Path(output)) if gradproj_ablation else []
    # the ablation explains the first method's (ConAbl's) table: launched once that table has one seed
    cut = planned.first_seed_end
    failed = [] if report_only else execute(planned.runs[:cut] + ablation + planned.runs[cut:],
                                            launcher or local(fit, jobs))
    path = write_benchmark_report(planned, Path(report), base, tuning.min_ua if tuning else None)
    if tuning:
        write_tuning_report(planned, tuning, Path(report))
    if chosen is None and base:
        chosen = Path(base[0]).parent / "chosen"
    if chosen is not None:
        write_chosen_configs(planned, methods, base, Path(chosen), Path(report) if tuning else None, Path(output),
                             curve_seeds)
    write_gradproj_ablation(Path(output), Path(report))  # gradproj_ablation.md, once its runs under output exist
    if failed:
        logs = ", ".join(str(r.run_dir.with_suffix(".log")) for r in failed[:3])
        raise RuntimeError(f"{len(failed)} benchmark run(s) failed; logs: {logs}")
    return path
