"""Run-level report: metrics.json / metrics.csv (one row per request), a markdown table and a PNG plot."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from cuig_lightning.checkpoints import atomic_write, write_json
from cuig_lightning.evaluation.protocol import describe_protocol

COLUMNS = ["request", "targets", "steps", "UA", "RA_I", "RA_C", "drift", "drift_rel"]
OPTIONAL_COLUMNS = ["RA_seeds"]  # shown when a row has it (trainer.curve_seeds: RA from fewer seeds there)


def columns(rows: list[dict]) -> list[str]:
    return COLUMNS + [c for c in OPTIONAL_COLUMNS if any(c in r for r in rows)]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table, then the evaluation protocol(s) that measured them."""
    shown = columns(rows)
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in shown) + " |" for r in rows]
    protocols: dict[str, list[int]] = {}
    for r in rows:
        if "UA" in r:  # evaluated
            protocols.setdefault(describe_protocol(r.get("evaluation")), []).append(r["request"])
    if len(protocols) == 1:
        lines += ["", f"Evaluation: {next(iter(protocols))}."]
    elif protocols:  # a run resumed under other evaluation settings
        lines += [""] + [f"Evaluation of requests {', '.join(map(str, requests))}: {text}."
                         for text, requests in protocols.items()]
    return "\n".join(lines)


def write_report(run_dir: Path, rows: list[dict]) -> str:
    """Write metrics.json, metrics.csv and metrics.png under ``run_dir``; return the markdown table."""
    write_json(rows, run_dir / "metrics.json")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(rows), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run_dir / "metrics.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))
    plot_metrics(rows, run_dir / "metrics.png")
    table = markdown_table(rows)
    atomic_write(run_dir / "metrics.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    return table


def plot_metrics(rows: list[dict], path: Path) -> None:
    """UA / RA-I / RA-C and the relative drift after each request (whole-number request ticks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax, drift_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    x = [r["request"] for r in rows]
    for key, label in (("UA", "UA"), ("RA_I", "RA-I"), ("RA_C", "RA-C")):
        ax.plot(x, [r.get(key) for r in rows], marker="o", label=label)
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.legend()
    drift_ax.plot(x, [100 * r["drift_rel"] if r.get("drift_rel") is not None else None for r in rows],
                  marker="o", color="tab:red")
    drift_ax.set_ylabel("drift ‖θ − θ0‖ / ‖θ0‖ (%)")
    for a in (ax, drift_ax):
        a.set_xlabel("request")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
