"""Benchmark report, rebuilt from the runs' metrics.json: the main table (with the simultaneous curve over n),
per-request CSV, curves, drift and similarity scatters and summary.json. The tuning table and trade-off frontier
are :mod:`cuig_lightning.benchmark.tuning_report`; the rows' chosen overlays
:mod:`cuig_lightning.benchmark.chosen_configs`."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

from cuig_lightning.benchmark.plan import METRICS, REFERENCE, SIMULTANEOUS, Plan, base_value, load_rows, worst_ua
from cuig_lightning.evaluation.protocol import describe_protocol

PAPER = {  # the paper's main result (ConAbl, approximate)
    "sequential": (95, 20, 30), "simultaneous": (90, 70, 85), "l2": (92, 40, 75), "selft": (93, 35, 70),
    "merge": (90, 50, 85), "gradproj": (90, 60, 70), "merge_gradproj": (88, 65, 85),
}


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
    xs, means, _ = curve_band(curves, key)
    return xs, means


def curve_band(curves: list[list[dict]], key: str) -> tuple[list[int], list[float], list[float]]:
    """Mean and standard deviation (0 for one seed) of ``key`` over seeds, per number of concepts erased."""
    length = min(len(c) for c in curves)
    values = [[c[k][key] for c in curves if key in c[k]] for k in range(length)]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    return [curves[0][k]["erased"] for k in range(length)], [_mean(v) for v in values], stds


def collapse_point(curves: list[list[dict]], threshold: float = 50.0) -> int | None:
    """The number of erased concepts at which the seed-mean RA-I first drops below ``threshold`` (None: never)."""
    xs, ys = mean_curve(curves, "RA_I")
    return next((x for x, y in zip(xs, ys) if y < threshold), None)


def simultaneous_curve(plan: Plan) -> dict[str, dict[int, list[dict]]]:
    """method -> n -> the final metrics row of each finished simultaneous run on the first n targets, with its
    ``seed`` and ``cap`` (its ``trainer.max_steps``; ``steps`` is where it stopped)."""
    curve: dict[str, dict[int, list[dict]]] = {}
    for (method, n, seed), run in sorted(plan.curve.items(), key=lambda item: item[0][1:]):  # by n, then seed
        if run.finished:
            rows = load_rows(run.run_dir)
            cap = run.trainer_settings()["max_steps"]
            curve.setdefault(method, {}).setdefault(n, []).append({**rows[-1], "seed": seed, "cap": cap})
    return curve


def _steps(final: dict) -> str:
    return f"{final['steps']}" + (" (cap)" if final["steps"] is not None and final["steps"] >= final["cap"] else "")


def write_benchmark_report(plan: Plan, out: Path, base: list[str], min_ua: float | None = None) -> Path:
    """main_table.md (the table; then the simultaneous curve: metrics per n and each run's steps),
    per_request.csv, curves.png, drift_vs_retention.png, similarity_vs_ra_i.png and summary.json under
    ``out``. ``min_ua``: the matched-forgetting floor (a row meets it when every seed's UA is >= it after
    every request); None: no such column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out.mkdir(parents=True, exist_ok=True)
    # only finished runs: an interrupted job's metrics.json holds its first requests, not the row's final ones
    results = {run.key: load_rows(run.run_dir) for run in plan.reported if run.finished}
    by_n = simultaneous_curve(plan)
    methods = list(dict.fromkeys([*(run.key[0] for run in plan.reported), *by_n]))
    rows = list(dict.fromkeys(run.key[1] for run in plan.reported))  # unfinished rows too: shown as dashes

    def curves(method: str, row: str) -> list[list[dict]]:
        return [res for (m, r, _), res in results.items() if m == method and r == row]  # finished runs: never empty

    matched_head = f" worst UA | UA ≥ {min_ua:g} throughout |" if min_ua is not None else ""
    lines = [f"| method | row | seeds | UA | RA-I | RA-C |{matched_head} drift (rel) | RA-I < 50 first at | "
             "paper UA / RA-I / RA-C |", "|---|---|---|---|---|---|" + "---|---|" * (min_ua is not None) + "---|---|---|"]
    summary: dict = {"rows": {}, "simultaneous_n": {}}
    for method in methods:
        for row in rows:
            finals = [c[-1] for c in curves(method, row)]
            paper = "/".join(f"~{v}" for v in PAPER[row]) if method == "conabl" and row in PAPER else ""
            collapse = collapse_point(curves(method, row)) if finals else None
            worst = min((worst_ua(c) for c in curves(method, row)), default=None)
            matched = "" if min_ua is None else (
                f" {worst:.1f} | {'yes' if worst >= min_ua else 'no'} |" if finals else " – | – |")
            lines.append(f"| {method} | {row} | {len(finals)} | " + " | ".join(
                _mean_std([f[k] for f in finals if k in f]) for k in METRICS
            ) + f" |{matched} {_mean_std([100 * f['drift_rel'] for f in finals if 'drift_rel' in f])}% | "
                f"{collapse or ('never' if finals else '–')} | {paper} |")
            if finals:
                summary["rows"][f"{method}/{row}"] = {
                    "seeds": len(finals), **{k: _mean([f[k] for f in finals]) for k in METRICS},
                    "drift_rel": _mean([f["drift_rel"] for f in finals if "drift_rel" in f]),
                    "RA_I_below_50_from": collapse, "worst_UA": worst}
    table = "\n".join(lines)
    n_lines = ["| method | n | seeds | UA | RA-I | RA-C | steps (per seed) |", "|---|---|---|---|---|---|---|"]
    for method, per_n in by_n.items():
        for n, finals in per_n.items():
            n_lines.append(f"| {method} | {n} | {len(finals)} | "
                           + " | ".join(_mean_std([f[k] for f in finals]) for k in METRICS)
                           + f" | {', '.join(_steps(f) for f in finals)} |")
            summary["simultaneous_n"].setdefault(method, {})[n] = {
                "seeds": len(finals), **{k: _mean([f[k] for f in finals]) for k in METRICS},
                "steps": [f["steps"] for f in finals], "cap": [f["cap"] for f in finals]}
    simultaneous = (
        "\n\n## Simultaneous from θ0 on the first n targets\n\nOne run per n, method and seed, trained until its UA "
        "reaches `trainer.until_ua` or the step cap (`(cap)`); metrics after its one request (mean ± std over seeds). "
        f"The table's `{SIMULTANEOUS}` row is n = all targets.\n\n" + "\n".join(n_lines)) if by_n else ""
    (out / "main_table.md").write_text(
        f"# Main table on Canvas-mini (after the last request; mean ± std over seeds)\n\n{table}\n\n"
        "`RA-I < 50 first at`: the number of erased styles at which the seed-mean RA-I first drops below 50% "
        "(a simultaneous run erases all 12 in one request).\n"
        f"Made by `cuig benchmark` from `{' + '.join(base)}`; per-request metrics of every run in per_request.csv.\n"
        "Evaluation of the runs' last requests, as each run recorded it: "
        f"{'; '.join(sorted({describe_protocol(c[-1].get('evaluation')) for c in results.values() if c}))}."
        f"{simultaneous}\n"
    )
    labelled = [*((m, r, s, res) for (m, r, s), res in results.items()),
                *((m, f"{SIMULTANEOUS}_n{n}", s, load_rows(run.run_dir)) for (m, n, s), run in plan.curve.items()
                  if run not in plan.reported and run.finished)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "row", "seed", "request", "targets", "steps", *METRICS, "drift", "drift_rel"])
    for method, row, seed, res in labelled:
        for r in res:
            writer.writerow([method, row, seed, r["request"], r["targets"],
                             *(r.get(k, "") for k in ("steps", *METRICS, "drift", "drift_rel"))])
    (out / "per_request.csv").write_text(buffer.getvalue())

    # per-request curves: one panel per metric, one line per (method, row), mean over seeds; the simultaneous
    # runs as a curve over n (its row's one point is that curve's last)
    fig, axes = plt.subplots(len(methods), 3, figsize=(13, 3.4 * len(methods)), squeeze=False)
    for i, method in enumerate(methods):
        per_n = by_n.get(method, {})
        for j, key in enumerate(METRICS):
            ax = axes[i][j]
            for row in rows:
                if curves(method, row) and not (row == SIMULTANEOUS and per_n):
                    xs, ys, sd = curve_band(curves(method, row), key)
                    _band(ax, xs, ys, sd, marker="o" if len(xs) > 1 else "*", ms=3 if len(xs) > 1 else 11, label=row)
            if per_n:
                values = [[f[key] for f in finals] for finals in per_n.values()]
                _band(ax, list(per_n), [_mean(v) for v in values],
                      [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values],
                      marker="s", ms=4, ls="--", color="black", label=f"{SIMULTANEOUS} from θ0, per n")
            ax.set_title(f"{method}: {key.replace('_', '-')} (mean ± sd over seeds)", fontsize=9)
            ax.set_xlabel("styles erased (simultaneous: n at once)", fontsize=8)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
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
                    **similarity_plot(results, out / "similarity_vs_ra_i.png", base_value(base, "model.model_path"))})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table)
    return out / "main_table.md"


def _band(ax, xs: list, ys: list[float], sd: list[float], **style) -> None:
    """A mean curve and, where seeds spread, its mean ± one standard deviation band."""
    line, = ax.plot(xs, ys, **style)
    if len(xs) > 1 and any(sd):
        ax.fill_between(xs, [y - e for y, e in zip(ys, sd)], [y + e for y, e in zip(ys, sd)],
                        color=line.get_color(), alpha=0.15, linewidth=0)


def similarity_plot(results: dict, path: Path, model_path: str) -> dict[str, dict]:
    """The paper's similarity finding (r ≈ −0.8): after request 1 of each method's sequential runs, each
    retained style's text cosine to the one erased target (its in-prompt token states as the UNet sees them,
    ``concept_embeddings``) against its accuracy, mean over the seeds; Pearson r over the retained styles, per
    method (None where every retained style kept the same accuracy: no damage to correlate)."""
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    from cuig_lightning.models.diffusion import DiffusionModel

    first = {}  # method -> the request-1 rows of its sequential runs
    for (method, row, _), res in results.items():
        if row == REFERENCE and res and "per_concept" in res[0]:
            first.setdefault(method, []).append(res[0]["per_concept"])
    model = DiffusionModel.from_pretrained(model_path) if first else None
    fig, axes = plt.subplots(1, max(1, len(first)), figsize=(5.5 * max(1, len(first)), 4), squeeze=False)
    found = {}
    for ax, (method, concepts) in zip(axes[0], first.items()):
        [target] = concepts[0]["unlearn"]
        retained = list(concepts[0]["retain"])
        emb = F.normalize(model.concept_embeddings([target, *retained]), dim=-1)
        cosine = [float(emb[0] @ e) for e in emb[1:]]
        per_seed = [[c["retain"][s] for s in retained] for c in concepts]
        accuracy = [_mean([seed[i] for seed in per_seed]) for i in range(len(retained))]
        r = pearson(cosine, accuracy)
        for seed in per_seed:
            ax.scatter(cosine, seed, s=6, color="grey", alpha=0.3)
        ax.scatter(cosine, accuracy, s=18, color="C0", label=f"mean over {len(per_seed)} seed(s): r = {r:.2f}")
        for name, x, y in zip(retained, cosine, accuracy):
            ax.annotate(name, (x, y), xytext=(2, 2), textcoords="offset points", fontsize=5)
        ax.set_title(f"{method}, after request 1 ({target}): retained styles", fontsize=9)
        ax.set_xlabel(f"text cosine to {target}")
        ax.set_ylabel("retained style accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        found[method] = {"target": target, "seeds": len(per_seed), "pearson_r": None if math.isnan(r) else round(r, 3),
                         "styles": {s: {"cosine": round(x, 3), "accuracy": round(y, 2)}
                                    for s, x, y in zip(retained, cosine, accuracy)}}  # fmt: skip
    if not first:
        axes[0][0].set_title("no sequential run has finished request 1 yet", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return {"similarity_after_request_1": found}
