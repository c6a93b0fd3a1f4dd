"""The GradProj ablation (issue 14): which runs to make, and its report ``gradproj_ablation.md``.

Cells: {AdamW, SGD} × {no GradProj, C from ``captions``, from in-prompt ``names``, from ``bare_names``}, each an
overlay ``configs/paper/gradproj_ablation/<optimizer>-<source>.yaml`` on the benchmark's base configs
(``configs/seq12.yaml`` first) with the :class:`callbacks.KeyValueDrift` probe, one seed (:data:`SEED`). A
cell's run folder is ``<runs_dir>/gradproj_ablation/<cell>/seed<seed>``; the probe writes
``requests/NN-<target>/kv_drift.json`` there (kept in git beside metrics.json, so ``--report_only`` can rebuild
the table).

``cuig benchmark --gradproj_ablation true`` (on in ``configs/paper/main_table.yaml``) adds
:func:`gradproj_ablation_plan`'s runs to the table's and calls :func:`write_gradproj_ablation` after the other
reports (it writes nothing while no cell has a finished request).

Every number in the report comes from the runs' ``metrics.json`` and ``kv_drift.json``; the conclusion paragraph
is made from them by the rules of :func:`conclusion`, never written by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ABLATION = "gradproj_ablation"
CONFIG_DIR = Path("configs/paper/gradproj_ablation")
OPTIMIZERS = ("adamw", "sgd")
SOURCES = ("none", "captions", "names", "bare_names")  # none: no GradProj, the reference of its optimizer
CELLS = tuple(f"{o}-{s}" for o in OPTIMIZERS for s in SOURCES)
SEED = 0
DRIFT = ("weights", "C", "retained", "target")  # the probe's groups (callbacks/key_value_drift.py), table order
LABEL = {"adamw": "AdamW", "sgd": "SGD"}


def gradproj_ablation_runs(base: list[str], config_dir: str | Path = CONFIG_DIR) -> dict[str, list[str]]:
    """cell -> the config files of its ``cuig fit``, in order: the ``base`` configs (the benchmark's ``base``
    list, ``configs/seq12.yaml`` first), then the cell's overlay."""
    return {cell: [*map(str, base), str(Path(config_dir) / f"{cell}.yaml")] for cell in CELLS}


def gradproj_ablation_plan(base: list[str], runs_dir: Path) -> list:
    """The ablation's runs for the benchmark's executor: one per cell, one seed, on the benchmark's ``base``.
    The report reads RA-I / RA-C after the last request only (and the probe at every step), so the cells
    measure retention there alone (``trainer.measure_retention: last_request``; UA after every request)."""
    from cuig_lightning.benchmark.plan import Run

    return [Run((ABLATION, cell, SEED), gradproj_ablation_dir(runs_dir, cell), configs, SEED,
                measure_retention="last_request")
            for cell, configs in gradproj_ablation_runs(base).items()]


def gradproj_ablation_dir(runs_dir: Path, cell: str, seed: int = SEED) -> Path:
    """The run folder of a cell: ``runs_dir/gradproj_ablation/<cell>/seed<seed>``."""
    return Path(runs_dir) / ABLATION / cell / f"seed{seed}"


# ------------------------------------------------------------------------------------------------ reading
def read_run(run_dir: Path) -> dict | None:
    """One run's numbers: UA / RA-I / RA-C after its last evaluated request, and for each probe group the
    drift ratio at the end of request 1 (``<group>_first``) and its mean over the requests' ends
    (``<group>_mean``), with the optimizer and C's source the probe recorded. None without an evaluated
    request that has a probe record."""
    path = run_dir / "metrics.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    probed = {int(p.parent.name.split("-")[0]): json.loads(p.read_text())
              for p in run_dir.glob("requests/*/kv_drift.json")}
    records = [probed[row["request"]] for row in rows if row["request"] in probed]
    if not records:
        return None
    result = {"optimizer": records[0]["optimizer"].lower(), "source": records[0]["c_source"] or "none",
              "requests": len(records), **{k: rows[-1][k] for k in ("UA", "RA_I", "RA_C") if k in rows[-1]}}
    for group in DRIFT:
        ends = [r["final"][group] for r in records if group in r["final"]]
        if ends:
            result.update({f"{group}_first": ends[0], f"{group}_mean": sum(ends) / len(ends)})
    return result


def read_cells(runs_dir: Path) -> dict[str, dict]:
    """cell -> its runs' numbers averaged over seeds (``seeds``: how many), for every cell with a run."""
    cells = {}
    for cell in CELLS:
        runs = [r for d in sorted((Path(runs_dir) / ABLATION / cell).glob("seed*")) if (r := read_run(d))]
        if runs:
            numbers = {k for r in runs for k, v in r.items() if isinstance(v, (int, float))}
            cells[cell] = {"optimizer": runs[0]["optimizer"], "source": runs[0]["source"], "seeds": len(runs),
                           **{k: _mean([r[k] for r in runs if k in r]) for k in numbers}}
    return cells


# ------------------------------------------------------------------------------------------------ the report
def write_gradproj_ablation(runs_dir: Path, out: Path) -> Path | None:
    """Write ``out/gradproj_ablation.md`` (the table and the conclusion) from the ablation's runs under
    ``runs_dir``; None, and nothing written, when no cell has a finished request yet."""
    cells = read_cells(runs_dir)
    if not cells:
        return None
    lines = [
        "| cell | optimizer | C from | seeds | requests | UA | RA-I | RA-C | ‖ΔW‖/‖W0‖ | C | retained | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell, c in cells.items():
        drift = [f"{_num(c.get(f'{g}_first'))} / {_num(c.get(f'{g}_mean'))}" for g in DRIFT]
        metrics = [f"{c[k]:.1f}" if k in c else "–" for k in ("UA", "RA_I", "RA_C")]
        lines.append(f"| {cell} | {LABEL.get(c['optimizer'], c['optimizer'])} | {c['source']} | {c['seeds']} | "
                     f"{c['requests']:g} | " + " | ".join(metrics + drift) + " |")
    text = (
        "# GradProj ablation on Canvas-mini (issue 14)\n\n"
        "UA / RA-I / RA-C after the last request. The drift columns give ‖ΔW·c‖ / ‖W0·c‖ for the attn2 to_k / to_v "
        "weights (W0: the request's start), averaged over the states c of a group, per layer, then over layers, "
        "as `a / b`: a at the end of request 1, b the mean over the requests' ends. C: the columns GradProj "
        "protects; retained: every position, padding included, of \"A {object} image in {style} style.\" for the "
        "retained styles × a few objects (each cell's probe records them); target: the same for the request's "
        "target. ‖ΔW‖/‖W0‖: how far the layers moved at all. Probe: `callbacks/key_value_drift.py`; cells: "
        "`configs/paper/gradproj_ablation/`.\n\n"
        + "\n".join(lines) + "\n\n## Conclusion\n\n" + conclusion(cells) + "\n\n"
        f"Made by `cuig benchmark` from the runs under `{Path(runs_dir) / ABLATION}` "
        "(`--report_only true` rebuilds it); the paragraph is generated from the table's numbers.\n")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gradproj_ablation.md"
    path.write_text(text)
    return path


def conclusion(cells: dict[str, dict]) -> str:
    """The conclusion paragraph, one sentence per rule whose cells have finished (see each rule): the
    optimizer's effect on C (:func:`optimizer_sentence`), whether protecting C protects the retained prompts'
    states (:func:`coverage_sentence`, per optimizer) and what it does to retention (:func:`retention_sentence`)."""
    by = {(c["optimizer"], c["source"]): c for c in cells.values()}
    sentences = [optimizer_sentence(by)]
    sentences += [rule(by, optimizer) for optimizer in OPTIMIZERS for rule in (coverage_sentence, retention_sentence)]
    return " ".join(s for s in sentences if s) or "Too few cells have finished for a conclusion."


def optimizer_sentence(by: dict[tuple[str, str], dict]) -> str | None:
    """Over the C sources run with both optimizers: the geometric mean of AdamW's C drift over SGD's (mean over
    requests), and how far the weights moved under each."""
    pairs = [s for s in SOURCES[1:] if ("adamw", s) in by and ("sgd", s) in by and "C_mean" in by[("sgd", s)]]
    if not pairs:
        return None
    factor = _geomean([_ratio(by[("adamw", s)]["C_mean"], by[("sgd", s)]["C_mean"]) for s in pairs])
    values = ", ".join(f"{s} {_num(by[('sgd', s)]['C_mean'])} vs {_num(by[('adamw', s)]['C_mean'])}" for s in pairs)
    weights = " vs ".join(_num(_mean([by[(o, s)]["weights_mean"] for s in pairs])) for o in ("sgd", "adamw"))
    if abs(math.log(factor)) < math.log(1.1):
        head = "SGD and AdamW keep C's keys and values about equally fixed"
    else:
        tight, loose = ("SGD", "AdamW") if factor > 1 else ("AdamW", "SGD")
        head = f"{tight} keeps C's keys and values {_fold(factor)}× tighter than {loose}"
    return (f"{head} (C drift, mean over requests, SGD vs AdamW: {values}), while the to_k / to_v weights moved "
            f"{weights} of their norm.")


def coverage_sentence(by: dict[tuple[str, str], dict], optimizer: str) -> str | None:
    """Under one optimizer, over its GradProj cells: how the retained prompts' states move against C's columns
    (the geometric mean of their ratio) and against the target's states, and, with the reference cell, what
    share of the unprojected run's retained drift is left."""
    cells = {s: by[(optimizer, s)] for s in SOURCES[1:] if (optimizer, s) in by and "C_mean" in by[(optimizer, s)]}
    if not cells:
        return None
    factor = _geomean([_ratio(c["retained_mean"], c["C_mean"]) for c in cells.values()])
    details = ", ".join(f"{s}: {_num(c['retained_mean'])} vs {_num(c['C_mean'])}, target {_num(c['target_mean'])}"
                        for s, c in cells.items())
    sentence = (f"Under {LABEL[optimizer]} the retained prompts' states (all positions, padding included) move "
                f"{_compare(factor)} C's columns ({details})")
    reference = by.get((optimizer, "none"))
    if reference and "retained_mean" in reference:
        shares = ", ".join(f"{s} {100 * c['retained_mean'] / reference['retained_mean']:.0f}%"
                           for s, c in cells.items())
        sentence += (f"; against the run without GradProj (retained {_num(reference['retained_mean'])}) the projection "
                     f"leaves this share of the retained drift: {shares}")
    return sentence + "."


def retention_sentence(by: dict[tuple[str, str], dict], optimizer: str) -> str | None:
    """Under one optimizer with its reference cell: the GradProj cell with the highest final RA-I against the
    reference's RA-I (and their RA-C)."""
    reference = by.get((optimizer, "none"))
    cells = {s: by[(optimizer, s)] for s in SOURCES[1:] if (optimizer, s) in by and "RA_I" in by[(optimizer, s)]}
    if not reference or "RA_I" not in reference or not cells:
        return None
    best = max(cells, key=lambda s: cells[s]["RA_I"])
    diff = cells[best]["RA_I"] - reference["RA_I"]
    verdict = "no better than" if diff <= 0 else f"{diff:.1f} points above"
    return (f"With {LABEL[optimizer]}, the best GradProj RA-I after the last request ({best}: "
            f"{cells[best]['RA_I']:.1f}, RA-C {cells[best].get('RA_C', float('nan')):.1f}) is {verdict} the run "
            f"without it ({reference['RA_I']:.1f}, RA-C {reference.get('RA_C', float('nan')):.1f}).")


# ------------------------------------------------------------------------------------------------ helpers
def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _ratio(a: float, b: float) -> float:
    """a / b, both floored at 1e-12 (a drift of exactly 0 would make the factors infinite)."""
    return max(a, 1e-12) / max(b, 1e-12)


def _geomean(values: list[float]) -> float:
    return math.exp(_mean([math.log(v) for v in values]))


def _fold(factor: float) -> str:
    """A factor or its inverse, whichever is ≥ 1, to 2 significant digits (``3.2``, ``52,000``)."""
    value = float(f"{max(factor, 1 / factor):.2g}")
    return f"{value:g}" if value < 100 else f"{value:,.0f}"


def _compare(factor: float) -> str:
    """``factor`` = a / b in words: "about as much as" (within 10%), "N× more than" or "N× less than"."""
    if abs(math.log(factor)) < math.log(1.1):
        return "about as much as"
    return f"{_fold(factor)}× {'more' if factor > 1 else 'less'} than"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.2g}"
