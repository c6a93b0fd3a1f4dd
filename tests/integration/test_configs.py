"""Every shipped config parses, names the right concepts, and the main-table rows run (tiny smoke)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import CONFIGS, printed_config, run_cli, write_smoke_overlay

ROWS = sorted((CONFIGS / "canvas_mini").glob("*.yaml"))
METHOD_MD_STYLES = ("Abstractionism Byzantine Cartoon Cold_Warm Ukiyoe Van_Gogh Neon_Lines Picasso On_Fire "
                    "Magic_Cube Winter Vibrant_Flow").split()
METHOD_MD_OBJECTS = "Bears Birds Cats Dogs Fishes Frogs Jellyfish Rabbits Sandwiches Statues Towers Waterfalls".split()
METHOD_MD_RETAIN_STYLES = ("Blossom_Season Rust Crayon Fauvism Superstring Red_Blue_Ink Gorgeous_Love French Joy "
                           "Greenfield Expressionism Impressionism").split()
METHOD_MD_RETAIN_OBJECTS = "Architectures Butterfly Flame Flowers Horses Human Sea Trees".split()


def test_main_table_rows_exist():
    names = {p.stem for p in ROWS}
    assert {"sequential", "simultaneous", "l1", "l2", "selft", "merge", "gradproj", "merge_gradproj"} <= names


def test_seq12_is_the_canvas_mini_sequence(capsys):
    from cuig_lightning.canvas_mini import world

    cfg = printed_config(capsys, CONFIGS / "seq12.yaml")
    targets = [r["target"] for r in cfg["trainer"]["requests"]]
    assert len(targets) == 12 and set(targets) <= set(world.STYLES)
    assert cfg["data"]["vocabulary"] == {"style": world.STYLES, "object": world.OBJECTS}
    assert cfg["model"]["model_path"] == "canvas-mini" and cfg["trainer"]["schedule"] == "sequential"
    assert cfg["trainer"]["evaluation"] is not None


def test_seq12_object_is_the_papers_object_sequence(capsys):
    from cuig_lightning.canvas_mini import objects, world

    cfg = printed_config(capsys, CONFIGS / "seq12_object.yaml")
    requests = cfg["trainer"]["requests"]
    assert [r["target"] for r in requests] == METHOD_MD_OBJECTS and {r["domain"] for r in requests} == {"object"}
    paper = printed_config(capsys, CONFIGS / "unlearncanvas" / "seq12_object.yaml")["trainer"]["requests"]
    assert [r["anchor"] for r in requests] == [r["anchor"] for r in paper]  # the paper's anchors ...
    assert all(objects.CATEGORY[r["target"]] == r["anchor"] for r in requests)  # ... are the world's categories
    evaluation = cfg["trainer"]["evaluation"]["init_args"]
    assert evaluation["retain_objects"] == METHOD_MD_RETAIN_OBJECTS
    seq12 = printed_config(capsys, CONFIGS / "seq12.yaml")
    assert evaluation["retain_styles"] == seq12["trainer"]["evaluation"]["init_args"]["retain_styles"]
    assert cfg["data"]["vocabulary"] == {"style": world.STYLES, "object": world.OBJECTS}
    # the object validation split: another order, a retain set apart from the reported one, all 20 objects used
    val = printed_config(capsys, CONFIGS / "seq12_object.yaml", CONFIGS / "paper" / "validation_object.yaml")
    val_targets = [r["target"] for r in val["trainer"]["requests"]]
    val_retain = val["trainer"]["evaluation"]["init_args"]["retain_objects"]
    assert len(set(val_targets)) == 12 and sorted(val_targets + val_retain) == sorted(world.OBJECTS)
    assert not set(val_retain) & set(METHOD_MD_RETAIN_OBJECTS) and val_targets[:4] != METHOD_MD_OBJECTS[:4]
    assert all(objects.CATEGORY[r["target"]] == r["anchor"] for r in val["trainer"]["requests"])


def test_seq12_object_smoke(tmp_path, tiny_sd, cache_dir):
    smoke = write_smoke_overlay(tmp_path, tiny_sd, cache_dir, job="seq12_object.yaml")
    assert run_cli("fit", "--config", str(CONFIGS / "seq12_object.yaml"), "--config", str(smoke)) == 0
    assert len(list((tmp_path / "run" / "requests").glob("*/manifest.json"))) == 2


def test_neighbours_diagnostic_measures_every_other_style(capsys):
    from cuig_lightning.canvas_mini import world

    cfg = printed_config(capsys, CONFIGS / "seq12.yaml", CONFIGS / "paper" / "neighbours.yaml")
    [request] = cfg["trainer"]["requests"]
    retain = cfg["trainer"]["evaluation"]["init_args"]["retain_styles"]
    assert request["target"] == "Artist_Sketch" and sorted(retain) == sorted(set(world.STYLES) - {"Artist_Sketch"})


def test_the_robustness_probes_overlay_sets_both_probes(capsys):
    cfg = printed_config(capsys, CONFIGS / "seq12.yaml", CONFIGS / "paper" / "robustness_probes.yaml")
    evaluation = cfg["trainer"]["evaluation"]["init_args"]
    assert evaluation["retain_styles"]  # merged into seq12's evaluation, not replacing it
    for probe in ("attack", "relearn"):
        assert evaluation[probe]["init_args"]["every"] == [1, 4, 8, 12]


@pytest.mark.parametrize("domain, targets", [("style", METHOD_MD_STYLES), ("object", METHOD_MD_OBJECTS)])
def test_unlearncanvas_configs_name_the_paper_sequences(capsys, domain, targets):
    cfg = printed_config(capsys, CONFIGS / "unlearncanvas" / f"seq12_{domain}.yaml")
    requests = cfg["trainer"]["requests"]
    assert [r["target"] for r in requests] == targets
    assert {r["domain"] for r in requests} == {domain}
    assert Path(cfg["model"]["model_path"]).is_absolute()  # a local folder, never a hub id
    evaluation = cfg["trainer"]["evaluation"]["init_args"]  # UnlearnCanvas' classifiers on the paper's retain sets
    assert evaluation["classifier_kind"] == "unlearncanvas"
    assert all(Path(evaluation[f"{d}_classifier"]).is_absolute() for d in ("style", "object"))
    assert evaluation["retain_styles"] == METHOD_MD_RETAIN_STYLES
    assert evaluation["retain_objects"] == METHOD_MD_RETAIN_OBJECTS
    assert (evaluation["seeds"], evaluation["steps"], evaluation["guidance"]) == (None, None, None)  # its protocol


@pytest.mark.parametrize("row", ROWS, ids=lambda p: p.stem)
def test_main_table_row_smoke(row, tmp_path, tiny_sd, cache_dir):
    smoke = write_smoke_overlay(tmp_path, tiny_sd, cache_dir, max_steps=2)
    assert run_cli("fit", "--config", str(CONFIGS / "seq12.yaml"), "--config", str(row), "--config", str(smoke)) == 0
    simultaneous = row.stem.startswith("simultaneous")
    assert len(list((tmp_path / "run" / "requests").glob("*/manifest.json"))) == (1 if simultaneous else 2)


# ------------------------------------------------------------------------------ SculpMem and ESD configs
SCULPMEM_ROWS = ["sequential", "simultaneous", "simultaneous_paper", "l1", "l2", "selft", "merge", "gradproj",
                 "gradproj_names", "merge_gradproj"]
ROW_CALLBACKS = {
    "sequential": [], "simultaneous": [], "simultaneous_paper": [], "l1": ["callbacks.NormRegularizer"],
    "l2": ["callbacks.NormRegularizer"], "selft": ["callbacks.SelectiveFineTuning"], "merge": ["callbacks.ModelMerge"],
    "gradproj": ["callbacks.GradientProjection"], "gradproj_names": ["callbacks.GradientProjection"],
    "merge_gradproj": ["callbacks.GradientProjection", "callbacks.ModelMerge"],
}


@pytest.mark.parametrize("row", SCULPMEM_ROWS)
def test_sculpmem_rows_parse(capsys, row):
    cfg = printed_config(capsys, CONFIGS / "seq12.yaml", CONFIGS / "canvas_mini_sculpmem" / f"{row}.yaml")
    method = cfg["model"]["method"]
    assert method["class_path"] == "cuig_lightning.methods.SculpMem"
    assert method["init_args"]["trainable"] == "xattn_kv"  # the paper's runs (method.md)
    classes = [c["class_path"] for c in cfg["trainer"]["callbacks"] or []]
    assert classes == ROW_CALLBACKS[row]  # the dynamic mask comes with the method, never listed
    expected_schedule = {"simultaneous": "simultaneous", "simultaneous_paper": "simultaneous", "merge": "independent",
                         "merge_gradproj": "independent"}
    assert cfg["trainer"]["schedule"] == expected_schedule.get(row, "sequential")
    assert cfg["trainer"]["run_dir"] == f"runs/canvas_mini/sculpmem-{row.replace('_', '-')}"
    conabl = printed_config(capsys, CONFIGS / "seq12.yaml", CONFIGS / "canvas_mini" / f"{row}.yaml")
    conabl_classes = [c["class_path"] for c in conabl["trainer"]["callbacks"] or []]
    assert classes == conabl_classes  # the same rows as ConAbl's


def test_the_paper_simultaneous_row_trains_until_ua_99_beside_the_matched_forgetting_one(capsys):
    for method in ("canvas_mini", "canvas_mini_sculpmem"):
        ours = printed_config(capsys, CONFIGS / "seq12.yaml", CONFIGS / method / "simultaneous.yaml")["trainer"]
        paper = printed_config(capsys, CONFIGS / "seq12.yaml", CONFIGS / method / "simultaneous_paper.yaml")["trainer"]
        assert (ours["until_ua"], paper["until_ua"]) == (95, 99)  # the paper: UA >= 99; cuig's reference: 95
        assert paper["schedule"] == ours["schedule"] == "simultaneous" and paper["max_steps"] == ours["max_steps"]


def test_the_gradproj_rows_build_c_as_the_paper_code_and_names_is_its_own_row(capsys):
    for method in ("canvas_mini", "canvas_mini_sculpmem"):
        for row, expected in (("gradproj", {"source": "captions", "caption_set": "anchors", "caption_token": "content",
                                            "dedup": 0.95}),
                              ("gradproj_names", {"source": "names", "mode": "all"})):
            cfg = printed_config(capsys, CONFIGS / "seq12.yaml", CONFIGS / method / f"{row}.yaml")
            [gp] = cfg["trainer"]["callbacks"]
            assert gp["init_args"].items() >= expected.items(), (method, row)


def test_esd_config_parses(capsys):
    cfg = printed_config(capsys, CONFIGS / "seq12.yaml", CONFIGS / "canvas_mini" / "esd.yaml")
    method = cfg["model"]["method"]
    assert method["class_path"] == "cuig_lightning.methods.ESD" and method["init_args"]["trainable"] == "xattn"
    assert method["init_args"]["eta"] == 1.0 and method["init_args"]["trajectory_steps"] >= 1
