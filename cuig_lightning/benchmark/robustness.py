"""The robustness table (issue 36): is an erased concept really gone, row by row, as requests pile up?

``cuig robustness --job configs/paper/robustness.yaml [--jobs N] [--report_only true]``. The job file has the
fidelity table's shape (:class:`~cuig_lightning.benchmark.fidelity.StudyJob`: base configs, a seed, rows with
overlays and variants, simultaneous rows run once per n of ``after``); its base configs switch on the probes of
:mod:`cuig_lightning.evaluation.robustness` (``trainer.evaluation.attack`` / ``relearn``) after the requests of
``after``. Every run is an ordinary ``cuig fit``; finished runs are skipped.

The report ``report/robustness.md`` (+ ``robustness.json``), rebuilt from the runs' ``metrics.json``: per row and
n of ``after``, UA / RA-I / RA-C next to ASR (the soft-prompt attack with its whole budget and with its smaller
ones), the paraphrases' ASR and UA after relearning; then per erased concept its ASR and its UA after relearning
at each n (do early targets come back later?), and one paragraph made from those numbers by the fixed rules of
:func:`findings`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from cuig_lightning.benchmark.fidelity import StudyJob, run_study
from cuig_lightning.benchmark.plan import load_rows
from cuig_lightning.benchmark.report import pearson

COLUMNS = [("UA", "UA"), ("RA_I", "RA-I"), ("RA_C", "RA-C"), ("ASR", "ASR"), ("ASR_paraphrase", "ASR para."),
           ("relearn_UA", "UA relearned"), ("relearn_RA_I", "RA-I relearned")]


def run_robustness(job_path: str | Path, jobs: int = 1, report_only: bool = False,
                   fit: Callable[[list[str]], object] | None = None) -> Path:
    """The robustness table's runs and report (:func:`~cuig_lightning.benchmark.fidelity.run_study`)."""
    return run_study(StudyJob(job_path, kind="robustness"), write_robustness, jobs, report_only, fit)


def cells(job: StudyJob, runs: dict) -> dict[tuple[str, str], dict[int, dict]]:
    """(row, variant) -> {n: the metrics row after request n (simultaneous: the run on the first n targets)}, for
    the n of ``after`` whose row has the probes; only finished runs."""
    out = {}
    for row in job.rows:
        for variant in row["variants"]:
            if row.get("simultaneous"):
                keys = [(n, runs[(row["name"], variant, n)]) for n in job.simultaneous_n(row)]
                curve = {n: load_rows(run.run_dir)[-1] for n, run in keys if run.finished}
            else:
                run = runs[(row["name"], variant, None)]
                curve = {r["request"]: r for r in load_rows(run.run_dir)} if run.finished else {}
            found = {n: curve[n] for n in sorted(job.after) if n in curve and "ASR" in curve[n]}
            if found:
                out[(row["name"], variant)] = found
    return out


def _fmt(values) -> str:
    return ", ".join("–" if v is None else f"{v:.0f}" for v in values)


def findings(job: StudyJob, found: dict) -> str:
    """The paragraph under the tables, by fixed rules from the numbers: (1) per row, ASR (whole budget and the
    smallest) and UA / RA-I after relearning along ``after``; (2) over every (row, n) point, Pearson r between
    retention ((RA-I + RA-C) / 2) and ASR at the smallest budget and at the whole budget (does a model that keeps
    more also keep erasure less robust?); (3) in rows that keep erasing (the erased set grows along ``after``),
    how many concepts' ASR and relearned UA at the last n are above / below their value at their first probe
    (do early targets come back later?)."""
    if not found:
        return "No run has finished yet."
    said = []
    for (row, _), curve in found.items():
        ns = list(curve)
        small = min(int(k) for k in curve[ns[0]]["ASR_by_steps"])  # the smallest step budget judged
        said.append(f"**{row}** (after {', '.join(map(str, ns))}): ASR {_fmt(curve[n]['ASR'] for n in ns)}; within "
                    f"{small} steps {_fmt(curve[n]['ASR_by_steps'].get(str(small)) for n in ns)}; RA-I "
                    f"{_fmt(curve[n]['RA_I'] for n in ns)}; after relearning UA "
                    f"{_fmt(curve[n]['relearn_UA'] for n in ns)} and RA-I {_fmt(curve[n].get('relearn_RA_I') for n in ns)}.")
    points = [m for curve in found.values() for m in curve.values()]
    small = min(int(k) for m in points for k in m["ASR_by_steps"])
    kept = [(m["RA_I"] + m["RA_C"]) / 2 for m in points]
    r_small = pearson(kept, [m["ASR_by_steps"].get(str(small), m["ASR"]) for m in points])
    r_whole = pearson(kept, [m["ASR"] for m in points])
    if r_small == r_small and r_whole == r_whole:  # not NaN
        said.append(f"Over the {len(points)} (row, request) points, retention ((RA-I + RA-C) / 2) against ASR: "
                    f"Pearson r = {r_small:.2f} within {small} steps, {r_whole:.2f} with the whole budget "
                    + ("(a model that keeps more is easier to attack)." if r_small > 0.3 else
                       "(no clear link)." if r_small >= -0.3 else "(a model that keeps more is harder to attack)."))
    for (row, _), curve in found.items():
        ns = list(curve)
        if len(ns) < 2 or not set(curve[ns[0]]["ASR_per_concept"]) < set(curve[ns[-1]]["ASR_per_concept"]):
            continue  # a simultaneous row: each n is another run from θ0
        first: dict[str, tuple[float, float]] = {}  # concept -> (ASR, UA after relearning) at its first probe
        for n in ns[:-1]:
            for c, asr in curve[n]["ASR_per_concept"].items():
                first.setdefault(c, (asr, curve[n].get("relearn_UA_per_concept", {}).get(c, 100.0)))
        last = curve[ns[-1]]
        up = [c for c in first if last["ASR_per_concept"][c] > first[c][0]]
        down = [c for c in first if last["ASR_per_concept"][c] < first[c][0]]
        back = [c for c in first if last.get("relearn_UA_per_concept", {}).get(c, 100.0) < first[c][1]]
        said.append(f"{row}: of the {len(first)} targets probed before request {ns[-1]}, ASR at {ns[-1]} is higher "
                    f"than at their first probe for {len(up)} and lower for {len(down)}; UA after relearning fell "
                    f"for {len(back)}.")
    return " ".join(said)


def write_robustness(job: StudyJob, runs: dict) -> Path:
    """``robustness.md`` and ``robustness.json`` under the job's ``report`` folder, from the finished runs."""
    found = cells(job, runs)
    budgets = sorted({int(k) for curve in found.values() for m in curve.values() for k in m["ASR_by_steps"]})
    header = ["row", "variant", "after"] + [label for _, label in COLUMNS[:4]] + [
        f"ASR ≤{k} steps" for k in budgets[:-1]] + [label for _, label in COLUMNS[4:]]
    lines = ["# Robustness: is an erased style really gone?", "",
             f"Built by `cuig robustness --job <job file>` from the runs under `{job.output}` (seed {job.seed}; the "
             "runs' evaluation and probe options are in each run's `metrics.md`). *after*: the request after which "
             "the probes ran (simultaneous: the run from θ0 on the first n targets). ASR: the share of the erased "
             "concepts' images (their row of the evaluation grid) that UA's classifier calls the erased concept "
             "under the best prompt the soft-prompt attack found, with its whole budget and within fewer steps; "
             "*ASR para.*: the better paraphrase's; *UA relearned* / *RA-I relearned*: UA and RA-I after "
             "fine-tuning on θ0's images of the retained concepts only. Means over the concepts erased so far.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (row, variant), curve in found.items():
        for n, m in curve.items():
            by_steps = [m["ASR_by_steps"].get(str(k)) for k in budgets[:-1]]
            values = [m.get(key) for key, _ in COLUMNS[:4]] + by_steps + [m.get(key) for key, _ in COLUMNS[4:]]
            shown = ["–" if v is None else f"{v:.1f}" for v in values]
            lines.append(f"| {row} | {variant} | {n} | " + " | ".join(shown) + " |")
    concepts = [r["target"] for r in job.requests]
    lines += ["", "## Per erased concept: ASR / UA after relearning", "",
              "| row | after | " + " | ".join(concepts) + " |", "|" + "---|" * (len(concepts) + 2)]
    for (row, _), curve in found.items():
        for n, m in curve.items():
            asr, relearned = m.get("ASR_per_concept", {}), m.get("relearn_UA_per_concept", {})
            lines.append(f"| {row} | {n} | " + " | ".join(
                f"{asr[c]:.0f} / {relearned[c]:.0f}" if c in asr and c in relearned else "" for c in concepts) + " |")
    lines += ["", "## What it says", "", findings(job, found), ""]
    job.report.mkdir(parents=True, exist_ok=True)
    path = job.report / "robustness.md"
    path.write_text("\n".join(lines))
    keep = ("UA", "RA_I", "RA_C", "ASR", "ASR_by_steps", "ASR_per_concept", "ASR_paraphrase",
            "ASR_paraphrase_per_concept", "relearn_UA", "relearn_UA_per_concept", "relearn_RA_I", "robustness")
    (job.report / "robustness.json").write_text(json.dumps(
        {f"{row}/{variant}": {str(n): {k: m[k] for k in keep if k in m} for n, m in curve.items()}
         for (row, variant), curve in found.items()}, indent=1))
    return path
