"""Benchmark planning: the tuning grid, the runs of the main table and of the simultaneous curve (each an
ordinary ``cuig fit``) and the selection rule. Pure: deciding the plan writes nothing; a run's config files
are written when it launches."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from cuig_lightning.run_folder import RunFolderError

METRICS = ("UA", "RA_I", "RA_C")
REFERENCE = "sequential"  # the row whose tuning sweep (the learning rate) is the trade-off plot's reference curve
SIMULTANEOUS = "simultaneous"  # the row whose runs the simultaneous curve repeats on the first n targets

Values = list[int | float | list[float]]  # a list value: e.g. a per-request λ schedule


@dataclass
class Tuning:
    """Hyperparameter search on a validation split of concepts.

    Args:
        validation: overlay that replaces ``trainer.requests`` with the validation sequence.
        grid: row -> axes; every combination of a row's axes is a candidate. An axis is either a callback,
            ``ClassName: {init_arg: [values]}`` (the row overlay's ``trainer.callbacks`` entry whose class_path
            ends in ``ClassName``), or a config path, ``section.key: [values]``: a key with a dot, set in the
            row overlay, e.g. ``model.learning_rate: [1.0e-5, 2.0e-5]``. Class names have no dot.
        combine: row -> tuned rows whose chosen callback values it uses (e.g. merge_gradproj: [merge, gradproj]).
            Config paths (the learning rate) are not inherited: a combined row tunes them in its own grid entry,
            each candidate run with its parts' choices (so its tuning runs wait for its parts').
        seed: the seed of the tuning runs.
        min_ua: the selection rule's UA floor, held after every validation request (see :func:`choose`).
        stop_below_min_ua: end a candidate's run after the first validation request with UA < ``min_ua``
            (``trainer.stop_below_ua``): the rule can no longer choose it, so its remaining requests are skipped
            (most of a weak candidate's cost on a CPU). Its trade-off point is then where it stopped; running
            the benchmark again with this off completes those runs.
        measure_retention: ``last_request``: a candidate's RA-I / RA-C are measured after its last validation
            request only (and where it stops), UA after every one: all the rule and the trade-off plot read
            (``trainer.measure_retention``; about 2.5x less evaluation). ``every_request``: the full curves.
    """

    validation: str
    grid: dict[str, dict[str, dict[str, Values] | Values]]
    combine: dict[str, list[str]] = field(default_factory=dict)
    seed: int = 0
    min_ua: float = 80.0
    stop_below_min_ua: bool = False
    measure_retention: Literal["every_request", "last_request"] = "every_request"


@dataclass(eq=False)  # runs are compared by identity (needs, failed lists)
class Run:
    """One ``cuig fit`` of the benchmark: configs in order, extra command-line options, the seed, and the
    tuning runs it waits for."""

    key: tuple
    run_dir: Path
    configs: list[str]
    seed: int
    needs: list[Run] = field(default_factory=list)
    # config files this run writes at launch: path -> content, or a function giving it once `needs` have
    # finished (a tuned overlay)
    writes: dict[str, dict | Callable[[], dict]] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # options after the configs, e.g. --trainer.requests=[...]
    # end the job after a request with UA below this (trainer.stop_below_ua); not part of the run's identity
    stop_below_ua: float | None = None
    # trainer.measure_retention; not part of the run's identity either
    measure_retention: str = "every_request"
    # trainer.curve_seeds (RA-I / RA-C between the first and last request from fewer seeds); nor this
    curve_seeds: int | None = None
    _finished: bool = field(default=False, init=False, repr=False)  # once true it stays true: polled every second

    @property
    def finished(self) -> bool:
        """Finished when metrics.json has a row for every planned stage (the job rewrites it after each
        request, so an interrupted job leaves a partial one: that run is resumed, not reported), or, with
        ``stop_below_ua``, a row below it (:meth:`stopped`); a run made from other config files (benchmark.json,
        written at launch) is an error, not a finished run to reuse."""
        if self._finished:
            return True
        rows = load_rows(self.run_dir)
        if len(rows) < self.planned_stages() and not self.stopped(rows):
            return False
        if not all(n.finished for n in self.needs):
            return False  # its tuned overlay is not known yet; `cuig fit` checks the folder when launched
        stamp = self.run_dir / "benchmark.json"
        if stamp.is_file() and json.loads(stamp.read_text()) != self.stamp():
            raise RunFolderError(f"{self.run_dir} was run from other config files; delete it to rerun")
        self._finished = True
        return True

    def stopped(self, rows: list[dict]) -> bool:
        """Whether the job ended early by ``stop_below_ua``: a request's UA fell below it before the last one
        (a run that has every row, e.g. one run before the rule, was not stopped)."""
        return (self.stop_below_ua is not None and len(rows) < self.planned_stages()
                and any(row["UA"] < self.stop_below_ua for row in rows))

    def planned_stages(self) -> int:
        """The metrics rows of the finished job: one per request, one for a simultaneous job."""
        trainer = self.trainer_settings()
        return 1 if trainer.get("schedule") == "simultaneous" else len(trainer.get("requests") or [])

    def trainer_settings(self) -> dict:
        """The job's top-level ``trainer`` keys, read from the config files in order (a later file's keys win, as
        in ``cuig fit``) and the ``--trainer.KEY=`` overrides — not from the run folder's job.json, which a
        clone of the results does not have."""
        trainer: dict = {}
        for config in self.configs:
            if Path(config).is_file():  # a tuned overlay is written at launch: before that its run cannot be finished
                trainer.update((yaml.safe_load(Path(config).read_text()) or {}).get("trainer") or {})
        for option in self.overrides:
            option_key, _, value = option.partition("=")
            key = option_key.removeprefix("--trainer.")
            if key != option_key and "." not in key:  # a top-level trainer key, not a nested one
                trainer[key] = yaml.safe_load(value)
        return trainer

    def all_configs(self) -> list[str]:
        """The config files, after writing those this run writes."""
        for path, content in self.writes.items():
            _write_yaml(content() if callable(content) else content, Path(path))
        return self.configs

    def stamp(self) -> dict:
        stamp = {"configs": [yaml.safe_load(Path(c).read_text()) for c in self.all_configs()], "seed": self.seed}
        return {**stamp, "overrides": self.overrides} if self.overrides else stamp

    def arguments(self) -> list[str]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "benchmark.json").write_text(json.dumps(self.stamp(), indent=1))
        economy = [] if self.stop_below_ua is None else [f"--trainer.stop_below_ua={self.stop_below_ua}"]
        if self.measure_retention != "every_request":
            economy.append(f"--trainer.measure_retention={self.measure_retention}")
        elif self.curve_seeds is not None:
            economy.append(f"--trainer.curve_seeds={self.curve_seeds}")
        return ["fit", *itertools.chain.from_iterable(("--config", c) for c in self.all_configs()), *self.overrides,
                *economy, f"--trainer.run_dir={self.run_dir}", f"--seed_everything={self.seed}", f"--data.seed={self.seed}"]


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


def load_rows(run_dir: Path) -> list[dict]:
    """A run's per-request metrics, each with ``erased``: the concepts erased so far (a simultaneous
    run's one request erases them all)."""
    path = run_dir / "metrics.json"
    try:
        rows = json.loads(path.read_text()) if path.is_file() else []
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFolderError(f"{path} is not readable JSON ({err}); delete {run_dir} to rerun it") from None
    erased = 0
    for row in rows:
        erased += len(row["targets"].split())
        row["erased"] = erased
    return rows


def is_path(key: str) -> bool:
    """A grid axis named with a dot is a config path (``model.learning_rate``); without, a callback class."""
    return "." in key


def candidates(grid: dict[str, dict | list]) -> list[dict]:
    """Every combination of a row's grid, as updates {callback class: {argument: value}, config path: value}."""
    axes = []  # (grid key, init argument or None for a config path, values)
    for key, spec in grid.items():
        axes.extend([(key, None, spec)] if is_path(key) else [(key, arg, values) for arg, values in spec.items()])
    result = []
    for combo in itertools.product(*(values for _, _, values in axes)):
        updates: dict = {}
        for (key, arg, _), value in zip(axes, combo):
            if arg is None:
                updates[key] = value
            else:
                updates.setdefault(key, {})[arg] = value
        result.append(updates)
    return result


def tag(updates: dict) -> str:
    """A candidate's folder name: name and value of each setting (a config path by its last key; a list value,
    e.g. a per-request λ schedule, joined by ``-``), e.g. ``weight2500_learning_rate1e-05``, ``lam1-1.5-2``;
    ``default`` for no setting."""
    settings = []
    for key, value in updates.items():
        settings += [(key.rsplit(".", 1)[-1], value)] if is_path(key) else list(value.items())

    def text(value) -> str:
        return "-".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"

    return "_".join(f"{name}{text(value)}" for name, value in settings) or "default"


def apply_updates(overlay: dict, updates: dict) -> dict:
    """The overlay with the named callbacks' init_args updated (every named class must be in it) and the
    config paths set."""
    overlay = copy.deepcopy(overlay)
    callbacks = (overlay.get("trainer") or {}).get("callbacks") or []
    for key, value in updates.items():
        if is_path(key):
            *parents, last = key.split(".")
            node = overlay
            for part in parents:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
                if not isinstance(node, dict):
                    raise ValueError(f"tuning sets {key!r}, but {part!r} in the row overlay is not a section")
            node[last] = value
            continue
        matching = [cb for cb in callbacks if cb["class_path"].split(".")[-1] == key]
        if not matching:
            raise ValueError(f"tuning names callback {key!r}, which the row overlay does not use")
        for cb in matching:
            cb.setdefault("init_args", {}).update(value)
    return overlay


def choose(results: list[tuple[dict, list[dict]]], min_ua: float) -> dict:
    """The selection rule (matched forgetting): among candidates whose validation UA is >= ``min_ua`` after
    *every* request, the highest mean of RA-I and RA-C after the last one; if none erases that well, the one
    with the highest worst UA. ``results``: (updates, per-request metrics rows) pairs."""
    erasing = [r for r in results if worst_ua(r[1]) >= min_ua]
    if erasing:
        return max(erasing, key=lambda r: (r[1][-1]["RA_I"] + r[1][-1]["RA_C"]) / 2)[0]
    return max(results, key=lambda r: worst_ua(r[1]))[0]


def worst_ua(rows: list[dict]) -> float:
    """The lowest UA over a run's requests (the matched-forgetting rule holds a run to every request)."""
    return min(row["UA"] for row in rows)


def base_value(base: list[str], path: str):
    """The value at the dotted ``path`` in the last base config that sets it (None if none does)."""
    value = None
    for config in base:
        node = yaml.safe_load(Path(config).read_text()) or {}
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        value = value if node is None else node
    return value


def _write_yaml(data: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(data, sort_keys=False)
    if not path.is_file() or path.read_text() != text:  # rewrite only on change (keeps mtimes meaningful)
        path.write_text(text)
    return path


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
