"""The table of docs/canvas_mini.md "GradProj on objects: what the probe shows" (not part of the package): each cell's
UA / RA-I / RA-C and the KeyValueDrift probe's ratios, read from the committed runs in results/gradproj_object/.

The runs (one seed, 42; each cell an overlay of configs/paper/gradproj_object/ on the object job), of which
results/gradproj_object/<cell>/ keeps metrics.json / .md / .csv and requests/*/kv_drift.json (not the weights):
    cuig fit --config configs/seq12_object.yaml --config configs/paper/gradproj_object/<cell>.yaml \
        --trainer.run_dir /tmp/goa/<cell>
The table:
    python docs/gradproj_object_table.py
"""

from __future__ import annotations

import json
from pathlib import Path

from cuig_lightning.benchmark.ablation import read_run

RUNS = Path(__file__).resolve().parent.parent / "results" / "gradproj_object"
CELLS = ["adamw-none", "adamw-captions", "adamw-prefix", "sgd-none", "sgd-captions", "sgd-prefix"]


def drift(run: dict, group: str) -> str:
    """The probe's ratio for a group at the end of request 1 / its mean over the requests' ends."""
    first, mean = run.get(f"{group}_first"), run.get(f"{group}_mean")
    return "–" if first is None else f"{first:.2g} / {mean:.2g}"


def main() -> None:
    print("| cell | UA, lowest over the 12 requests | RA-I after requests 1 / 4 / 12 | RA-C after 12 "
          "| drift of C | of the retained prompts | of the target prompts | ‖ΔW‖/‖W0‖ |")
    print("|---|---|---|---|---|---|---|---|")
    for cell in CELLS:
        folder = RUNS / cell
        rows = {r["request"]: r for r in json.loads((folder / "metrics.json").read_text())}
        run = read_run(folder)
        ra_i = " / ".join(f"{rows[i]['RA_I']:.1f}" for i in (1, 4, 12))
        print(f"| {cell} | {min(r['UA'] for r in rows.values()):.1f} | {ra_i} | {rows[12]['RA_C']:.1f} "
              f"| {drift(run, 'C')} | {drift(run, 'retained')} | {drift(run, 'target')} | {drift(run, 'weights')} |")


if __name__ == "__main__":
    main()
