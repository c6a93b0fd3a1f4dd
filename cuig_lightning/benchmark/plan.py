"""Benchmark planning: the tuning runs, the runs of the main table and of the simultaneous curve (each an
ordinary ``cuig fit``, a :class:`~cuig_lightning.benchmark.run.Run`), with the tuning grid and the selection rule
of :mod:`cuig_lightning.benchmark.tuning`. Pure: deciding the plan writes nothing; a run's config files are
written when it launches."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from cuig_lightning.benchmark.run import Run, load_rows
from cuig_lightning.benchmark.tuning import Tuning, Values, apply_updates, candidates, choose, is_path, tag, worst_ua

__all__ = ["METRICS", "REFERENCE", "SIMULTANEOUS", "Plan", "Run", "Tuning", "Values", "apply_updates", "base_value",
           "candidates", "choose", "is_path", "load_rows", "plan", "tag", "worst_ua"]

METRICS = ("UA", "RA_I", "RA_C")
REFERENCE = "sequential"  # the row whose tuning sweep (the learning rate) is the trade-off plot's reference curve
SIMULTANEOUS = "simultaneous"  # the row whose runs the simultaneous curve repeats on the first n targets


@dataclass
class Plan:
    """What :func:`plan` decides. ``runs``: every run once, in launch order: method by method (the first
    method's table is whole before the next one's tuning starts, as a CPU-only benchmark wants it), each its
    tuning runs, then seed by seed its reported and curve runs; the other fields index them.

    Args:
        runs: every run.
        first_seed_end: how many of ``runs`` make the first method's table for its first seed (its tuning
            included): where runs that read beside that table (the GradProj ablation) are launched.
        tuning: (method, tuned row) -> its candidates (updates, as :func:`candidates` makes them) and their runs.
        reported: the main table's runs, keyed (method, row, seed).
        curve: (method, n, seed) -> the simultaneous run from θ0 on the first n reported targets (for n = all of
            them, the simultaneous row's own run when the table has that row).
        chosen: (method, tuned row) -> the candidate :func:`choose` picks; call it once the row's runs finished.
        settings: (method, row) -> the updates its reported runs use: its parts' chosen callback values
            (``combine``), then its own chosen candidate.
    """

    runs: list[Run]
    first_seed_end: int
    tuning: dict[tuple[str, str], list[tuple[dict, Run]]]
    reported: list[Run]
    curve: dict[tuple[str, int, int], Run]
    chosen: Callable[[str, str], dict]
    settings: Callable[[str, str], dict]


def base_value(base: list[str], path: str):
    """The value at the dotted ``path`` in the last base config that sets it (None if none does)."""
    value = None
    for config in base:
        node = yaml.safe_load(Path(config).read_text()) or {}
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        value = value if node is None else node
    return value


def plan(base: list[str], methods: dict[str, str], rows: list[str], seeds: list[int], output: Path,
         tuning: Tuning | None = None, simultaneous_n: list[int] | None = None,
         curve_seeds: int | None = None) -> Plan:
    """The tuning runs of every tuned row (and of the parts of combined rows), the reported runs of every
    (method, row, seed), and for each n in ``simultaneous_n`` a simultaneous run per (method, seed) on the
    first n targets of the base configs' ``trainer.requests``. ``curve_seeds``: the reported runs'
    ``trainer.curve_seeds``."""
    grid, combine = (tuning.grid, tuning.combine) if tuning else ({}, {})
    simultaneous_n = simultaneous_n or []
    needed = list(dict.fromkeys([*rows, *([SIMULTANEOUS] if simultaneous_n else [])]))
    parts = list(dict.fromkeys(p for row in needed for p in combine.get(row, [])))
    for part in parts:
        if part not in grid or part in combine:
            raise ValueError(f"tuning.combine uses {part!r}, which is not a tuned row of its own")
    every_row = list(dict.fromkeys([*needed, *parts]))
    overlays = {}  # (method, row) -> (its overlay file, the file's content)
    for method, folder in methods.items():
        for row in every_row:
            path = Path(folder) / f"{row}.yaml"
            if not path.is_file():
                raise FileNotFoundError(f"no overlay {path} for row {row!r} of method {method!r}")
            overlays[(method, row)] = (path, yaml.safe_load(path.read_text()) or {})
    requests = base_value(base, "trainer.requests") or []
    if not all(1 <= n <= len(requests) for n in simultaneous_n):
        raise ValueError(f"simultaneous_n {simultaneous_n}: each n must be 1 to {len(requests)} (the base requests)")

    tuning_runs: dict[tuple[str, str], list[tuple[dict, Run]]] = {}
    choices: dict[tuple[str, str], dict] = {}

    def chosen(method: str, row: str) -> dict:
        if (method, row) not in choices:
            options = [(u, load_rows(r.run_dir)) for u, r in tuning_runs[(method, row)]]
            choices[(method, row)] = choose(options, tuning.min_ua)
        return choices[(method, row)]

    def inherited(method: str, row: str) -> dict:
        return {k: v for part in combine.get(row, []) for k, v in chosen(method, part).items() if not is_path(k)}

    def settings(method: str, row: str) -> dict:
        return {**inherited(method, row), **(chosen(method, row) if (method, row) in tuning_runs else {})}

    for method in methods:
        # table order, combined rows last (their candidates need their parts')
        for row in sorted((r for r in every_row if r in grid), key=lambda r: r in combine):
            options = candidates(grid[row])
            if len({tag(u) for u in options}) < len(options):
                raise ValueError(f"tuning grid of {row!r}: two candidates get the same folder name; rename an axis")
            needs = [run for part in combine.get(row, []) for _, run in tuning_runs[(method, part)]]
            for updates in options:
                candidate_dir = output / "tuning" / method / row / tag(updates)
                cfg = candidate_dir.parent / f"{candidate_dir.name}.yaml"

                def overlay(method=method, row=row, updates=updates) -> dict:
                    return apply_updates(overlays[(method, row)][1], {**inherited(method, row), **updates})

                run = Run(("tuning", method, row, tag(updates)), candidate_dir / f"seed{tuning.seed}",
                          [*base, str(cfg), tuning.validation], tuning.seed, needs, writes={str(cfg): overlay},
                          stop_below_ua=tuning.min_ua if tuning.stop_below_min_ua else None,
                          measure_retention=tuning.measure_retention)
                tuning_runs.setdefault((method, row), []).append((updates, run))

    def row_run(method: str, row: str, seed: int, key: tuple, run_dir: Path, overrides: list[str]) -> Run:
        """A run of the row's overlay; with its tuned values when it is tuned or combines tuned rows."""
        sources = [s for s in [*combine.get(row, []), row] if (method, s) in tuning_runs]
        if not sources:
            return Run(key, run_dir, [*base, str(overlays[(method, row)][0])], seed, overrides=overrides,
                       curve_seeds=curve_seeds)
        tuned = output / method / row / "tuned.yaml"
        needs = [r for s in sources for _, r in tuning_runs[(method, s)]]

        def write() -> dict:
            return apply_updates(overlays[(method, row)][1], settings(method, row))

        return Run(key, run_dir, [*base, str(tuned)], seed, needs, {str(tuned): write}, overrides,
                   curve_seeds=curve_seeds)

    runs, reported, curve, first_seed_end = [], [], {}, None
    for method in methods:
        runs += [run for (m, _), options in tuning_runs.items() if m == method for _, run in options]
        for seed in seeds:
            for row in rows:
                run_dir = output / method / row / f"seed{seed}"
                reported.append(row_run(method, row, seed, (method, row, seed), run_dir, []))
                runs.append(reported[-1])
            for n in simultaneous_n:
                if n == len(requests) and SIMULTANEOUS in rows:  # all the targets: the simultaneous row's run
                    curve[(method, n, seed)] = next(r for r in reported if r.key == (method, SIMULTANEOUS, seed))
                    continue
                run_dir = output / method / "simultaneous_n" / f"n{n}" / f"seed{seed}"
                first_n = f"--trainer.requests={json.dumps(requests[:n])}"
                curve[(method, n, seed)] = row_run(method, SIMULTANEOUS, seed, ("simultaneous_n", method, n, seed),
                                                   run_dir, [first_n])
                runs.append(curve[(method, n, seed)])
            if first_seed_end is None:
                first_seed_end = len(runs)
    return Plan(runs, len(runs) if first_seed_end is None else first_seed_end, tuning_runs, reported, curve,
                chosen, settings)
