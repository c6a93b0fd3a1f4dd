"""The benchmark's tuning: the grid of a tuned row (:class:`Tuning`), its candidates and their folder names, the
row overlay each candidate runs, and the selection rule that picks one. Pure: nothing here runs or writes."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Literal

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
