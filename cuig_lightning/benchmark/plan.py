"""Benchmark planning: the tuning grid, the runs of the main table (each an ordinary ``cuig fit``) and the
selection rule. Pure: deciding the plan writes nothing; a run's config files are written when it launches."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cuig_lightning.run_folder import RunFolderError

METRICS = ("UA", "RA_I", "RA_C")


@dataclass
class Tuning:
    """Hyperparameter search on a validation split of concepts.

    Args:
        validation: overlay that replaces ``trainer.requests`` with the validation sequence.
        grid: row -> callback class name -> init argument -> values; every combination is a candidate.
        combine: row -> tuned rows whose chosen values it uses (e.g. merge_gradproj: [merge, gradproj]).
        seed: the seed of the tuning runs.
        min_ua: the selection rule's UA floor, held after every validation request (see :func:`choose`).
    """

    validation: str
    grid: dict[str, dict[str, dict[str, list[int | float]]]]
    combine: dict[str, list[str]] = field(default_factory=dict)
    seed: int = 0
    min_ua: float = 80.0


@dataclass(eq=False)  # runs are compared by identity (needs, failed lists)
class Run:
    """One ``cuig fit`` of the benchmark: configs in order, the seed, and the tuning runs it waits for."""

    key: tuple
    run_dir: Path
    configs: list[str]
    seed: int
    needs: list[Run] = field(default_factory=list)
    prepare: Callable[[], Path] | None = None  # at launch: writes and returns the tuned overlay (last config)
    writes: dict[str, dict] = field(default_factory=dict)  # config files (path -> content) written at launch
    _finished: bool = field(default=False, init=False, repr=False)  # once true it stays true: polled every second

    @property
    def finished(self) -> bool:
        """metrics.json is written when the whole job is done; a run made from other config files
        (benchmark.json, written at launch) is an error, not a finished run to reuse."""
        if self._finished:
            return True
        if not (self.run_dir / "metrics.json").is_file():
            return False
        if not all(n.finished for n in self.needs):
            return False  # its tuned overlay is not known yet; `cuig fit` checks the folder when launched
        stamp = self.run_dir / "benchmark.json"
        if stamp.is_file() and json.loads(stamp.read_text()) != self.stamp():
            raise RunFolderError(f"{self.run_dir} was run from other config files; delete it to rerun")
        self._finished = True
        return True

    def all_configs(self) -> list[str]:
        for path, data in self.writes.items():
            _write_yaml(data, Path(path))
        return self.configs + ([str(self.prepare())] if self.prepare else [])

    def stamp(self) -> dict:
        return {"configs": [yaml.safe_load(Path(c).read_text()) for c in self.all_configs()], "seed": self.seed}

    def arguments(self) -> list[str]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "benchmark.json").write_text(json.dumps(self.stamp(), indent=1))
        return ["fit", *itertools.chain.from_iterable(("--config", c) for c in self.all_configs()),
                f"--trainer.run_dir={self.run_dir}", f"--seed_everything={self.seed}", f"--data.seed={self.seed}"]


def load_rows(run_dir: Path) -> list[dict]:
    """A run's per-request metrics, each with ``erased``: the concepts erased so far (a simultaneous
    run's one request erases them all)."""
    path = run_dir / "metrics.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    erased = 0
    for row in rows:
        erased += len(row["targets"].split())
        row["erased"] = erased
    return rows


def candidates(grid: dict[str, dict[str, list]]) -> list[dict[str, dict]]:
    """Every combination of a row's grid, as {callback class: {argument: value}}."""
    axes = [(cls, arg, values) for cls, args in grid.items() for arg, values in args.items()]
    result = []
    for combo in itertools.product(*(values for _, _, values in axes)):
        updates: dict[str, dict] = {}
        for (cls, arg, _), value in zip(axes, combo):
            updates.setdefault(cls, {})[arg] = value
        result.append(updates)
    return result


def tag(updates: dict[str, dict]) -> str:
    return "_".join(f"{arg}{value:g}" for args in updates.values() for arg, value in args.items()) or "default"


def apply_updates(overlay: dict, updates: dict[str, dict]) -> dict:
    """The overlay with the named callbacks' init_args updated; every named class must be in it."""
    overlay = copy.deepcopy(overlay)
    callbacks = (overlay.get("trainer") or {}).get("callbacks") or []
    for cls, args in updates.items():
        matching = [cb for cb in callbacks if cb["class_path"].split(".")[-1] == cls]
        if not matching:
            raise ValueError(f"tuning names callback {cls!r}, which the row overlay does not use")
        for cb in matching:
            cb.setdefault("init_args", {}).update(args)
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


def _write_yaml(data: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(data, sort_keys=False)
    if not path.is_file() or path.read_text() != text:  # rewrite only on change (keeps mtimes meaningful)
        path.write_text(text)
    return path


def plan(base: list[str], methods: dict[str, str], rows: list[str], seeds: list[int], output: Path,
         tuning: Tuning | None) -> tuple[list[Run], dict]:
    """The tuning runs, then the reported runs (seed-major, so a partial benchmark has whole seeds)."""
    tuning_runs: dict[tuple[str, str], list[tuple[dict, Run]]] = {}
    reported = []
    for method, folder in methods.items():
        for row in rows:
            path = Path(folder) / f"{row}.yaml"
            if not path.is_file():
                raise FileNotFoundError(f"no overlay {path} for row {row!r} of method {method!r}")
            overlay = yaml.safe_load(path.read_text()) or {}
            for updates in candidates(tuning.grid[row]) if tuning and row in tuning.grid else []:
                candidate_dir = output / "tuning" / method / row / tag(updates)
                cfg = candidate_dir.parent / f"{candidate_dir.name}.yaml"
                run = Run(("tuning", method, row, tag(updates)), candidate_dir / f"seed{tuning.seed}",
                          [*base, str(cfg), tuning.validation], tuning.seed,
                          writes={str(cfg): apply_updates(overlay, updates)})
                tuning_runs.setdefault((method, row), []).append((updates, run))
    choices: dict[tuple[str, str], dict] = {}

    def chosen(method: str, row: str) -> dict:
        if (method, row) not in choices:
            options = [(u, load_rows(r.run_dir)) for u, r in tuning_runs[(method, row)]]
            choices[(method, row)] = choose(options, tuning.min_ua)
        return choices[(method, row)]

    for seed in seeds:
        for method, folder in methods.items():
            for row in rows:
                path = Path(folder) / f"{row}.yaml"
                run_dir = output / method / row / f"seed{seed}"
                sources = [row] if (method, row) in tuning_runs else (tuning.combine.get(row, []) if tuning else [])
                if not sources:
                    reported.append(Run((method, row, seed), run_dir, [*base, str(path)], seed))
                    continue

                def tuned_overlay(method=method, row=row, path=path, sources=sources) -> Path:
                    updates = {}
                    for source in sources:
                        updates.update(chosen(method, source))
                    overlay = apply_updates(yaml.safe_load(path.read_text()), updates)
                    return _write_yaml(overlay, output / method / row / "tuned.yaml")

                needs = [r for s in sources for _, r in tuning_runs[(method, s)]]
                reported.append(Run((method, row, seed), run_dir, list(base), seed, needs, tuned_overlay))
    all_tuning = [r for runs in tuning_runs.values() for _, r in runs]
    return all_tuning + reported, {"runs": tuning_runs, "chosen": chosen}


