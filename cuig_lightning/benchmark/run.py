"""One run of the benchmark (:class:`Run`): an ordinary ``cuig fit`` with its config files, seed and options, the
tuning runs it waits for, and when its run folder counts as finished (:func:`load_rows` reads its metrics)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cuig_lightning.run_folder import RunFolderError


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
    # trainer.measure_retention (a name or a list of request numbers); not part of the run's identity either
    measure_retention: str | list[int] = "every_request"
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
            value = self.measure_retention
            economy.append(f"--trainer.measure_retention={value if isinstance(value, str) else json.dumps(value)}")
        elif self.curve_seeds is not None:
            economy.append(f"--trainer.curve_seeds={self.curve_seeds}")
        return ["fit", *itertools.chain.from_iterable(("--config", c) for c in self.all_configs()), *self.overrides,
                *economy, f"--trainer.run_dir={self.run_dir}", f"--seed_everything={self.seed}", f"--data.seed={self.seed}"]


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


def _write_yaml(data: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(data, sort_keys=False)
    if not path.is_file() or path.read_text() != text:  # rewrite only on change (keeps mtimes meaningful)
        path.write_text(text)
    return path
