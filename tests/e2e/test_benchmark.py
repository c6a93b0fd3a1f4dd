"""The benchmark: a short version (2 methods, 3 requests, 1 seed) writes the report; tuning on a
validation split picks hyperparameters by the stated rule, in parallel processes, and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cuig_lightning.benchmark import Tuning, apply_updates, candidates, choose, pearson, plan, run_benchmark
from cuig_lightning.cli import main as cuig
from cuig_lightning.run_folder import RunFolderError
from tests.helpers import CONFIGS, tree_digest



def test_pearson_matches_hand_computation():
    assert abs(pearson([1, 2, 3, 4], [2, 4, 6, 8]) - 1.0) < 1e-12
    assert abs(pearson([1, 2, 3], [3, 2, 1]) + 1.0) < 1e-12
    # hand: x=[1,2,3,4], y=[1,3,2,4] -> sxy=4, sxx=5, syy=5 -> r=0.8
    assert abs(pearson([1, 2, 3, 4], [1, 3, 2, 4]) - 0.8) < 1e-12


def test_selection_rule_and_grid():
    grid = {"ModelMerge": {"density": [0.2, 0.5], "lam": [1.0, 2.0]}}
    assert candidates(grid) == [{"ModelMerge": {"density": d, "lam": lam}} for d in (0.2, 0.5) for lam in (1.0, 2.0)]
    a, b, c, d = ({"X": {"w": i}} for i in range(4))
    def rows(*ua_ra):  # one metrics row per request
        return [{"UA": ua, "RA_I": ra_i, "RA_C": ra_c} for ua, ra_i, ra_c in ua_ra]

    results = [(a, rows((99, 50, 90), (95, 10, 50))), (b, rows((90, 80, 90), (85, 60, 80))),
               (c, rows((40, 99, 99), (40, 99, 99))), (d, rows((20, 99, 99), (95, 90, 90)))]
    assert choose(results, min_ua=80) == b  # c retains best but does not erase; d misses the floor at request 1
    assert choose(results, min_ua=99) == a  # nobody reaches the floor everywhere: the best worst UA (95)
    assert choose(results[:3], min_ua=86) == a  # b ends at 85: one request below the floor excludes it
    overlay = yaml.safe_load((CONFIGS / "canvas_mini_sculpmem" / "l2.yaml").read_text())
    tuned = apply_updates(overlay, {"NormRegularizer": {"weight": 7.0}})
    assert tuned["trainer"]["callbacks"][0]["init_args"] == {"p": 2, "weight": 7.0}
    assert tuned["model"] == overlay["model"]  # the method (and its mask) untouched
    with pytest.raises(ValueError, match="GradientProjection"):
        apply_updates(overlay, {"GradientProjection": {"k": 3}})


def _tiny_base(tmp_path: Path, tiny_sd: Path, cache_dir: Path, requests: int = 3) -> Path:
    base = tmp_path / "base.yaml"
    config = yaml.safe_load((CONFIGS / "seq12.yaml").read_text())
    config["trainer"].update(requests=config["trainer"]["requests"][:requests], max_steps=2,
                             enable_progress_bar=False, accelerator="cpu",
                             evaluation={**config["trainer"]["evaluation"], "seeds": [188], "steps": 2, "batch_size": 256,
                                         "retain_styles": config["trainer"]["evaluation"]["retain_styles"][:3],
                                         "retain_objects": config["trainer"]["evaluation"]["retain_objects"][:3]})
    config["model"]["model_path"] = str(tiny_sd)
    config["data"].update(images_per_prompt=1, batch_size=2, sample_steps=2, cache_dir=str(cache_dir),
                          prompts=["A Circle image."])
    base.write_text(yaml.safe_dump(config))
    return base


def test_short_benchmark_writes_table_and_plots(tmp_path, tiny_sd, cache_dir):
    report = tmp_path / "results"
    base = _tiny_base(tmp_path, tiny_sd, cache_dir)
    kwargs = dict(base=[str(base)], rows=["sequential", "l2"], seeds=[0], output=str(tmp_path / "runs"),
                  methods={"conabl": str(CONFIGS / "canvas_mini"), "sculpmem": str(CONFIGS / "canvas_mini_sculpmem")},
                  report=str(report), fit=cuig)
    table = run_benchmark(**kwargs)
    text = table.read_text()
    for method in ("conabl", "sculpmem"):
        for row in ("sequential", "l2"):
            assert f"| {method} | {row} | 1 |" in text
    for png in ("curves.png", "drift_vs_retention.png", "similarity_vs_ra_i.png"):
        assert (report / png).stat().st_size > 1000
    runs = sorted((tmp_path / "runs").glob("*/*/seed0/metrics.json"))
    assert len(runs) == 4
    lines = (report / "per_request.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 * 3  # header + 4 runs x 3 requests
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["rows"]) == {f"{m}/{r}" for m in ("conabl", "sculpmem") for r in ("sequential", "l2")}

    # a finished run is reused only while its configs are unchanged; otherwise one error, nothing touched
    before = tree_digest(tmp_path / "runs")
    config = yaml.safe_load(base.read_text())
    config["model"]["learning_rate"] = 3.0e-5
    base.write_text(yaml.safe_dump(config))
    with pytest.raises(RunFolderError, match="other config files"):
        run_benchmark(**kwargs)
    assert tree_digest(tmp_path / "runs") == before


def test_tuned_benchmark_runs_in_parallel_and_resumes(tmp_path, tiny_sd, cache_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    validation = tmp_path / "validation.yaml"
    validation.write_text(yaml.safe_dump({"trainer": {
        "requests": [{"target": "Pop_Art"}, {"target": "Cubism"}],
        "evaluation": {"retain_styles": ["Artist_Sketch", "Comic_Etch"]}}}))
    tuning = Tuning(validation=str(validation), grid={"l2": {"NormRegularizer": {"weight": [0.0, 1.0e9]}}},
                    combine={"merge_gradproj": ["l2"]}, min_ua=0.0)
    output, report = tmp_path / "runs", tmp_path / "results"
    kwargs = dict(base=[str(_tiny_base(tmp_path, tiny_sd, cache_dir, requests=2))],
                  methods={"conabl": str(CONFIGS / "canvas_mini")}, rows=["l2"], seeds=[0],
                  output=str(output), report=str(report), tuning=tuning, jobs=2, fit=cuig)
    run_benchmark(**kwargs)

    tuning_runs = {w: output / "tuning" / "conabl" / "l2" / f"weight{w:g}" / "seed0" for w in (0.0, 1.0e9)}
    finals = {w: json.loads((d / "metrics.json").read_text())[-1] for w, d in tuning_runs.items()}
    for w, d in tuning_runs.items():  # the validation sequence, not the reported one
        assert [r["targets"] for r in json.loads((d / "metrics.json").read_text())] == ["Pop_Art", "Cubism"]
        assert (d.parent / "seed0.log").is_file()
    expected = max(finals, key=lambda w: (finals[w]["RA_I"] + finals[w]["RA_C"]) / 2)  # min_ua 0: all eligible
    chosen = json.loads((report / "tuning.json").read_text())["conabl"]["l2"]
    assert chosen == {"NormRegularizer": {"weight": expected}}
    tuned = yaml.safe_load((output / "conabl" / "l2" / "tuned.yaml").read_text())
    assert tuned["trainer"]["callbacks"][0]["init_args"] == {"p": 2, "weight": expected}
    job = json.loads((output / "conabl" / "l2" / "seed0" / "job.json").read_text())
    callbacks = job["config"]["trainer"]["callbacks"]
    assert callbacks[0]["init_args"]["weight"] == expected  # the reported run used the choice
    assert "yes" in (report / "tuning.md").read_text() and "worst UA" in (report / "tuning.md").read_text()
    table = (report / "main_table.md").read_text()  # min_ua 0: every finished row meets matched forgetting
    assert "UA ≥ 0 throughout" in table and "| yes |" in table

    stamps = {p: p.stat().st_mtime_ns for p in output.rglob("metrics.json")}
    run_benchmark(**kwargs)  # everything finished: nothing is recomputed
    assert {p: p.stat().st_mtime_ns for p in output.rglob("metrics.json")} == stamps


def test_main_table_plan_tunes_on_concepts_outside_the_reported_sequence(tmp_path):
    config = yaml.safe_load((CONFIGS / "paper" / "main_table.yaml").read_text())
    root = CONFIGS.parent
    tuning = Tuning(**{**config["tuning"], "validation": str(root / config["tuning"]["validation"])})
    methods = {m: str(root / f) for m, f in config["methods"].items()}
    runs, tuned = plan([str(root / config["base"])], methods, config["rows"], config["seeds"], tmp_path, tuning)
    tuning_runs = [r for r in runs if r.key[0] == "tuning"]
    per_method = sum(len(candidates(g)) for g in tuning.grid.values())
    assert len(tuning_runs) == 2 * per_method and len(runs) - len(tuning_runs) == 2 * len(config["rows"]) * 3
    assert {"gradproj", "gradproj_topk", "merge_gradproj", "gradproj_selft"} <= set(config["rows"])
    assert len({run.configs[-2] for run in tuning_runs}) == len(tuning_runs)  # one overlay file per candidate
    for (method, row), pairs in tuned["runs"].items():
        for updates, run in pairs:  # each file really carries its candidate's values
            overlay = yaml.safe_load(Path(run.all_configs()[-2]).read_text())  # written when the run launches
            got = {cb["class_path"].split(".")[-1]: cb.get("init_args", {}) for cb in overlay["trainer"]["callbacks"]}
            for cls, args in updates.items():
                assert {k: got[cls][k] for k in args} == args, (method, row, run.key)
    validation = yaml.safe_load(Path(tuning.validation).read_text())["trainer"]
    targets = {r["target"] for r in validation["requests"]}
    retained = set(validation["evaluation"]["retain_styles"])
    reported = {r["target"] for r in yaml.safe_load((CONFIGS / "seq12.yaml").read_text())["trainer"]["requests"]}
    assert targets.isdisjoint(reported) and retained.isdisjoint(reported) and targets.isdisjoint(retained)
    reported_retain = set(yaml.safe_load((CONFIGS / "seq12.yaml").read_text())["trainer"]["evaluation"]["retain_styles"])
    assert reported_retain.isdisjoint(targets | retained)  # validation never measures the reported retain set
    # the reported runs of a tuned row wait for that row's tuning runs; combined rows for their parts'
    merge_gradproj = next(r for r in runs if r.key == ("conabl", "merge_gradproj", 0))
    assert {n.key[2] for n in merge_gradproj.needs} == {"merge", "gradproj"}
    assert all(not r.needs for r in runs if r.key[1:2] in (("sequential",), ("simultaneous",)))
