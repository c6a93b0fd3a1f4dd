"""``results/evaluation_speed.md``: the report of :mod:`cuig_lightning.benchmark.evaluation_speed`, from its
result (``evaluation_speed.json``)."""

from __future__ import annotations

import statistics

from cuig_lightning.evaluation.protocol import SAMPLER_NAMES, describe_protocol

METRICS = ("UA", "RA_I", "RA_C")
LABELS = {"UA": "UA", "RA_I": "RA-I", "RA_C": "RA-C"}


def protocol_key(protocol: dict) -> str:
    return f"{protocol['sampler']}-{protocol['steps']}"


def describe_sampler(protocol: dict) -> str:
    return f"{SAMPLER_NAMES.get(protocol['sampler'], protocol['sampler'])} {protocol['steps']} steps"


def largest_difference(rows: list[dict], key: str) -> float:
    """The largest |candidate − old| over every row and metric (points)."""
    return max(abs(r[key][m] - r["old"][m]) for r in rows for m in METRICS)


def seed_spread(per_seed: list[dict], metric: str) -> tuple[float, float]:
    """(max − min over single seeds, standard error of their mean) of one metric."""
    values = [p[metric] for p in per_seed]
    sem = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return max(values) - min(values), sem


def render(result: dict) -> str:
    old, tol, chosen = result["old"], result["tolerance"], result["chosen"]
    lines = [
        "# Evaluation speed: faster protocols against the reported one, on the same weights",
        "",
        f"Made by `{result['command']}` on {result['date']} ({result['machine']}).",
        "",
        f"- old protocol: {describe_sampler(old)}, seeds {', '.join(map(str, result['seeds']))} (the reported tables')",
        f"- candidates: {'; '.join(describe_sampler(c) for c in result['candidates'])}, the same seeds",
        f"- the equality rule: every per-request difference (candidate − old) of UA, RA-I and RA-C within {tol:g} "
        f"points; chosen: the cheapest candidate that holds it — **{describe_sampler(chosen)}**"
        + ("" if result.get("chosen_holds", True) else " (none holds it: the closest)"),
        "",
    ]
    if result.get("levers"):
        lines += ["## Images per second on this CPU, each lever alone and the kept ones together", "",
                  f"{result['lever_images']} images (the first of the default job's grid after request 4, seed 188) on the base "
                  "model, one variant after another in one process; reference: the old protocol's sampler in fp32 "
                  "at batch 96 (the default). Compile time is paid once per process and batch shape.", "",
                  "| lever | images/s | × reference | compile (s) |", "|---|---|---|---|"]
        for row in result["levers"]:
            compile_s = f"{row['compile_s']:.0f}" if row["compile_s"] is not None else ""
            lines.append(f"| {row['lever']} | {row['images_per_s']:.2f} | {row['speedup']:.2f} | {compile_s} |")
        lines.append("")
    if result.get("base"):
        lines += ["## The base model over the full grid (style ≥ 95 and object ≥ 90 required)", "",
                  "| protocol | style | object | neutral | images |", "|---|---|---|---|---|"]
        for b in result["base"].values():
            lines.append(f"| {describe_protocol(b['settings'])} | {b['style_accuracy']:.1f} | {b['object_accuracy']:.1f}"
                         f" | {b.get('neutral_accuracy', float('nan')):.1f} | {b['n_images']} |")
        lines.append("")
    rows = result.get("equality")
    if rows:
        lines += ["## Equality on real runs", "", "| candidate | largest difference (points) | the rule |", "|---|---|---|"]
        for c in result["candidates"]:
            worst = largest_difference(rows, protocol_key(c))
            lines.append(f"| {describe_sampler(c)} | {worst:.1f} | {'holds' if worst <= tol else 'does not hold'} |")
        key = protocol_key(chosen)
        lines += ["", f"Per request, the chosen {describe_sampler(chosen)}: old → new (3-seed means), the difference, "
                  "and the old protocol's own seed spread (max − min of the single seeds / standard error of their mean).",
                  "", "| run | request | target | " + " | ".join(
                      f"{LABELS[m]} old → new | Δ | seed spread" for m in METRICS) + " |",
                  "|---|---|---|" + "---|---|---|" * len(METRICS)]
        for r in rows:
            cells = []
            for m in METRICS:
                spread, sem = seed_spread(r["old"]["per_seed"], m)
                cells += [f"{r['old'][m]:.1f} → {r[key][m]:.1f}", f"{r[key][m] - r['old'][m]:+.1f}", f"{spread:.1f} / {sem:.1f}"]
            lines.append(f"| {r['run']} | {r['request']} | {r['targets']} | " + " | ".join(cells) + " |")
        lines.append("")
    if result.get("wall_times"):
        w = result["wall_times"]
        lines += ["## The default main job, before and after (this machine, nothing else running)", "",
                  f"`{w['command']}` on a fresh clone of each commit with an empty anchor cache; evaluation seconds "
                  "as the job's log reports them.", "",
                  "| commit | measured | evaluation protocol | wall time (s) | of which evaluation (s) | the rest (s) | "
                  "log lines (carriage returns) |", "|---|---|---|---|---|---|---|"]
        for row in w["runs"]:
            lines.append(f"| {row['commit']} | {row.get('measured', '')} | {row['evaluation']} | {row['wall_s']:.0f} | "
                         f"{row['evaluation_s']:.0f} | {row['wall_s'] - row['evaluation_s']:.0f} | "
                         f"[{row['log_lines']} ({row['log_carriage_returns']})](default_job_{row['commit']}.log) |")
        first, last = w["runs"][0], w["runs"][-1]
        lines += ["", f"End to end {first['wall_s'] / last['wall_s']:.2f}× faster; evaluation "
                  f"{first['evaluation_s'] / max(last['evaluation_s'], 1):.2f}× faster.", ""]
    return "\n".join(lines)
