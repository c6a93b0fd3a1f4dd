"""``cuig benchmark``: the paper's main table on Canvas-mini — every row × method × seed, then the report.

Each run is an ordinary ``cuig fit`` with the base config, the row's overlay and the seed, in its own run
folder under ``output``; finished requests are skipped, so an interrupted benchmark resumes where it
stopped. The report (table, curves, drift and similarity scatters) is rebuilt from the runs' metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

PAPER = {  # method.md, "The paper's main result" (ConAbl, approximate)
    "sequential": (95, 20, 30), "simultaneous": (90, 70, 85), "l2": (92, 40, 75), "selft": (93, 35, 70),
    "merge": (90, 50, 85), "gradproj": (90, 60, 70), "merge_gradproj": (88, 65, 85),
}


def run_benchmark(
    base: str = "configs/seq12.yaml",
    methods: dict[str, str] | None = None,
    rows: list[str] | None = None,
    seeds: list[int] | None = None,
    output: str = "results/runs",
    report: str = "results",
    overrides: list[str] | None = None,
    report_only: bool = False,
) -> Path:
    """Run every (method, row, seed) of the main table and write the report.

    Args:
        base: the job config every run starts from.
        methods: method name -> folder holding one overlay YAML per row.
        rows: row names (overlay file stems), in table order.
        seeds: seeds (``seed_everything`` and ``data.seed``).
        output: folder of the run folders (``output/method/row/seedN``).
        report: folder of the report files.
        overrides: extra ``cuig fit`` arguments for every run (e.g. ``--trainer.max_steps=10``).
        report_only: rebuild the report from existing runs without training.
    """
    from cuig_lightning.cli import main as cuig

    methods = methods or {"conabl": "configs/canvas_mini", "sculpmem": "configs/canvas_mini_sculpmem"}
    rows = rows or ["sequential", "simultaneous", "l1", "l2", "selft", "merge", "gradproj", "merge_gradproj"]
    seeds = seeds or [0, 1, 2]
    runs = {}
    for method, folder in methods.items():
        for row in rows:
            overlay = Path(folder) / f"{row}.yaml"
            if not overlay.is_file():
                raise FileNotFoundError(f"no overlay {overlay} for row {row!r} of method {method!r}")
            for seed in seeds:
                run_dir = Path(output) / method / row / f"seed{seed}"
                runs[(method, row, seed)] = run_dir
                if report_only:
                    continue
                print(f"[benchmark] {method} / {row} / seed {seed} -> {run_dir}", flush=True)
                cuig(["fit", "--config", base, "--config", str(overlay), f"--trainer.run_dir={run_dir}",
                      f"--seed_everything={seed}", f"--data.seed={seed}", *(overrides or [])])
    return write_benchmark_report(runs, Path(report), base)


def _load_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    m = sum(values) / len(values)
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


def write_benchmark_report(runs: dict[tuple[str, str, int], Path], out: Path, base: str) -> Path:
    """main_table.md, curves.png, drift_vs_retention.png, similarity_vs_ra_i.png under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    results = {key: _load_rows(path) for key, path in runs.items()}
    methods = list(dict.fromkeys(m for m, _, _ in runs))
    rows = list(dict.fromkeys(r for _, r, _ in runs))

    lines = ["| method | row | seeds | UA | RA-I | RA-C | drift (rel) | paper UA / RA-I / RA-C |", "|---|---|---|---|---|---|---|---|"]
    for method in methods:
        for row in rows:
            finals = [res[-1] for (m, r, _), res in results.items() if m == method and r == row and res]
            paper = "/".join(f"~{v}" for v in PAPER[row]) if method == "conabl" and row in PAPER else ""
            lines.append(f"| {method} | {row} | {len(finals)} | " + " | ".join(
                _mean_std([f[k] for f in finals if k in f]) for k in ("UA", "RA_I", "RA_C")
            ) + f" | {_mean_std([100 * f['drift_rel'] for f in finals if 'drift_rel' in f])}% | {paper} |")
    table = "\n".join(lines)
    (out / "main_table.md").write_text(
        f"# Main table on Canvas-mini (after the last request; mean ± std over seeds)\n\n{table}\n\n"
        f"Made by `cuig benchmark` from `{base}`; per-run metrics in each run folder's metrics.json.\n"
    )

    # per-request curves: one panel per metric, one line per (method, row), seed 0 .. n averaged
    fig, axes = plt.subplots(len(methods), 3, figsize=(13, 3.4 * len(methods)), squeeze=False)
    for i, method in enumerate(methods):
        for j, key in enumerate(("UA", "RA_I", "RA_C")):
            ax = axes[i][j]
            for row in rows:
                curves = [res for (m, r, _), res in results.items() if m == method and r == row and res]
                if not curves:
                    continue
                length = min(len(c) for c in curves)
                xs = [curves[0][k]["request"] for k in range(length)]
                ys = [sum(c[k].get(key, float("nan")) for c in curves) / len(curves) for k in range(length)]
                ax.plot(xs, ys, marker="o", ms=3, label=row)
            ax.set_title(f"{method}: {key.replace('_', '-')}")
            ax.set_xlabel("request")
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

    summary = {"drift_vs_RA_I_r": pearson(drift, ra_i), "drift_vs_RA_C_r": pearson(drift, ra_c),
               "similarity_vs_RA_I_r": similarity_plot(results, out / "similarity_vs_ra_i.png", base)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table)
    return out / "main_table.md"


def similarity_plot(results: dict, path: Path, base: str) -> float:
    """Each retained style's max cosine similarity to the erased targets (text encoder of the base
    model) against its accuracy after the last request, over every run; returns Pearson r."""
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    from cuig_lightning.models.diffusion import DiffusionModel

    model_path = yaml.safe_load(Path(base).read_text())["model"]["model_path"]
    model = DiffusionModel.from_pretrained(model_path)
    xs, ys = [], []
    for key, res in results.items():
        if not res or "per_concept" not in res[-1]:
            continue
        erased = list(res[-1]["per_concept"]["unlearn"])
        retain = res[-1]["per_concept"]["retain"]
        emb = F.normalize(model.concept_embeddings(erased + list(retain)), dim=-1)
        sim = (emb[len(erased):] @ emb[: len(erased)].T).max(dim=1).values.tolist()
        xs += sim
        ys += list(retain.values())
    r = pearson(xs, ys)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter(xs, ys, s=8)
    ax.set_xlabel("max cosine similarity to the erased targets")
    ax.set_ylabel("retained style accuracy after the last request (%)")
    ax.set_title(f"Pearson r = {r:.2f} over {len(xs)} (run, style) points")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return r


def main(args: list[str] | None = None) -> None:
    from jsonargparse import CLI

    CLI(run_benchmark, args=args, as_positional=False)
