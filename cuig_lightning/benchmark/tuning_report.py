"""The tuning report, rebuilt from the tuning runs' metrics.json: every candidate's validation result
(:func:`tuning_points`), tuning.md / tuning.json / tradeoff.json and the trade-off frontier plot tradeoff.png."""

from __future__ import annotations

import json
from pathlib import Path

from cuig_lightning.benchmark.plan import METRICS, REFERENCE, Plan, Tuning, load_rows, tag, worst_ua


def tuning_points(plan: Plan) -> dict[tuple[str, str], list[dict] | None]:
    """Each tuning candidate's validation result, per tuned (method, row) in plan order (None: a run of the
    row has not finished): the candidate's name and updates, UA / RA-I / RA-C after the last validation
    request, the worst UA over all of them and whether the rule chose it."""
    points = {}
    for (method, row), runs in plan.tuning.items():
        if not all(r.finished for _, r in runs):
            points[(method, row)] = None
            continue
        best = plan.chosen(method, row)
        points[(method, row)] = [
            {"candidate": tag(updates), "updates": updates, **{k: rows[-1][k] for k in METRICS},
             "worst_UA": worst_ua(rows), "requests": len(rows), "stopped": run.stopped(rows),
             "chosen": updates == best}
            for updates, run, rows in ((u, r, load_rows(r.run_dir)) for u, r in runs)]
    return points


def write_tuning_report(plan: Plan, tuning: Tuning, out: Path) -> None:
    """tuning.md (every candidate's validation metrics, the choice per (method, row), the rows where no
    candidate meets the rule), tuning.json (the values each tuned row's reported runs use), tradeoff.json
    (method -> row -> candidates in order of final UA) and tradeoff.png (:func:`tradeoff_plot`)."""
    points = tuning_points(plan)
    lines = [f"# Hyperparameter tuning on the validation split (`{tuning.validation}`, seed {tuning.seed})", "",
             f"Rule (matched forgetting): among candidates with UA ≥ {tuning.min_ua:g} after every validation "
             "request, the highest (RA-I + RA-C) / 2 after the last one; if none, the highest worst UA. "
             "UA / RA-I / RA-C after the last validation request; worst UA over all of them"
             + ("; a candidate whose UA fell below the floor stopped there (*stopped after request k*: the rule "
                "cannot choose it, its later requests were not run)." if tuning.stop_below_min_ua else "."), "",
             "| method | row | candidate | UA | worst UA | RA-I | RA-C | chosen |", "|---|---|---|---|---|---|---|---|"]
    unmet, record, frontier = [], {}, {}
    stop = lambda p: f" (*stopped after request {p['requests']}*)" if p["stopped"] else ""  # noqa: E731
    for (method, row), candidates in points.items():
        if candidates is None:
            lines.append(f"| {method} | {row} | (unfinished) | | | | | |")
            continue
        record.setdefault(method, {})[row] = plan.settings(method, row)
        frontier.setdefault(method, {})[row] = sorted(candidates, key=lambda p: p["UA"])
        lines += [f"| {method} | {row} | {p['candidate']}{stop(p)} | "
                  f"{p['UA']:.1f} | {p['worst_UA']:.1f} | {p['RA_I']:.1f} | {p['RA_C']:.1f} | "
                  f"{'**yes**' if p['chosen'] else ''} |" for p in candidates]
        best = max(candidates, key=lambda p: p["worst_UA"])
        if best["worst_UA"] < tuning.min_ua:
            unmet.append(f"- {method} / {row}: **no candidate meets the rule** (UA ≥ {tuning.min_ua:g} after every "
                         f"validation request); the best worst UA is {best['worst_UA']:.1f} ({best['candidate']}, "
                         "chosen).")
    if unmet:
        lines += ["", "Rows where no candidate reaches the UA floor (their reported runs use the best-erasing one):",
                  "", *unmet]
    (out / "tuning.md").write_text("\n".join(lines) + "\n")
    (out / "tuning.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "tradeoff.json").write_text(json.dumps(frontier, indent=2) + "\n")
    tradeoff_plot(frontier, out / "tradeoff.png", tuning.min_ua)


def tradeoff_plot(frontier: dict, path: Path, min_ua: float) -> None:
    """The trade-off frontier: per method a panel, per tuned row its candidates' (final validation UA, final
    validation RA-I) joined in order of UA; the sequential row's sweep (the learning rate) as the reference
    curve, drawn black and dashed; chosen candidates ringed; candidates stopped below the UA floor (no final
    point) as grey crosses where they stopped, outside the lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(frontier) or ["(no finished tuning)"]
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        stopped = [p for points in frontier.get(method, {}).values() for p in points if p.get("stopped")]
        if stopped:
            ax.scatter([p["UA"] for p in stopped], [p["RA_I"] for p in stopped], marker="x", color="grey", s=30,
                       label="stopped below the floor (where it stopped)", zorder=2)
        for row, every in frontier.get(method, {}).items():
            points = [p for p in every if not p.get("stopped")]
            xs, ys = [p["UA"] for p in points], [p["RA_I"] for p in points]
            if row == REFERENCE:
                ax.plot(xs, ys, "s--", color="black", lw=2, ms=6, label=f"{row} (reference)", zorder=3)
                for p in points:
                    ax.annotate(p["candidate"], (p["UA"], p["RA_I"]), xytext=(3, 3), textcoords="offset points",
                                fontsize=6)
            else:
                ax.plot(xs, ys, "o-", ms=4, lw=1, label=row)
            chosen = [p for p in every if p["chosen"]]
            ax.scatter([p["UA"] for p in chosen], [p["RA_I"] for p in chosen], s=110, facecolors="none",
                       edgecolors="red", zorder=4)
        ax.axvline(min_ua, color="grey", ls=":", lw=1)
        ax.scatter([], [], s=110, facecolors="none", edgecolors="red", label="chosen")
        ax.plot([], [], ":", color="grey", label=f"UA floor {min_ua:g} (the rule holds it at every request)")
        ax.set_title(f"{method}: final validation RA-I vs UA over each row's tuning sweep", fontsize=9)
        ax.set_xlabel("final validation UA (%)")
        ax.set_ylabel("final validation RA-I (%)")
        ax.set_xlim(-2, 102)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
