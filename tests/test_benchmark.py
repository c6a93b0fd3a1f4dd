"""A short benchmark (2 methods, 3 requests, 1 seed) produces the report files."""

from __future__ import annotations

from pathlib import Path

import yaml

from cuig_lightning.benchmark import pearson, run_benchmark

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_pearson_matches_hand_computation():
    assert abs(pearson([1, 2, 3, 4], [2, 4, 6, 8]) - 1.0) < 1e-12
    assert abs(pearson([1, 2, 3], [3, 2, 1]) + 1.0) < 1e-12
    # hand: x=[1,2,3,4], y=[1,3,2,4] -> sxy=4, sxx=5, syy=5 -> r=0.8
    assert abs(pearson([1, 2, 3, 4], [1, 3, 2, 4]) - 0.8) < 1e-12


def test_short_benchmark_writes_table_and_plots(tmp_path, tiny_sd, cache_dir):
    base = tmp_path / "base.yaml"
    config = yaml.safe_load((CONFIGS / "seq12.yaml").read_text())
    config["trainer"].update(requests=config["trainer"]["requests"][:3], max_steps=2, enable_progress_bar=False,
                             accelerator="cpu", evaluation={"seeds": [188], "steps": 2, "batch_size": 256})
    config["model"]["model_path"] = str(tiny_sd)
    config["data"].update(images_per_prompt=1, batch_size=2, sample_steps=2, cache_dir=str(cache_dir),
                          prompts=["A Circle image."])
    base.write_text(yaml.safe_dump(config))
    report = tmp_path / "results"
    table = run_benchmark(
        base=str(base),
        methods={"conabl": str(CONFIGS / "canvas_mini"), "sculpmem": str(CONFIGS / "canvas_mini_sculpmem")},
        rows=["sequential", "l2"], seeds=[0], output=str(tmp_path / "runs"), report=str(report),
    )
    text = table.read_text()
    for method in ("conabl", "sculpmem"):
        for row in ("sequential", "l2"):
            assert f"| {method} | {row} | 1 |" in text
    for png in ("curves.png", "drift_vs_retention.png", "similarity_vs_ra_i.png"):
        assert (report / png).stat().st_size > 1000
    runs = sorted((tmp_path / "runs").glob("*/*/seed0/metrics.json"))
    assert len(runs) == 4
