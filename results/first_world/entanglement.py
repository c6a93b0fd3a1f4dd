"""Investigation: do retained styles that share a word (palette or pattern) with an erased target lose
more accuracy than those that share none? Reads the finished runs' metrics under results/first_world/run_metrics.

    python results/first_world/entanglement.py > results/first_world/entanglement.txt
"""
import json
from collections import defaultdict
from pathlib import Path

runs = Path(__file__).resolve().parent / "run_metrics"
acc = defaultdict(list)  # (method, row, erased so far, shares a word) -> per-style accuracies
for path in sorted(runs.glob("*/*/seed*/metrics.json")):
    method, row = path.parts[-4], path.parts[-3]
    if method == "tuning":
        continue
    erased = 0
    for request in json.loads(path.read_text()):
        erased += len(request["targets"].split())
        words = {w for t in request["per_concept"]["unlearn"] for w in t.split("_")}
        for style, a in request["per_concept"]["retain"].items():
            acc[(method, row, erased, bool(words & set(style.split("_"))))].append(a)

print("Retained-style accuracy (%), mean over seeds and styles: shares a word with an erased target / shares none")
print("(n = style-runs in each group; '-' = no style in that group)\n")
keys = sorted({k[:3] for k in acc})
print(f"{'method':9} {'row':15} {'erased':>6}  {'shares':>14}  {'shares none':>14}")
for method, row, erased in keys:
    cells = []
    for shares in (True, False):
        v = acc.get((method, row, erased, shares), [])
        cells.append(f"{sum(v) / len(v):6.1f} (n={len(v):3d})" if v else f"{'-':>14}")
    if row in ("sequential", "simultaneous") or erased in (1, 3, 6, 12):
        print(f"{method:9} {row:15} {erased:6d}  {cells[0]:>14}  {cells[1]:>14}")
