"""The GradProj ablation's pure parts (issue 14): the optimizer option, C from bare names, the run identity, the
KeyValueDrift probe's math, and the ablation report from fake run folders."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from callbacks.gradient_projection import bare_name_embeddings
from callbacks.key_value_drift import drift_ratios, layer_drift, prompts
from cuig_lightning.benchmark.ablation import (CELLS, CONFIG_DIR, gradproj_ablation_dir, gradproj_ablation_runs,
                                               write_gradproj_ablation)
from cuig_lightning.models.diffusion import DiffusionModel
from cuig_lightning.module import UnlearningModule
from cuig_lightning.run_folder import identity_hash
from tests.helpers import CONFIGS, REPO, printed_config

# ------------------------------------------------------------------------------------------------ optimizer


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_the_optimizer_option_builds_its_optimizer_with_the_scaled_learning_rate(tiny_sd, name, cls):
    module = UnlearningModule(str(tiny_sd), learning_rate=0.03, weight_decay=0.0, optimizer=name)
    module.trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=8), accumulate_grad_batches=2, world_size=1)
    optimizer = module.configure_optimizers()
    (group,) = optimizer.param_groups
    assert type(optimizer) is cls
    assert group["lr"] == pytest.approx(0.03 * 8 * 2) and group["weight_decay"] == 0.0
    assert len(group["params"]) == len(module.trainable)
    if name == "sgd":
        assert (group["momentum"], group["nesterov"]) == (0.0, False)


def test_momentum_is_an_sgd_option():
    with pytest.raises(ValueError, match="momentum is an SGD option"):
        UnlearningModule("unused", optimizer="adamw", momentum=0.9)
    with pytest.raises(ValueError, match="unknown optimizer"):
        UnlearningModule("unused", optimizer="adam")


def test_the_optimizer_option_keeps_the_identity_of_existing_runs(capsys):
    config = printed_config(capsys, CONFIGS / "seq12.yaml")
    assert (config["model"]["optimizer"], config["model"]["momentum"]) == ("adamw", 0.0)
    before = copy.deepcopy(config)  # the config as resolved before the options existed
    del before["model"]["optimizer"], before["model"]["momentum"]
    assert identity_hash(config) == identity_hash(before)
    assert "optimizer" in config["model"]  # the identity does not edit the config it reads
    for key, value in (("optimizer", "sgd"), ("momentum", 0.9)):
        assert identity_hash({**config, "model": {**config["model"], key: value}}) != identity_hash(config)


# ------------------------------------------------------------------------------------------------ bare names


def test_bare_names_embed_the_name_without_a_prompt(tiny_sd):
    diffusion = DiffusionModel.from_pretrained(tiny_sd)
    names = ["Van_Gogh", "Monet"]
    got = bare_name_embeddings(diffusion, names)
    for row, text in zip(got, ["Van Gogh", "Monet"]):
        n = len(diffusion.tokenizer(text).input_ids)  # BOS, the name's tokens, EOS
        torch.testing.assert_close(row, diffusion.encode_text([text])[0, 1 : n - 1].mean(0))
    in_prompt = diffusion.concept_embeddings(names, "style")  # causal states: the template's words change them
    assert (got - in_prompt).norm(dim=1).min() > 1e-3 * in_prompt.norm(dim=1).min()


# ------------------------------------------------------------------------------------------------ the probe's math


def test_drift_ratios_on_fixed_tensors():
    W0 = torch.eye(2, dtype=torch.float64)
    W = torch.diag(torch.tensor([1.5, 1.0], dtype=torch.float64))  # ΔW = diag(0.5, 0)
    states = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor([0.5, 0.0, 0.5 / math.sqrt(2)], dtype=torch.float64)
    torch.testing.assert_close(drift_ratios(W, W0, states), expected)


def test_drift_ratios_against_a_column_by_column_computation():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    W = W0 + 0.1 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    states = torch.randn(5, 4, generator=g, dtype=torch.float64)
    expected = torch.stack([((W - W0) @ x).norm() / (W0 @ x).norm() for x in states])
    torch.testing.assert_close(drift_ratios(W, W0, states), expected)


def test_layer_drift_averages_each_group_per_layer():
    eye = torch.eye(2, dtype=torch.float64)
    start = {"a": eye, "b": 2 * eye}
    weights = {"a": torch.diag(torch.tensor([1.5, 1.0], dtype=torch.float64)), "b": 2 * eye}  # b did not move
    states = {"C": torch.tensor([[0.0, 1.0]], dtype=torch.float64),
              "target": torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)}
    out = layer_drift(weights, start, states)
    assert list(out) == ["C", "target", "weights"]
    assert out["C"] == [0.0, 0.0]
    assert out["target"] == pytest.approx([(0.5 + 0.5 / math.sqrt(2)) / 2, 0.0])
    assert out["weights"] == pytest.approx([0.5 / math.sqrt(2), 0.0])  # ‖diag(0.5, 0)‖_F / ‖I‖_F


def test_probe_prompts_pair_each_concept_with_each_companion():
    assert prompts(["Van_Gogh", "Monet"], ["Circle", "Star"], "style") == [
        "A Circle image in Van Gogh style.", "A Star image in Van Gogh style.",
        "A Circle image in Monet style.", "A Star image in Monet style."]
    assert prompts(["Dogs"], [None, "Monet"], "object") == ["A Dogs image.", "A Dogs image in Monet style."]


# ------------------------------------------------------------------------------------------------ the report


def test_the_cells_are_the_shipped_overlays():
    assert sorted(CELLS) == sorted(p.stem for p in (REPO / CONFIG_DIR).glob("*.yaml"))
    runs = gradproj_ablation_runs(["configs/seq12.yaml", "configs/paper/evaluation.yaml"])
    assert list(runs) == list(CELLS) and len(CELLS) == 8
    assert runs["sgd-bare_names"] == ["configs/seq12.yaml", "configs/paper/evaluation.yaml",
                                      "configs/paper/gradproj_ablation/sgd-bare_names.yaml"]
    assert gradproj_ablation_dir(Path("out"), "adamw-none") == Path("out/gradproj_ablation/adamw-none/seed0")


def fake_run(runs_dir: Path, cell: str, finals: list[dict], metrics: tuple[float, float, float]) -> None:
    """A finished ablation run: metrics.json (the last row gets ``metrics``) and one probe record per request."""
    optimizer, source = cell.split("-")
    run = gradproj_ablation_dir(runs_dir, cell)
    rows = []
    for i, final in enumerate(finals, 1):
        folder = run / "requests" / f"{i:02d}-Style{i}"
        folder.mkdir(parents=True)
        record = {"optimizer": {"adamw": "AdamW", "sgd": "SGD"}[optimizer],
                  "c_source": None if source == "none" else source, "final": final}
        (folder / "kv_drift.json").write_text(json.dumps(record))
        rows.append({"request": i, "targets": f"Style{i}", "UA": 100.0, "RA_I": 100.0, "RA_C": 100.0})
    rows[-1].update(UA=metrics[0], RA_I=metrics[1], RA_C=metrics[2])
    (run / "metrics.json").write_text(json.dumps(rows))


def drift(C: float | None, retained: float, target: float = 0.03, weights: float = 0.01) -> dict:
    return {**({"C": C} if C is not None else {}), "retained": retained, "target": target, "weights": weights}


@pytest.mark.parametrize("swap", [False, True], ids=["sgd-tighter", "adamw-tighter"])
def test_the_report_tabulates_the_runs_and_concludes_from_their_numbers(tmp_path, swap):
    small, large = (1e-6, 3e-6), (0.01, 0.03)  # C drift at the end of requests 1 and 2 (means 2e-6 and 0.02)
    sgd_c, adamw_c = (large, small) if swap else (small, large)
    fake_run(tmp_path, "adamw-none", [drift(None, 0.04), drift(None, 0.04)], (95.0, 20.0, 70.0))
    fake_run(tmp_path, "adamw-captions", [drift(adamw_c[0], 0.02), drift(adamw_c[1], 0.02)], (90.0, 30.0, 75.0))
    fake_run(tmp_path, "sgd-none", [drift(None, 0.04), drift(None, 0.04)], (92.0, 40.0, 80.0))
    fake_run(tmp_path, "sgd-captions", [drift(sgd_c[0], 0.02), drift(sgd_c[1], 0.02)], (91.0, 35.0, 85.0))

    text = write_gradproj_ablation(tmp_path, tmp_path / "report").read_text()
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}  # first: header
    c_cell = "0.01 / 0.02" if swap else "1e-06 / 2e-06"  # the C column: end of request 1 / mean over requests
    assert rows["sgd-captions"] == ("| sgd-captions | SGD | captions | 1 | 2 | 91.0 | 35.0 | 85.0 | 0.01 / 0.01 | "
                                    f"{c_cell} | 0.02 / 0.02 | 0.03 / 0.03 |")
    assert rows["adamw-none"] == ("| adamw-none | AdamW | none | 1 | 2 | 95.0 | 20.0 | 70.0 | 0.01 / 0.01 | – / – | "
                                  "0.04 / 0.04 | 0.03 / 0.03 |")
    assert list(rows) == ["cell", "adamw-none", "adamw-captions", "sgd-none", "sgd-captions"]
    tighter, looser = ("AdamW", "SGD") if swap else ("SGD", "AdamW")
    assert f"{tighter} keeps C's keys and values 10,000× tighter than {looser}" in text
    # retained 0.02 against C 2e-6 (10,000× more) or 0.02 (about as much), and half the unprojected run's 0.04
    sgd_coverage = "about as much as" if swap else "10,000× more than"
    assert f"Under SGD the retained prompts' states (all positions, padding included) move {sgd_coverage} C's" in text
    assert "the projection leaves this share of the retained drift: captions 50%" in text
    best = "the best GradProj RA-I after the last request"
    assert f"With AdamW, {best} (captions: 30.0, RA-C 75.0) is 10.0 points above the run without it (20.0" in text
    assert f"With SGD, {best} (captions: 35.0, RA-C 85.0) is no better than the run without it (40.0" in text


def test_no_report_without_finished_runs(tmp_path):
    assert write_gradproj_ablation(tmp_path, tmp_path / "report") is None
    run = gradproj_ablation_dir(tmp_path, "sgd-captions")
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps([{"request": 1, "targets": "A", "UA": 1.0, "RA_I": 1.0, "RA_C": 1.0}]))
    assert write_gradproj_ablation(tmp_path, tmp_path / "report") is None  # no probe record
    assert not (tmp_path / "report").exists()


def test_the_benchmark_plans_one_ablation_run_per_cell(tmp_path):
    from cuig_lightning.benchmark.ablation import CELLS, gradproj_ablation_dir, gradproj_ablation_plan

    base = ["configs/seq12.yaml", "configs/paper/evaluation.yaml"]
    runs = gradproj_ablation_plan(base, tmp_path)
    assert [r.key[1] for r in runs] == list(CELLS) and len({r.run_dir for r in runs}) == len(CELLS)
    for run in runs:  # the benchmark's base configs, then the cell's own overlay, in its own folder
        assert run.configs[:2] == base and run.configs[-1].endswith(f"{run.key[1]}.yaml")
        assert run.run_dir == gradproj_ablation_dir(tmp_path, run.key[1])
        # the report reads retention after the last request only: the job measures it there alone
        assert "--trainer.measure_retention=last_request" in run.arguments()
