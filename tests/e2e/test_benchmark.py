"""The benchmark: a short version (2 methods, 3 requests, 1 seed, a tuned learning rate, the simultaneous curve)
writes every report; tuning on a validation split picks hyperparameters by the stated rule, in parallel
processes, and resumes; the plan of the paper's table, the tuning grid's config paths, the simultaneous curve
and the trade-off frontier from fake metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from cuig_lightning.benchmark import (Tuning, apply_updates, candidates, choose, pearson, plan, run_benchmark, tag,
                                      write_chosen_configs, write_tuning_report)
from cuig_lightning.benchmark.plan import load_rows
from cuig_lightning.cli import main as cuig
from cuig_lightning.run_folder import RunFolderError
from tests.helpers import CONFIGS, tree_digest, write_tiny_benchmark_base

REPORTED = yaml.safe_load((CONFIGS / "seq12.yaml").read_text())["trainer"]["requests"]


def test_pearson_matches_hand_computation():
    assert abs(pearson([1, 2, 3, 4], [2, 4, 6, 8]) - 1.0) < 1e-12
    assert abs(pearson([1, 2, 3], [3, 2, 1]) + 1.0) < 1e-12
    # hand: x=[1,2,3,4], y=[1,3,2,4] -> sxy=4, sxx=5, syy=5 -> r=0.8
    assert abs(pearson([1, 2, 3, 4], [1, 3, 2, 4]) - 0.8) < 1e-12


def test_selection_rule_and_grid():
    grid = {"ModelMerge": {"density": [0.2, 0.5], "lam": [1.0, 2.0]}}
    assert candidates(grid) == [{"ModelMerge": {"density": d, "lam": lam}} for d in (0.2, 0.5) for lam in (1.0, 2.0)]
    schedules = candidates({"ModelMerge": {"lam": [2.0, [1.25, 1.5, 2.0]]}, "model.learning_rate": [1.0e-5]})
    assert [tag(u) for u in schedules] == ["lam2_learning_rate1e-05", "lam1.25-1.5-2_learning_rate1e-05"]
    merge = yaml.safe_load((CONFIGS / "canvas_mini" / "merge.yaml").read_text())
    assert apply_updates(merge, schedules[1])["trainer"]["callbacks"][0]["init_args"]["lam"] == [1.25, 1.5, 2.0]
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


def test_grid_config_paths_set_keys_outside_callbacks():
    grid = {"NormRegularizer": {"weight": [1.0, 2.0]}, "model.learning_rate": [1.0e-5, 2.0e-5]}
    options = candidates(grid)
    assert options[1] == {"NormRegularizer": {"weight": 1.0}, "model.learning_rate": 2.0e-5}
    assert [tag(u) for u in options] == ["weight1_learning_rate1e-05", "weight1_learning_rate2e-05",
                                         "weight2_learning_rate1e-05", "weight2_learning_rate2e-05"]
    assert tag({"model.learning_rate": 2.5e-6}) == "learning_rate2.5e-06"
    overlay = yaml.safe_load((CONFIGS / "canvas_mini_sculpmem" / "l2.yaml").read_text())
    tuned = apply_updates(overlay, options[1])
    assert tuned["model"]["learning_rate"] == 2.0e-5 and tuned["trainer"]["callbacks"][0]["init_args"]["weight"] == 1.0
    assert tuned["model"]["method"] == overlay["model"]["method"]  # the rest of the section untouched
    assert "learning_rate" not in overlay.get("model", {})  # the overlay itself unchanged
    sequential = yaml.safe_load((CONFIGS / "canvas_mini" / "sequential.yaml").read_text())  # no model section
    assert apply_updates(sequential, {"model.learning_rate": 5.0e-6})["model"] == {"learning_rate": 5.0e-6}
    with pytest.raises(ValueError, match="not a section"):
        apply_updates({"model": 3}, {"model.learning_rate": 1.0})


def _fake_metrics(run_dir: Path, *ua_ra: tuple[float, float, float]) -> None:
    """A finished run's metrics.json: one (UA, RA-I, RA-C) per request."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"request": i + 1, "targets": f"T{i}", "steps": 2, "UA": ua, "RA_I": ra_i, "RA_C": ra_c}
            for i, (ua, ra_i, ra_c) in enumerate(ua_ra)]
    (run_dir / "metrics.json").write_text(json.dumps(rows))


def test_frontier_choices_and_combined_rows_from_fake_metrics(tmp_path):
    methods = tmp_path / "rows"
    methods.mkdir()
    for row, source in (("sequential", "sequential"), ("l2", "l2"), ("l2_again", "l2")):
        shutil.copy(CONFIGS / "canvas_mini" / f"{source}.yaml", methods / f"{row}.yaml")
    validation = tmp_path / "validation.yaml"  # two validation requests: the fake runs below are whole
    validation.write_text(yaml.safe_dump({"trainer": {"requests": [{"target": "Pop_Art"}, {"target": "Cubism"}]}}))
    tuning = Tuning(validation=str(validation), min_ua=80.0, combine={"l2_again": ["l2"]},
                    grid={"sequential": {"model.learning_rate": [1.0e-5, 2.0e-5]},
                          "l2": {"NormRegularizer": {"weight": [1.0, 2.0]}},
                          "l2_again": {"model.learning_rate": [3.0e-5]}})
    planned = plan([str(CONFIGS / "seq12.yaml")], {"conabl": str(methods)}, ["sequential", "l2", "l2_again"], [0],
                   tmp_path / "runs", tuning)
    metrics = {("sequential", "learning_rate1e-05"): [(90, 30, 80), (85, 20, 70)],  # meets the floor
               ("sequential", "learning_rate2e-05"): [(100, 10, 60), (99, 5, 50)],
               ("l2", "weight1"): [(70, 60, 90), (60, 50, 90)],  # no l2 candidate reaches UA 80: best worst UA 60
               ("l2", "weight2"): [(40, 90, 95), (30, 80, 95)]}
    for (row, name), values in metrics.items():
        _fake_metrics(next(r for u, r in planned.tuning[("conabl", row)] if tag(u) == name).run_dir, *values)
    [(_, combined)] = planned.tuning[("conabl", "l2_again")]
    assert {n.key[2] for n in combined.needs} == {"l2"}  # a combined row's candidates wait for its parts
    overlay = yaml.safe_load(Path(combined.all_configs()[-2]).read_text())  # its parts' choice + its own lr
    assert overlay["trainer"]["callbacks"][0]["init_args"]["weight"] == 1.0
    assert overlay["model"]["learning_rate"] == 3.0e-5
    metrics[("l2_again", "learning_rate3e-05")] = [(95, 40, 90), (82, 35, 88)]
    _fake_metrics(combined.run_dir, *metrics[("l2_again", "learning_rate3e-05")])

    out = tmp_path / "report"
    out.mkdir()
    write_tuning_report(planned, tuning, out)
    frontier = json.loads((out / "tradeoff.json").read_text())["conabl"]
    for row, points in frontier.items():  # every candidate's final validation metrics, in order of UA
        assert [p["UA"] for p in points] == sorted(p["UA"] for p in points)
        for p in points:
            assert (p["UA"], p["RA_I"], p["RA_C"]) == metrics[(row, p["candidate"])][-1]
    assert [p["candidate"] for p in frontier["sequential"] if p["chosen"]] == ["learning_rate1e-05"]
    assert [p["worst_UA"] for p in frontier["l2"]] == [30, 60]
    assert (out / "tradeoff.png").stat().st_size > 1000
    chosen = json.loads((out / "tuning.json").read_text())["conabl"]
    assert chosen["l2"] == {"NormRegularizer": {"weight": 1.0}}
    assert chosen["l2_again"] == {"NormRegularizer": {"weight": 1.0}, "model.learning_rate": 3.0e-5}
    text = (out / "tuning.md").read_text()
    assert ("conabl / l2: **no candidate meets the rule** (UA ≥ 80 after every validation request); "
            "the best worst UA is 60.0 (weight1, chosen)") in text
    assert "conabl / sequential: **no candidate" not in text and "conabl / l2_again: **no candidate" not in text

    # each row's choice as a ready overlay: what its reported runs use (tuned.yaml), with its own run_dir and seed
    written = write_chosen_configs(planned, {"conabl": str(methods)}, [str(CONFIGS / "seq12.yaml")],
                                   tmp_path / "chosen", out, tmp_path / "runs", curve_seeds=1)
    assert sorted(p.name for p in written) == ["l2.yaml", "l2_again.yaml", "sequential.yaml"]
    for path in written:
        row = path.stem
        ready = yaml.safe_load(path.read_text())
        reported = next(r for r in planned.reported if r.key[1] == row)
        tuned = yaml.safe_load(Path(reported.all_configs()[-1]).read_text())
        assert ready["trainer"].pop("run_dir") == f"runs/chosen/conabl-{row}"
        assert ready.pop("seed_everything") == ready.pop("data")["seed"] == 42  # seq12's seed, data's too
        tuned["trainer"].pop("run_dir")
        assert ready == tuned, row
        header = path.read_text().split("\nseed_everything:")[0]
        assert f"--config {CONFIGS / 'seq12.yaml'} --config {path}" in header
        assert "--seed_everything S --data.seed S" in header and "--trainer.curve_seeds=1" in header
    ready = yaml.safe_load((tmp_path / "chosen" / "conabl" / "l2_again.yaml").read_text())
    assert ready["trainer"]["callbacks"][0]["init_args"]["weight"] == 1.0  # its part's choice
    assert ready["model"]["learning_rate"] == 3.0e-5  # its own
    assert "NormRegularizer weight 1; model.learning_rate 3e-05" in (path.parent / "l2_again.yaml").read_text()


def test_simultaneous_curve_plan_cuts_the_reported_sequence(tmp_path):
    methods = {"conabl": str(CONFIGS / "canvas_mini")}
    planned = plan([str(CONFIGS / "seq12.yaml")], methods, ["sequential", "simultaneous"], [0, 1], tmp_path,
                   simultaneous_n=[1, 2, 4, 8, 12])
    assert set(planned.curve) == {("conabl", n, s) for n in (1, 2, 4, 8, 12) for s in (0, 1)}
    for (method, n, seed), run in planned.curve.items():
        if n == 12:  # all targets: the table's simultaneous row, run once
            assert run in planned.reported and run.key == ("conabl", "simultaneous", seed)
            continue
        assert run in planned.runs and run not in planned.reported
        assert run.configs[-1] == str(CONFIGS / "canvas_mini" / "simultaneous.yaml")
        assert run.run_dir == tmp_path / "conabl" / "simultaneous_n" / f"n{n}" / f"seed{seed}"
        [option] = [a for a in run.arguments() if a.startswith("--trainer.requests=")]
        assert json.loads(option.split("=", 1)[1]) == REPORTED[:n]  # the first n reported targets
    assert len(planned.runs) == len(set(map(id, planned.runs))) == 2 * 2 + 2 * 4  # rows x seeds + new per-n runs
    for bad in ([0], [13]):
        with pytest.raises(ValueError, match="simultaneous_n"):
            plan([str(CONFIGS / "seq12.yaml")], methods, ["simultaneous"], [0], tmp_path, simultaneous_n=bad)
    # no rows: the curve alone, its n = 12 as a curve run of its own
    curve_only = plan([str(CONFIGS / "seq12.yaml")], methods, [], [0], tmp_path, simultaneous_n=[1, 12])
    assert not list(curve_only.reported)
    assert [run.key for run in curve_only.runs] == [("simultaneous_n", "conabl", n, 0) for n in (1, 12)]


def _tiny_base(tmp_path: Path, tiny_sd: Path, cache_dir: Path, requests: int = 3) -> Path:
    return write_tiny_benchmark_base(tmp_path / "base.yaml", tiny_sd, cache_dir, requests)


def _validation(tmp_path: Path) -> Path:
    validation = tmp_path / "validation.yaml"
    validation.write_text(yaml.safe_dump({"trainer": {
        "requests": [{"target": "Pop_Art"}, {"target": "Cubism"}],
        "evaluation": {"retain_styles": ["Artist_Sketch", "Comic_Etch"]}}}))
    return validation


def test_short_benchmark_writes_table_and_plots(tmp_path, tiny_sd, cache_dir):
    report, output = tmp_path / "results", tmp_path / "runs"
    base = _tiny_base(tmp_path, tiny_sd, cache_dir)
    methods = {}
    for method, folder in (("conabl", "canvas_mini"), ("sculpmem", "canvas_mini_sculpmem")):
        methods[method] = str(tmp_path / folder)
        shutil.copytree(CONFIGS / folder, tmp_path / folder)
        simultaneous = yaml.safe_load((CONFIGS / folder / "simultaneous.yaml").read_text())
        simultaneous["trainer"].update(max_steps=2, until_ua_every=2)  # a tiny cap, reached before any UA check
        (tmp_path / folder / "simultaneous.yaml").write_text(yaml.safe_dump(simultaneous))
    tuning = Tuning(validation=str(_validation(tmp_path)), min_ua=0.0,
                    grid={"sequential": {"model.learning_rate": [1.0e-5, 2.0e-5]},
                          "l2": {"NormRegularizer": {"weight": [0.0, 1.0e9]}}})
    kwargs = dict(base=[str(base)], rows=["sequential", "l2"], seeds=[0], output=str(output), methods=methods,
                  report=str(report), tuning=tuning, simultaneous_n=[1, 2], fit=cuig)
    table = run_benchmark(**kwargs)
    text = table.read_text()
    for method in ("conabl", "sculpmem"):
        for row in ("sequential", "l2"):
            assert f"| {method} | {row} | 1 |" in text
        for n in (1, 2):  # the simultaneous curve, each run's steps at the cap
            assert f"| {method} | {n} | 1 |" in text
            rows = json.loads((output / method / "simultaneous_n" / f"n{n}" / "seed0" / "metrics.json").read_text())
            assert [r["targets"] for r in rows] == [" ".join(r["target"] for r in REPORTED[:n])]
    assert "| 2 (cap) |" in text
    for png in ("curves.png", "drift_vs_retention.png", "similarity_vs_ra_i.png", "tradeoff.png"):
        assert (report / png).stat().st_size > 1000
    assert len(sorted(output.glob("*/*/seed0/metrics.json"))) == 4  # the table's runs
    lines = (report / "per_request.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 * 3 + 2 * 2  # header + 4 runs x 3 requests + 4 simultaneous runs x 1 request
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["rows"]) == {f"{m}/{r}" for m in ("conabl", "sculpmem") for r in ("sequential", "l2")}
    assert set(summary["simultaneous_n"]["conabl"]) == {"1", "2"}
    similarity = summary["similarity_after_request_1"]  # the paper's way: the sequential row after request 1
    assert set(similarity) == {"conabl", "sculpmem"}
    for method, found in similarity.items():
        first = json.loads((output / method / "sequential" / "seed0" / "metrics.json").read_text())[0]["per_concept"]
        assert found["target"] == REPORTED[0]["target"] and found["seeds"] == 1
        assert {s: v["accuracy"] for s, v in found["styles"].items()} == pytest.approx(first["retain"], abs=0.01)
        assert all(-1 <= v["cosine"] <= 1 for v in found["styles"].values())
    frontier = json.loads((report / "tradeoff.json").read_text())
    assert {row: len(points) for row, points in frontier["sculpmem"].items()} == {"sequential": 2, "l2": 2}
    # the tuned learning rate reaches the reported runs
    chosen_lr = json.loads((report / "tuning.json").read_text())["conabl"]["sequential"]["model.learning_rate"]
    job = json.loads((output / "conabl" / "sequential" / "seed0" / "job.json").read_text())
    assert job["config"]["model"]["learning_rate"] == chosen_lr

    # --report_only rebuilds every report file from the finished runs, training nothing
    stamps = {p: p.stat().st_mtime_ns for p in output.rglob("metrics.json")}
    for name in ("main_table.md", "tradeoff.png", "tradeoff.json", "curves.png"):
        (report / name).unlink()
    run_benchmark(**kwargs, report_only=True)
    assert all((report / name).is_file() for name in ("main_table.md", "tradeoff.png", "tradeoff.json", "curves.png"))
    assert {p: p.stat().st_mtime_ns for p in output.rglob("metrics.json")} == stamps
    # ... and from a clone of the repository, whose run folders keep only what .gitignore lets in (no job.json)
    clone = tmp_path / "clone"
    for kept in (*output.rglob("metrics.json"), *output.rglob("*.yaml")):
        (clone / kept.relative_to(output)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(kept, clone / kept.relative_to(output))
    run_benchmark(**{**kwargs, "output": str(clone), "report": str(tmp_path / "clone_report")}, report_only=True)
    for name in ("main_table.md", "per_request.csv", "tuning.md"):
        assert (tmp_path / "clone_report" / name).read_text() == (report / name).read_text(), name

    # a finished run is reused only while its configs are unchanged; otherwise one error, nothing touched
    before = tree_digest(output)
    config = yaml.safe_load(base.read_text())
    config["model"]["learning_rate"] = 3.0e-5
    base.write_text(yaml.safe_dump(config))
    with pytest.raises(RunFolderError, match="other config files"):
        run_benchmark(**kwargs)
    assert tree_digest(output) == before


def test_tuned_benchmark_runs_in_parallel_and_resumes(tmp_path, tiny_sd, cache_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tuning = Tuning(validation=str(_validation(tmp_path)), grid={"l2": {"NormRegularizer": {"weight": [0.0, 1.0e9]}}},
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
    # the report step's ready overlay of the row, beside the base config (not in the repository's configs/chosen)
    ready = yaml.safe_load((Path(kwargs["base"][0]).parent / "chosen" / "conabl" / "l2.yaml").read_text())
    assert ready["trainer"]["callbacks"][0]["init_args"] == {"p": 2, "weight": expected}
    assert ready["trainer"]["run_dir"] == "runs/chosen/conabl-l2"
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
    base = [str(root / b) for b in config["base"]]
    planned = plan(base, methods, config["rows"], config["seeds"], tmp_path, tuning, config["simultaneous_n"])
    runs = planned.runs
    tuning_runs = [r for r in runs if r.key[0] == "tuning"]
    per_method = sum(len(candidates(g)) for g in tuning.grid.values())
    assert len(tuning_runs) == 2 * per_method and len(planned.reported) == 2 * len(config["rows"]) * 3
    curve_only = [r for r in planned.curve.values() if r not in planned.reported]  # n = 12: the row's own runs
    assert len(curve_only) == 2 * 3 * (len(config["simultaneous_n"]) - 1)
    assert len(runs) == len(tuning_runs) + len(planned.reported) + len(curve_only)
    # method by method (a CPU-only benchmark finishes ConAbl's table first), each its tuning before its table
    method_of = [r.key[1] if r.key[0] in ("tuning", "simultaneous_n") else r.key[0] for r in runs]
    assert method_of == sorted(method_of, key=list(config["methods"]).index)
    conabl = [r for r, m in zip(runs, method_of) if m == "conabl"]
    assert [r.key[0] == "tuning" for r in conabl] == sorted((r.key[0] == "tuning" for r in conabl), reverse=True)
    # ConAbl's one-seed table (its tuning first) comes before the GradProj ablation, which is read beside it
    first = runs[: planned.first_seed_end]
    assert [r for r in first if r.key[0] == "tuning"] == [r for r in conabl if r.key[0] == "tuning"]
    assert {r.key for r in first if r.key[0] != "tuning"} == {
        *(("conabl", row, 0) for row in config["rows"]),
        *(("simultaneous_n", "conabl", n, 0) for n in config["simultaneous_n"][:-1])}
    assert all(r.stop_below_ua == tuning.min_ua for r in tuning_runs) and tuning.stop_below_min_ua
    assert config["simultaneous_n"] == [1, 2, 4, 8, 12] and config["seeds"] == [0, 1, 2]
    assert {"gradproj", "gradproj_topk", "merge_gradproj", "gradproj_selft"} <= set(config["rows"])
    assert set(tuning.grid) == set(config["rows"])  # every row tuned, its learning rate included
    assert all("model.learning_rate" in axes for axes in tuning.grid.values())
    # 3 evaluation seeds for every run (the quick default job keeps 1); tuning only on the validation split
    assert yaml.safe_load(Path(base[1]).read_text())["trainer"]["evaluation"]["seeds"] == [188, 288, 588]
    assert all(r.configs[: len(base)] == base for r in runs)
    assert all(r.configs[-1] == tuning.validation for r in tuning_runs)
    assert len({run.configs[-2] for run in tuning_runs}) == len(tuning_runs)  # one overlay file per candidate
    for (method, row), pairs in planned.tuning.items():
        for updates, run in pairs:  # each file really carries its candidate's values
            if run.needs:  # a combined row's overlay is known once its parts' runs finished (fake-metrics test)
                continue
            overlay = yaml.safe_load(Path(run.all_configs()[-2]).read_text())  # written when the run launches
            callbacks = overlay["trainer"].get("callbacks", [])
            got = {cb["class_path"].split(".")[-1]: cb.get("init_args", {}) for cb in callbacks}
            for key, value in updates.items():
                if "." in key:
                    assert overlay["model"]["learning_rate"] == value, (method, row, run.key)
                else:
                    assert {k: got[key][k] for k in value} == value, (method, row, run.key)
    validation = yaml.safe_load(Path(tuning.validation).read_text())["trainer"]
    targets = {r["target"] for r in validation["requests"]}
    retained = set(validation["evaluation"]["retain_styles"])
    reported = {r["target"] for r in REPORTED}
    assert targets.isdisjoint(reported) and retained.isdisjoint(reported) and targets.isdisjoint(retained)
    reported_retain = set(yaml.safe_load((CONFIGS / "seq12.yaml").read_text())["trainer"]["evaluation"]["retain_styles"])
    assert reported_retain.isdisjoint(targets | retained)  # validation never measures the reported retain set
    # the reported runs of a tuned row wait for that row's tuning runs; combined rows also for their parts'
    merge_gradproj = next(r for r in runs if r.key == ("conabl", "merge_gradproj", 0))
    assert {n.key[2] for n in merge_gradproj.needs} == {"merge", "gradproj", "merge_gradproj"}
    for run in [*planned.reported, *curve_only]:
        row = run.key[1] if run in planned.reported else "simultaneous"
        assert {n.key[2] for n in run.needs} == {row, *tuning.combine.get(row, [])}


def test_a_stopped_run_is_resumed_not_reported(tmp_path):
    """The job rewrites metrics.json after every request: a run with fewer rows than planned stages is not finished."""
    from cuig_lightning.benchmark.plan import Run

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"requests": [{"target": t} for t in ("A", "B", "C")]}}))
    simultaneous = tmp_path / "sim.yaml"
    simultaneous.write_text(yaml.safe_dump({"trainer": {"schedule": "simultaneous"}}))
    row = {"targets": "A", "UA": 100.0, "RA_I": 90.0, "RA_C": 90.0}

    def run(name, configs, overrides=()):
        (tmp_path / name).mkdir()
        return Run((name,), tmp_path / name, [str(c) for c in configs], 0, overrides=list(overrides))

    partial, whole = run("partial", [config]), run("whole", [config])
    (partial.run_dir / "metrics.json").write_text(json.dumps([row, row]))
    (whole.run_dir / "metrics.json").write_text(json.dumps([row, row, row]))
    assert not partial.finished and whole.finished
    cut = run("cut", [config], ["--trainer.requests=[{target: A}, {target: B}]"])
    (cut.run_dir / "metrics.json").write_text(json.dumps([row, row]))
    sim = run("sim", [config, simultaneous])
    (sim.run_dir / "metrics.json").write_text(json.dumps([row]))
    assert cut.finished and sim.finished and (cut.planned_stages(), sim.planned_stages()) == (2, 1)


def test_a_corrupt_metrics_file_is_an_error_naming_it(tmp_path):
    from cuig_lightning.benchmark.plan import Run

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"requests": [{"target": "A"}]}}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{not json")
    with pytest.raises(RunFolderError, match=r"run/metrics.json is not readable JSON .*delete .*run to rerun it"):
        Run(("run",), tmp_path / "run", [str(config)], 0).finished
    assert (tmp_path / "run" / "metrics.json").read_text() == "{not json"  # nothing is rewritten


def test_a_candidate_below_the_floor_stops_there(tmp_path):
    """With ``stop_below_min_ua`` a tuning run is finished at its first request under the floor (the rule can no
    longer choose it); the option travels as ``--trainer.stop_below_ua`` but is not part of the run's stamp."""
    from cuig_lightning.benchmark.plan import Run

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"requests": [{"target": t} for t in ("A", "B", "C")]}}))

    def run(name, stop):
        (tmp_path / name).mkdir()
        return Run((name,), tmp_path / name, [str(config)], 0, stop_below_ua=stop)

    def rows(*ua):
        return json.dumps([{"targets": "A", "UA": u, "RA_I": 90.0, "RA_C": 90.0} for u in ua])

    below, above, no_rule = run("below", 85.0), run("above", 85.0), run("no_rule", None)
    (below.run_dir / "metrics.json").write_text(rows(90.0, 84.9))
    (above.run_dir / "metrics.json").write_text(rows(90.0, 85.0))
    (no_rule.run_dir / "metrics.json").write_text(rows(90.0, 84.9))
    assert below.finished and below.stopped(load_rows(below.run_dir))
    assert not above.finished and not no_rule.finished
    assert "--trainer.stop_below_ua=85.0" in below.arguments() and "stop_below_ua" not in json.dumps(below.stamp())
    assert not any("stop_below_ua" in a for a in no_rule.arguments())
    assert below.stamp() == no_rule.stamp()  # the same folder: a later run without the rule completes it
    whole = run("whole", 85.0)  # every request run (e.g. before the rule existed): finished, not stopped
    (whole.run_dir / "metrics.json").write_text(rows(90.0, 84.9, 84.0))
    assert whole.finished and not whole.stopped(load_rows(whole.run_dir))


def test_stopped_candidates_in_the_tuning_report(tmp_path):
    methods = tmp_path / "rows"
    methods.mkdir()
    shutil.copy(CONFIGS / "canvas_mini" / "sequential.yaml", methods / "sequential.yaml")
    validation = tmp_path / "validation.yaml"
    validation.write_text(yaml.safe_dump({"trainer": {"requests": [{"target": "Pop_Art"}, {"target": "Cubism"}]}}))
    tuning = Tuning(validation=str(validation), min_ua=80.0, stop_below_min_ua=True, measure_retention="last_request",
                    grid={"sequential": {"model.learning_rate": [1.0e-6, 1.0e-5, 2.0e-5]}})
    planned = plan([str(CONFIGS / "seq12.yaml")], {"conabl": str(methods)}, ["sequential"], [0],
                   tmp_path / "runs", tuning, curve_seeds=1)
    runs = {tag(u): r for u, r in planned.tuning[("conabl", "sequential")]}
    assert {r.stop_below_ua for r in runs.values()} == {80.0}
    assert all(r.stop_below_ua is None for r in planned.reported)  # reported runs always run every request
    # tuning candidates measure retention after their last request only; reported runs after every one
    assert all("--trainer.measure_retention=last_request" in r.arguments() for r in runs.values())
    assert all(r.measure_retention == "every_request" for r in planned.reported)
    assert all("measure_retention" not in json.dumps(r.stamp()) for r in runs.values())
    _fake_metrics(runs["learning_rate1e-06"].run_dir, (10, 100, 99))  # stopped after request 1
    _fake_metrics(runs["learning_rate1e-05"].run_dir, (90, 60, 90), (85, 50, 85))
    _fake_metrics(runs["learning_rate2e-05"].run_dir, (99, 30, 80), (98, 20, 70))
    # fewer seeds in the reported runs' curves only (a candidate's curve is UA alone), not in their stamps
    assert all("--trainer.curve_seeds=1" in r.arguments() for r in planned.reported)
    assert not any("curve_seeds" in " ".join(r.arguments()) for r in runs.values())
    assert all("curve_seeds" not in json.dumps(r.stamp()) for r in planned.reported)
    out = tmp_path / "report"
    out.mkdir()
    write_tuning_report(planned, tuning, out)
    text = (out / "tuning.md").read_text()
    assert "| conabl | sequential | learning_rate1e-06 (*stopped after request 1*) | 10.0 |" in text
    assert "learning_rate1e-05 |" in text and "learning_rate1e-05 (*stopped" not in text
    points = {p["candidate"]: p for p in json.loads((out / "tradeoff.json").read_text())["conabl"]["sequential"]}
    assert points["learning_rate1e-06"]["stopped"] and points["learning_rate1e-06"]["requests"] == 1
    assert points["learning_rate1e-05"]["chosen"] and not points["learning_rate2e-05"]["stopped"]


def test_the_report_counts_finished_runs_only(tmp_path):
    """An interrupted run's metrics.json holds its first requests: the table, curves and csv leave it out
    (it resumes), so a row's seeds and final numbers come from finished runs alone."""
    from cuig_lightning.benchmark import write_benchmark_report

    base = tmp_path / "base.yaml"
    config = yaml.safe_load((CONFIGS / "seq12.yaml").read_text())
    config["trainer"]["requests"] = config["trainer"]["requests"][:2]
    base.write_text(yaml.safe_dump(config))
    planned = plan([str(base)], {"conabl": str(CONFIGS / "canvas_mini")}, ["sequential", "l2"], [0, 1],
                   tmp_path / "runs", simultaneous_n=[])
    runs = {run.key: run for run in planned.reported}
    _fake_metrics(runs[("conabl", "sequential", 0)].run_dir, (100, 90, 95), (99, 60, 80))  # whole
    _fake_metrics(runs[("conabl", "sequential", 1)].run_dir, (100, 10, 10))  # interrupted after request 1
    _fake_metrics(runs[("conabl", "l2", 0)].run_dir, (100, 50, 50))  # interrupted
    out = write_benchmark_report(planned, tmp_path / "report", [str(base)], min_ua=85.0).parent
    table = (out / "main_table.md").read_text()
    assert "| conabl | sequential | 1 | 99.0 ± 0.0 | 60.0 ± 0.0 | 80.0 ± 0.0 | 99.0 | yes |" in table
    assert "| conabl | l2 | 0 | – | – | – | – | – |" in table
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["rows"]) == {"conabl/sequential"}
    csv_rows = (out / "per_request.csv").read_text().splitlines()[1:]
    assert [r.split(",")[:4] for r in csv_rows] == [["conabl", "sequential", "0", "1"], ["conabl", "sequential", "0", "2"]]
