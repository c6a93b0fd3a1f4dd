"""Run-level report: metrics.json / metrics.csv (one row per request), a markdown table and a PNG plot."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from cuig_lightning.checkpoints import atomic_write, write_json
from cuig_lightning.evaluation.protocol import describe_protocol

COLUMNS = ["request", "targets", "steps", "UA", "RA_I", "RA_C", "drift", "drift_rel"]
# shown when a row has them: RA from fewer seeds (trainer.curve_seeds); the robustness probes (evaluation.attack /
# relearn, on the requests where they ran: evaluation/robustness.py)
OPTIONAL_COLUMNS = ["RA_seeds", "ASR", "ASR_paraphrase", "relearn_UA"]
PROBES = {"attack": "Attack", "relearn": "Relearning probe"}


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
    for probe, label in PROBES.items():  # the options and cost of each robustness probe, where it ran
        ran = [r for r in rows if probe in (r.get("robustness") or {})]
        if ran:
            options = {k: v for k, v in sorted(ran[-1]["robustness"][probe].items()) if k != "seconds" and v is not None}
            seconds = ", ".join(f"{r['robustness'][probe]['seconds']:.1f} s" for r in ran)
            lines += ["", f"{label} after requests {', '.join(str(r['request']) for r in ran)} "
                          f"({', '.join(f'{k} {v}' for k, v in options.items())}): {seconds}."]
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
    for key, label in (("ASR", "ASR (attack)"), ("ASR_paraphrase", "ASR (paraphrase)"), ("relearn_UA", "UA after relearning")):
        probed = [r for r in rows if r.get(key) is not None]  # only where the probe ran (every k-th request)
        if probed:
            ax.plot([r["request"] for r in probed], [r[key] for r in probed], marker="s", linestyle="--", label=label)
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7)
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
