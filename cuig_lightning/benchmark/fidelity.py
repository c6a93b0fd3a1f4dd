"""The fidelity table (issue 33): what each of cuig's former deviations from the paper's code does, measured.

``cuig fidelity --job configs/paper/fidelity.yaml [--jobs N] [--report_only true]``. The job file names the base
configs (the validation split), a seed, and rows; each row has an ``overlay`` and ``variants`` (``today``: cuig's
behaviour before issue 33 spelled out; ``paper``: the defaults, the paper's code; others as named). Every (row,
variant) is an ordinary ``cuig fit`` of ``base + [row overlay, variant overlay]`` in ``output/<row>/<variant>``
(the overlays are written there as ``row.yaml`` / ``<variant>.yaml``); a ``simultaneous: true`` row runs once from
θ0 on the first n requests for each n of ``after`` (``output/<row>/<variant>/nN``). Finished runs are skipped.

The report ``report/fidelity.md`` (+ ``fidelity.json``), rebuilt from the runs' ``metrics.json``: per row and
variant UA / RA-I / RA-C after each request of ``after`` (a simultaneous row: its run on the first n targets), the
first request with RA-I < 50, the relative drift after the last request, and r, the Pearson correlation after
request 1 between the retained styles' accuracy and their text cosine to the target (the README's finding 3: the
paper reports r ≈ −0.8); then one paragraph made from those numbers by the fixed rules of :func:`findings`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import yaml

from cuig_lightning.benchmark.execute import execute, local
from cuig_lightning.benchmark.plan import METRICS, Run, base_value, load_rows
from cuig_lightning.benchmark.report import pearson

COLLAPSE = 50.0  # RA-I below this: the row has collapsed (the README's threshold)


class StudyJob:
    """A job file of rows × variants, each an ordinary ``cuig fit`` (this table's, and the robustness table's:
    :mod:`cuig_lightning.benchmark.robustness`), read and checked (one-line errors for what a user can get wrong).
    ``kind`` names the study in messages and in the runs' keys."""

    def __init__(self, path: str | Path, kind: str = "fidelity"):
        self.kind = kind
        data = yaml.safe_load(Path(path).read_text()) or {}
        missing = [k for k in ("base", "rows", "output", "report") if k not in data]
        if missing:
            raise ValueError(f"{kind} job {path} lacks {', '.join(missing)}")
        self.base = [data["base"]] if isinstance(data["base"], str) else list(data["base"])
        self.seed, self.after = int(data.get("seed", 0)), [int(n) for n in data.get("after", [1, 4, 8, 12])]
        self.output, self.report = Path(data["output"]), Path(data["report"])
        self.rows: list[dict] = data["rows"]
        for row in self.rows:
            if not isinstance(row, dict) or "name" not in row or not row.get("variants"):
                raise ValueError(f"{kind} job {path}: every row needs a name and variants, got {row!r}")
        names = [row["name"] for row in self.rows]
        if len(set(names)) != len(names):
            raise ValueError(f"{kind} job {path}: row names repeat ({names})")
        self.requests = base_value(self.base, "trainer.requests") or []

    def simultaneous_n(self, row: dict) -> list[int]:
        """A simultaneous row's target counts, in launch order: its own ``after`` (a subset of the job's, e.g. the
        costly ones first) or the job's."""
        wanted = [int(n) for n in row.get("after", self.after)]
        if not set(wanted) <= set(self.after):
            raise ValueError(f"{self.kind} row {row['name']}: after {wanted} must be among the job's {self.after}")
        return wanted

    def runs(self) -> dict[tuple[str, str, int | None], Run]:
        """(row, variant, n) -> its run (n: the simultaneous run's target count; None for a sequential job), in
        the job file's order."""
        runs = {}
        for row in self.rows:
            row_file = self.output / row["name"] / "row.yaml"
            for variant, overlay in row["variants"].items():
                variant_file = self.output / row["name"] / f"{variant}.yaml"
                writes = {str(row_file): row.get("overlay") or {}, str(variant_file): overlay or {}}
                configs = [*self.base, str(row_file), str(variant_file)]
                folder = self.output / row["name"] / variant
                for n in self.simultaneous_n(row) if row.get("simultaneous") else [None]:
                    first_n = [] if n is None else [f"--trainer.requests={json.dumps(self.requests[:n])}"]
                    # RA-I / RA-C where the table reads them (UA after every request)
                    runs[(row["name"], variant, n)] = Run((self.kind, row["name"], variant, n),
                                                          folder / (f"n{n}" if n else f"seed{self.seed}"),
                                                          configs, self.seed, writes=writes, overrides=first_n,
                                                          measure_retention=list(self.after))
        return runs


def run_study(job: StudyJob, write: Callable[[StudyJob, dict], Path], jobs: int = 1, report_only: bool = False,
              fit: Callable[[list[str]], object] | None = None) -> Path:
    """Run every unfinished run of the job (``jobs`` at once), then ``write`` the report; returns its path."""
    runs = job.runs()
    failed = [] if report_only else execute(list(runs.values()), local(fit, jobs))
    path = write(job, runs)
    if failed:
        raise RuntimeError(f"{len(failed)} {job.kind} run(s) failed; logs: "
                           + ", ".join(str(r.run_dir.with_suffix(".log")) for r in failed[:3]))
    return path


def run_fidelity(job_path: str | Path, jobs: int = 1, report_only: bool = False,
                 fit: Callable[[list[str]], object] | None = None) -> Path:
    """The fidelity table's runs and report (:func:`run_study`)."""
    return run_study(StudyJob(job_path), write_fidelity, jobs, report_only, fit)


# ------------------------------------------------------------------------------------------------ the numbers
def cells(job: StudyJob, runs: dict) -> dict[tuple[str, str], dict]:
    """(row, variant) -> its numbers: ``after`` {n: {UA, RA_I, RA_C}}, ``collapse`` (first n with RA-I < 50),
    ``drift_rel`` (after the last request), ``first`` (the request-1 row, for r); only what has finished."""
    out = {}
    for row in job.rows:
        for variant in row["variants"]:
            if row.get("simultaneous"):
                # a simultaneous job writes its one metrics row when it ends
                finals = {n: load_rows(runs[(row["name"], variant, n)].run_dir) for n in job.simultaneous_n(row)}
                curve = {n: rows[-1] for n, rows in finals.items() if rows}
            else:
                run = runs[(row["name"], variant, None)]  # an unfinished run is not reported (its curve is partial)
                curve = {r["request"]: r for r in load_rows(run.run_dir)} if run.finished else {}
            if not curve:
                continue
            last = curve[max(curve)]
            out[(row["name"], variant)] = {
                "after": {n: {m: curve[n][m] for m in METRICS} for n in job.after if n in curve and "RA_I" in curve[n]},
                "collapse": next((n for n in sorted(curve) if curve[n].get("RA_I", 100.0) < COLLAPSE), None),
                "drift_rel": last.get("drift_rel"), "worst_UA": min(r["UA"] for r in curve.values()),
                "first": curve.get(1)}
    return out


def similarity_r(first: dict | None, model) -> float | None:
    """Pearson r after request 1: the retained styles' accuracy against their text cosine to the one target
    (in-prompt token states, ``concept_embeddings``); None without that row or without any variation."""
    import torch.nn.functional as F

    if not first or "per_concept" not in first or len(first["per_concept"].get("unlearn", {})) != 1:
        return None
    [target] = first["per_concept"]["unlearn"]
    retained = list(first["per_concept"]["retain"])
    emb = F.normalize(model.concept_embeddings([target, *retained]), dim=-1)
    r = pearson([float(emb[0] @ e) for e in emb[1:]], [first["per_concept"]["retain"][s] for s in retained])
    return None if r != r else round(r, 3)  # NaN: every retained style kept the same accuracy


def findings(job: StudyJob, found: dict) -> str:
    """The paragraph under the table, by fixed rules from the numbers: per row, the largest change paper − today
    over the table's cells; GradProj's in-domain retention against the sequential row; names without the
    retain set; and whether any variant's damage after request 1 follows text similarity (r ≤ −0.5)."""
    last = job.after[-1]
    said = []
    for row in job.rows:
        if not {"today", "paper"} <= set(row["variants"]):
            continue  # nothing to compare (e.g. the names row: paper against paper without the retain names)
        today, paper = found.get((row["name"], "today")), found.get((row["name"], "paper"))
        if not today or not paper:
            said.append(f"**{row['name']}**: not measured yet (runs missing).")
            continue
        changes = [(abs(paper["after"][n][m] - today["after"][n][m]), n, m) for n in job.after
                   if n in paper["after"] and n in today["after"] for m in METRICS]
        size, n, m = max(changes)
        items = row.get("items", [])
        said.append(f"**{row['name']}** (item{'s' if len(items) > 1 else ''} {', '.join(map(str, items))}): "
                    f"worst UA {today['worst_UA']:.1f} → {paper['worst_UA']:.1f}; the largest change is "
                    f"{m.replace('_', '-')} after {'n = ' if row.get('simultaneous') else 'request '}{n}, "
                    f"{today['after'][n][m]:.1f} → {paper['after'][n][m]:.1f} ({size:.1f} points); "
                    f"RA-I < 50 first at {today['collapse'] or 'never'} (today) and {paper['collapse'] or 'never'} (paper).")
    sequential = found.get(("sequential", "paper"))
    for name in ("gradproj", "gradproj_names"):
        cell = found.get((name, "paper"))
        if cell and sequential and last in cell["after"] and last in sequential["after"]:
            ra = [f"{cell['after'][n]['RA_I']:.1f} vs {sequential['after'][n]['RA_I']:.1f}" for n in job.after
                  if n in cell["after"] and n in sequential["after"]]
            said.append(f"GradProj ({name}, the paper's code) against sequential, RA-I after requests "
                        f"{', '.join(map(str, job.after))}: {'; '.join(ra)} (sequential's learning rate differs: "
                        "each row keeps its validation choice).")
    named, unnamed = found.get(("gradproj_names", "paper")), found.get(("gradproj_names", "paper_unnamed"))
    if named and unnamed:
        common = [n for n in job.after if n in named["after"] and n in unnamed["after"]]
        said.append("C without the evaluated retain styles keeps RA-I " + ", ".join(
            f"{unnamed['after'][n]['RA_I']:.1f} (with them: {named['after'][n]['RA_I']:.1f})" for n in common)
            + " after requests " + ", ".join(map(str, common)) + ".")
    rs = {key: cell["r"] for key, cell in found.items() if cell.get("r") is not None}
    if found and not rs:
        said.append("After request 1 no run damaged its retained styles unevenly (each kept one accuracy for all of "
                    "them), so no change makes damage follow text similarity there (no r to compute).")
    if rs:
        strong = {k: r for k, r in rs.items() if r <= -0.5}
        said.append("Damage after request 1 follows text similarity (r ≤ −0.5) for " + (
            ", ".join(f"{row}/{variant} (r = {r:.2f})" for (row, variant), r in strong.items()) if strong
            else "no variant") + f"; r ranges {min(rs.values()):.2f} to {max(rs.values()):.2f} over "
            f"{len(rs)} runs with varied retained accuracy.")
    return " ".join(said)


def write_fidelity(job: StudyJob, runs: dict) -> Path:
    """``fidelity.md`` and ``fidelity.json`` under the job's ``report`` folder, from the finished runs."""
    from cuig_lightning.models.diffusion import DiffusionModel

    found = cells(job, runs)
    model = DiffusionModel.from_pretrained(base_value(job.base, "model.model_path")) if found else None
    for cell in found.values():
        cell["r"] = similarity_r(cell.pop("first"), model)
    header = ["row", "variant"] + [f"{m.replace('_', '-')} @{n}" for m in METRICS for n in job.after] + [
        "worst UA", "RA-I < 50 at", "drift (rel.)", "r @1"]
    lines = [
        "# Fidelity: cuig before issue 33 (`today`) against the paper's code (`paper`)", "",
        f"Validation split, one seed ({job.seed}), one evaluation seed per prompt (the configs' evaluation); each "
        "row's validation-chosen hyperparameters. Built by `cuig fidelity --job <job file>` from the runs under "
        f"`{job.output}`; values after requests {', '.join(map(str, job.after))} (simultaneous: the run on the "
        "first n targets), where RA-I / RA-C are measured (UA after every request), so *RA-I < 50 at* is the "
        "first of those requests; `–`: not run or not finished. r @1: Pearson r of the retained styles' accuracy "
        "after request 1 against their text cosine to the target (`–` also where every retained style kept the "
        "same accuracy: no damage to correlate).", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in job.rows:
        for variant in row["variants"]:
            cell = found.get((row["name"], variant))
            values = [f"{cell['after'][n][m]:.1f}" if cell and n in cell["after"] else "–"
                      for m in METRICS for n in job.after]
            extra = (["–"] * 4 if not cell else
                     [f"{cell['worst_UA']:.1f}", str(cell["collapse"] or "never"), f"{cell['drift_rel']:.4f}" if cell["drift_rel"] is not None
                      else "–", f"{cell['r']:.2f}" if cell["r"] is not None else "–"])
            lines.append(f"| {row['name']} | {variant} | " + " | ".join(values + extra) + " |")
    lines += ["", "## What changed what", "", findings(job, found), ""]
    job.report.mkdir(parents=True, exist_ok=True)
    path = job.report / "fidelity.md"
    path.write_text("\n".join(lines))
    (job.report / "fidelity.json").write_text(json.dumps(
        {f"{row}/{variant}": cell for (row, variant), cell in found.items()}, indent=1))
    return path
