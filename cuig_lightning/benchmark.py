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

import copy
import csv
import io
import itertools
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cuig_lightning.continual import RunFolderError

PAPER = {  # method.md, "The paper's main result" (ConAbl, approximate)
    "sequential": (95, 20, 30), "simultaneous": (90, 70, 85), "l2": (92, 40, 75), "selft": (93, 35, 70),
    "merge": (90, 50, 85), "gradproj": (90, 60, 70), "merge_gradproj": (88, 65, 85),
}
METRICS = ("UA", "RA_I", "RA_C")


@dataclass
class Tuning:
    """Hyperparameter search on a validation split of concepts.

    Args:
        validation: overlay that replaces ``trainer.requests`` with the validation sequence.
        grid: row -> callback class name -> init argument -> values; every combination is a candidate.
        combine: row -> tuned rows whose chosen values it uses (e.g. merge_gradproj: [merge, gradproj]).
        seed: the seed of the tuning runs.
        min_ua: the selection rule's UA floor (see :func:`choose`).
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
        return self.configs + ([str(self.prepare())] if self.prepare else [])

    def stamp(self) -> dict:
        return {"configs": [yaml.safe_load(Path(c).read_text()) for c in self.all_configs()], "seed": self.seed}

    def arguments(self) -> list[str]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "benchmark.json").write_text(json.dumps(self.stamp(), indent=1))
        return ["fit", *itertools.chain.from_iterable(("--config", c) for c in self.all_configs()),
                f"--trainer.run_dir={self.run_dir}", f"--seed_everything={self.seed}", f"--data.seed={self.seed}"]

    def final_metrics(self) -> dict:
        return _load_rows(self.run_dir)[-1]


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


def choose(results: list[tuple[dict, dict]], min_ua: float) -> dict:
    """The selection rule: among candidates whose validation UA >= ``min_ua``, the highest mean of RA-I
    and RA-C; if none erases that well, the highest UA. ``results``: (updates, final metrics) pairs."""
    erasing = [r for r in results if r[1]["UA"] >= min_ua]
    if erasing:
        return max(erasing, key=lambda r: (r[1]["RA_I"] + r[1]["RA_C"]) / 2)[0]
    return max(results, key=lambda r: r[1]["UA"])[0]


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
                cfg = _write_yaml(apply_updates(overlay, updates), candidate_dir.parent / f"{candidate_dir.name}.yaml")
                run = Run(("tuning", method, row, tag(updates)), candidate_dir / f"seed{tuning.seed}",
                          [*base, str(cfg), tuning.validation], tuning.seed)
                tuning_runs.setdefault((method, row), []).append((updates, run))
    choices: dict[tuple[str, str], dict] = {}

    def chosen(method: str, row: str) -> dict:
        if (method, row) not in choices:
            options = [(u, r.final_metrics()) for u, r in tuning_runs[(method, row)]]
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


def execute(runs: list[Run], jobs: int = 1) -> list[Run]:
    """Run every unfinished run, at most ``jobs`` at once, each after the runs it needs; return the failed.

    ``jobs == 1`` runs in this process (errors propagate); otherwise each run is a ``python -m
    cuig_lightning fit`` process whose output goes to ``<run folder>.log``.
    """
    from cuig_lightning.cli import main as cuig

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
                cuig(run.arguments())
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


def run_benchmark(
    base: str | list[str] = "configs/seq12.yaml",
    methods: dict[str, str] | None = None,
    rows: list[str] | None = None,
    seeds: list[int] | None = None,
    output: str = "results/runs",
    report: str = "results",
    tuning: Tuning | None = None,
    jobs: int = 1,
    report_only: bool = False,
) -> Path:
    """Run every (method, row, seed) of the main table (after the tuning runs) and write the report.

    Args:
        base: the job config(s) every run starts from.
        methods: method name -> folder holding one overlay YAML per row.
        rows: row names (overlay file stems), in table order.
        seeds: seeds (``seed_everything`` and ``data.seed``).
        output: folder of the run folders (``output/method/row/seedN``, ``output/tuning/...``).
        report: folder of the report files.
        tuning: the hyperparameter search on a validation split (None: the overlays as they are).
        jobs: ``cuig fit`` processes at once (1: one after another, in this process).
        report_only: rebuild the report from the finished runs without training.
    """
    base = [base] if isinstance(base, str) else list(base)
    methods = methods or {"conabl": "configs/canvas_mini", "sculpmem": "configs/canvas_mini_sculpmem"}
    rows = rows or ["sequential", "simultaneous", "l1", "l2", "selft", "merge", "gradproj", "merge_gradproj"]
    seeds = seeds or [0, 1, 2]
    runs, tuned = plan(base, methods, rows, seeds, Path(output), tuning)
    failed = [] if report_only else execute(runs, jobs)
    path = write_benchmark_report([r for r in runs if r.key[0] != "tuning"], Path(report), base[0])
    if tuning:
        write_tuning_report(tuned, tuning, Path(report))
    if failed:
        logs = ", ".join(str(r.run_dir.with_suffix(".log")) for r in failed[:3])
        raise RuntimeError(f"{len(failed)} benchmark run(s) failed; logs: {logs}")
    return path


def write_tuning_report(tuned: dict, tuning: Tuning, out: Path) -> None:
    """tuning.md / tuning.json: every candidate's validation metrics and the chosen one per (method, row)."""
    lines = [f"# Hyperparameter tuning on the validation split (`{tuning.validation}`, seed {tuning.seed})", "",
             f"Rule: among candidates with UA ≥ {tuning.min_ua:g}, the highest (RA-I + RA-C) / 2; "
             "if none, the highest UA. Metrics after the last validation request.", "",
             "| method | row | candidate | UA | RA-I | RA-C | chosen |", "|---|---|---|---|---|---|---|"]
    record = {}
    for (method, row), runs in tuned["runs"].items():
        if not all(r.finished for _, r in runs):
            lines.append(f"| {method} | {row} | (unfinished) | | | | |")
            continue
        best = tuned["chosen"](method, row)
        record.setdefault(method, {})[row] = best
        for updates, run in runs:
            m = run.final_metrics()
            lines.append(f"| {method} | {row} | {tag(updates)} | " + " | ".join(f"{m[k]:.1f}" for k in METRICS)
                         + f" | {'**yes**' if updates == best else ''} |")
    (out / "tuning.md").write_text("\n".join(lines) + "\n")
    (out / "tuning.json").write_text(json.dumps(record, indent=2) + "\n")


def _load_rows(run_dir: Path) -> list[dict]:
    """A run's per-request metrics, each with ``erased``: the concepts erased so far (a simultaneous
    run's one request erases them all)."""
    path = run_dir / "metrics.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    erased = 0
    for row in rows:
        erased += len(row["targets"].split())
        row["erased"] = erased
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    m = _mean(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{m:.1f} ± {s:.1f}"


def pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    if n < 3:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else float("nan")


def mean_curve(curves: list[list[dict]], key: str) -> tuple[list[int], list[float]]:
    """Mean of ``key`` over seeds against the number of concepts erased, up to the shortest curve."""
    length = min(len(c) for c in curves)
    return ([curves[0][k]["erased"] for k in range(length)],
            [_mean([c[k][key] for c in curves if key in c[k]]) for k in range(length)])


def collapse_point(curves: list[list[dict]], threshold: float = 50.0) -> int | None:
    """The number of erased concepts at which the seed-mean RA-I first drops below ``threshold`` (None: never)."""
    xs, ys = mean_curve(curves, "RA_I")
    return next((x for x, y in zip(xs, ys) if y < threshold), None)


def write_benchmark_report(runs: list[Run], out: Path, base: str) -> Path:
    """main_table.md, per_request.csv, curves.png, drift_vs_retention.png, similarity_vs_ra_i.png and
    summary.json under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    results = {run.key: _load_rows(run.run_dir) for run in runs}
    methods = list(dict.fromkeys(m for m, _, _ in results))
    rows = list(dict.fromkeys(r for _, r, _ in results))

    def curves(method: str, row: str) -> list[list[dict]]:
        return [res for (m, r, _), res in results.items() if m == method and r == row and res]

    lines = ["| method | row | seeds | UA | RA-I | RA-C | drift (rel) | RA-I < 50 first at | paper UA / RA-I / RA-C |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary: dict = {"rows": {}}
    for method in methods:
        for row in rows:
            finals = [c[-1] for c in curves(method, row)]
            paper = "/".join(f"~{v}" for v in PAPER[row]) if method == "conabl" and row in PAPER else ""
            collapse = collapse_point(curves(method, row)) if finals else None
            lines.append(f"| {method} | {row} | {len(finals)} | " + " | ".join(
                _mean_std([f[k] for f in finals if k in f]) for k in METRICS
            ) + f" | {_mean_std([100 * f['drift_rel'] for f in finals if 'drift_rel' in f])}% | "
                f"{collapse or ('never' if finals else '–')} | {paper} |")
            if finals:
                summary["rows"][f"{method}/{row}"] = {
                    "seeds": len(finals), **{k: _mean([f[k] for f in finals]) for k in METRICS},
                    "drift_rel": _mean([f["drift_rel"] for f in finals if "drift_rel" in f]),
                    "RA_I_below_50_from": collapse}
    table = "\n".join(lines)
    (out / "main_table.md").write_text(
        f"# Main table on Canvas-mini (after the last request; mean ± std over seeds)\n\n{table}\n\n"
        "`RA-I < 50 first at`: the number of erased styles at which the seed-mean RA-I first drops below 50% "
        "(a simultaneous run erases all 12 in one request).\n"
        f"Made by `cuig benchmark` from `{base}`; per-request metrics of every run in per_request.csv.\n"
    )
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "row", "seed", "request", "targets", *METRICS, "drift", "drift_rel"])
    for (method, row, seed), res in results.items():
        for r in res:
            writer.writerow([method, row, seed, r["request"], r["targets"],
                             *(r.get(k, "") for k in (*METRICS, "drift", "drift_rel"))])
    (out / "per_request.csv").write_text(buffer.getvalue())

    # per-request curves: one panel per metric, one line per (method, row), mean over seeds
    fig, axes = plt.subplots(len(methods), 3, figsize=(13, 3.4 * len(methods)), squeeze=False)
    for i, method in enumerate(methods):
        for j, key in enumerate(METRICS):
            ax = axes[i][j]
            for row in rows:
                if curves(method, row):
                    xs, ys = mean_curve(curves(method, row), key)
                    ax.plot(xs, ys, marker="o" if len(xs) > 1 else "*", ms=3 if len(xs) > 1 else 11, label=row)
            ax.set_title(f"{method}: {key.replace('_', '-')}")
            ax.set_xlabel("styles erased (= request number; simultaneous: one request, ★)")
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
        axes[i][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)

    # drift vs retention, every request of every run
    drift, ra_i, ra_c = [], [], []
    for res in results.values():
        for row in res:
            if "drift_rel" in row:
                drift.append(100 * row["drift_rel"])
                ra_i.append(row["RA_I"])
                ra_c.append(row["RA_C"])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter(drift, ra_i, s=8, label=f"RA-I (r = {pearson(drift, ra_i):.2f})")
    ax.scatter(drift, ra_c, s=8, label=f"RA-C (r = {pearson(drift, ra_c):.2f})")
    ax.set_xlabel("relative drift ‖θn − θ0‖ / ‖θ0‖ (%)")
    ax.set_ylabel("retain accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "drift_vs_retention.png", dpi=90)
    plt.close(fig)

    summary.update({"drift_vs_RA_I_r": pearson(drift, ra_i), "drift_vs_RA_C_r": pearson(drift, ra_c),
                    **similarity_plot(results, out / "similarity_vs_ra_i.png", base)})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table)
    return out / "main_table.md"


def similarity_plot(results: dict, path: Path, base: str) -> dict[str, float]:
    """Each retained style's max cosine similarity to the targets erased so far (text encoder of the
    base model) against its accuracy, after every request of every run; Pearson r over all those
    points, within each (run, request) (centred: the common drift over time taken out) and over the
    last requests only. (After the last request of the 12-style sequence every
    Canvas-mini retain style shares its palette with two erased styles, so the last request alone has
    little spread in similarity.)"""
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    from cuig_lightning.models.diffusion import DiffusionModel

    model_path = yaml.safe_load(Path(base).read_text())["model"]["model_path"]
    model = DiffusionModel.from_pretrained(model_path)
    names = sorted({c for res in results.values() for row in res if "per_concept" in row
                    for c in (*row["per_concept"]["unlearn"], *row["per_concept"]["retain"])})
    index = {c: i for i, c in enumerate(names)}
    emb = F.normalize(model.concept_embeddings(names), dim=-1) if names else None
    points: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}  # is last request -> (xs, ys)
    centred: tuple[list, list] = ([], [])  # minus each (run, request)'s means: drift over time taken out
    for res in results.values():
        for k, row in enumerate(res):
            if "per_concept" not in row:
                continue
            erased = [index[c] for c in row["per_concept"]["unlearn"]]
            sims = [float((emb[index[s]] @ emb[erased].T).max()) for s in row["per_concept"]["retain"]]
            accs = list(row["per_concept"]["retain"].values())
            points[k == len(res) - 1][0].extend(sims)
            points[k == len(res) - 1][1].extend(accs)
            centred[0].extend(x - _mean(sims) for x in sims)
            centred[1].extend(y - _mean(accs) for y in accs)
    every = (points[False][0] + points[True][0], points[False][1] + points[True][1])
    r, r_last = pearson(*every), pearson(*points[True])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter(*points[False], s=5, alpha=0.35, label="after requests before the last")
    ax.scatter(*points[True], s=8, label=f"after the last request (r = {r_last:.2f})")
    ax.set_xlabel("max cosine similarity to the targets erased so far")
    ax.set_ylabel("retained style accuracy (%)")
    ax.set_title(f"Pearson r = {r:.2f} over {len(every[0])} (run, request, style) points", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return {"similarity_vs_RA_I_r": r, "similarity_vs_RA_I_r_within_request": pearson(*centred),
            "similarity_vs_RA_I_r_last_request": r_last, "similarity_points": len(every[0])}


def main(args: list[str] | None = None) -> None:
    from jsonargparse import CLI

    try:
        CLI(run_benchmark, args=args, as_positional=False)
    except RuntimeError as err:  # failed runs: the report of the finished ones is written; say which failed
        print(f"cuig: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
