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


def findings(job: StudyJob, found: dict) -> str:
    """The paragraph under the tables, by fixed rules: per row after the last n, ASR and UA after relearning
    against UA; whether the row keeping the most RA-I also keeps erasure most robust (lowest ASR at the smallest
    budget); and, for sequential rows, whether the first target's ASR or relearned UA moves from request 1 to
    the last (does an early target come back?)."""
    if not found:
        return "No run has finished yet."
    said = []
    last = {key: curve[max(curve)] for key, curve in found.items()}
    for (row, variant), m in last.items():
        said.append(f"**{row}** after {max(found[(row, variant)])}: UA {m['UA']:.1f}, RA-I {m['RA_I']:.1f}, "
                    f"ASR {m['ASR']:.1f} (within {min(map(int, m['ASR_by_steps']))} steps "
                    f"{m['ASR_by_steps'][min(m['ASR_by_steps'], key=int)]:.1f}), paraphrases {m['ASR_paraphrase']:.1f}, "
                    f"after relearning UA {m['relearn_UA']:.1f} and RA-I {m.get('relearn_RA_I') or float('nan'):.1f}.")
    budget = min((min(map(int, m["ASR_by_steps"])) for m in last.values()))
    weakest = {key: m["ASR_by_steps"].get(str(budget)) for key, m in last.items()}
    keeper = max(last, key=lambda k: last[k]["RA_I"])
    robust = min((k for k in weakest if weakest[k] is not None), key=lambda k: weakest[k], default=None)
    if robust is not None:
        said.append(f"The row keeping the most in-domain retention at the end is {keeper[0]} (RA-I "
                    f"{last[keeper]['RA_I']:.1f}); the lowest ASR within {budget} attack steps is {robust[0]}'s "
                    f"({weakest[robust]:.1f}; {keeper[0]}'s {weakest[keeper]:.1f})"
                    + (": the same row." if robust == keeper else ": not the same row."))
    for (row, variant), curve in found.items():
        ns = sorted(curve)
        if len(ns) < 2 or not curve[ns[0]].get("ASR_per_concept"):
            continue
        first = next(iter(curve[ns[0]]["ASR_per_concept"]))
        if first not in curve[ns[-1]].get("ASR_per_concept", {}):
            continue  # a simultaneous row: each n is another run from θ0
        asr = [curve[n]["ASR_per_concept"][first] for n in ns]
        relearned = [curve[n].get("relearn_UA_per_concept", {}).get(first) for n in ns]
        said.append(f"{row}: the first target {first}'s ASR after requests {', '.join(map(str, ns))}: "
                    f"{', '.join(f'{a:.0f}' for a in asr)}; its UA after relearning: "
                    f"{', '.join('–' if r is None else f'{r:.0f}' for r in relearned)}.")
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
            lines.append(f"| {row} | {variant} | {n} | " + " | ".join("–" if v is None else f"{v:.1f}" for v in values) + " |")
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
