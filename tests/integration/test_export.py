"""Exports load with one documented call and generate what the model generates, with the folder's own
scheduler class and no local paths; a pixel-space export also loads with plain diffusers (its ``pipeline.py``, in
a process that never imports cuig), and its model card starts with Hugging Face's YAML metadata."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml

from cuig_lightning.export import PIPELINE_FILE, TAGS, CanvasMiniPipeline, model_card, save_pipeline
from cuig_lightning.models.diffusion import DiffusionModel
from tests.helpers import run_cli, write_tiny_job

PROMPT = "A Cats image in Monet style."


def _pixel_space(tiny_sd, folder, scheduler_class=None):
    folder = shutil.copytree(tiny_sd, folder)
    shutil.rmtree(folder / "vae")  # pixel space, like Canvas-mini
    if scheduler_class:
        path = folder / "scheduler" / "scheduler_config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps(dict(config, _class_name=scheduler_class, skip_prk_steps=True)))
    return DiffusionModel.from_pretrained(folder)


def test_export_keeps_the_scheduler_class_and_config(tiny_sd, tmp_path):
    out = tmp_path / "export"
    save_pipeline(_pixel_space(tiny_sd, tmp_path / "model", "PNDMScheduler"), out)  # SD-1.5 ships PNDM
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "CanvasMiniPipeline" and index["scheduler"][1] == "PNDMScheduler"
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "PNDMScheduler" and saved["skip_prk_steps"] is True
    assert saved["clip_sample"] is False  # a key PNDM does not know, kept as the folder had it
    assert str(tmp_path) not in "".join(p.read_text() for p in out.rglob("*.json"))


def test_pixel_space_export_is_a_canvas_mini_pipeline(tiny_sd, tmp_path):
    model = _pixel_space(tiny_sd, tmp_path / "model")
    out = tmp_path / "export"
    save_pipeline(model, out)

    pipe = CanvasMiniPipeline.from_pretrained(out)
    got = pipe("A Cats image in Monet style.", num_inference_steps=3, guidance_scale=1.5, output_type="np",
               generator=torch.Generator().manual_seed(3)).images
    # the same as the model's own sampler and text encoding (DiffusionModel.encode_text / sample_cfg)
    cond, uncond = model.encode_text(["A Cats image in Monet style."]), model.encode_text([""])
    expected = model.decode(model.sample(cond, uncond, torch.Generator().manual_seed(3), steps=3, guidance=1.5))
    np.testing.assert_allclose(got, expected.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    assert len(pipe(["a", "b"], num_inference_steps=2).images) == 2


def _bert_pixel_space(tiny_sd, folder):
    """The tiny model in pixel space with a tiny BERT text encoder, as Canvas-mini (a bidirectional encoder: cuig
    encodes prompts with a causal mask)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = shutil.copytree(tiny_sd, folder)
    for part in ("vae", "text_encoder", "tokenizer"):
        shutil.rmtree(folder / part)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "_", *"abcdefghijklmnopqrstuvwxyz",
             *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=80)).save_pretrained(folder / "text_encoder")
    return folder


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory, tiny_sd, cache_dir):
    """A tiny 2-request run of the pixel-space BERT model, fitted and exported with `cuig export`."""
    work = tmp_path_factory.mktemp("export_run")
    model = _bert_pixel_space(tiny_sd, work / "model")
    assert DiffusionModel.from_pretrained(model).causal_mask
    job = write_tiny_job(work / "job.yaml", model, cache_dir, work / "run", requests=2, evaluation=False)
    assert run_cli("fit", "--config", str(job)) == 0
    assert run_cli("export", "--run_dir", str(work / "run"), "--output", str(work / "export")) == 0
    return work / "export"


def _metadata(card: str) -> dict:
    lines = card.splitlines()
    assert lines[0] == "---", "the card starts with Hugging Face's YAML metadata block"
    end = lines.index("---", 1)
    return yaml.safe_load("\n".join(lines[1:end]))


def test_model_card_starts_with_hugging_face_metadata(exported_run):
    card = (exported_run / "README.md").read_text()
    metadata = _metadata(card)
    assert metadata["library_name"] == "diffusers" and metadata["pipeline_tag"] == "text-to-image"
    assert metadata["base_model"] == "model"  # the model folder's name, no local path
    assert set(TAGS) <= set(metadata["tags"]) and {"text-to-image", "concept-unlearning"} <= set(metadata["tags"])
    assert metadata["erased_concepts"] == ["Abstractionism", "Byzantine"]
    body = card.split("---\n", 2)[2]  # then the card as before
    assert body.lstrip().startswith("# cuig export: request 2 of 2")
    assert "1. Abstractionism (style), 2. Byzantine (style)" in body
    assert f"custom_pipeline='export/{PIPELINE_FILE}', trust_remote_code=True" in body
    assert str(exported_run.parent) not in card


def test_card_metadata_names_every_erased_concept_in_order():
    job = {"config": {"model": {"model_path": "/somewhere/canvas-mini"}, "trainer": {}}}
    manifests = [{"index": 1, "schedule": "simultaneous",
                  "request": [{"target": "Van_Gogh", "domain": "style"}, {"target": "Dogs: big", "domain": "object"}]},
                 {"index": 2, "schedule": "simultaneous", "request": [{"target": "No", "domain": "style"}]}]
    metadata = _metadata(model_card(job, manifests, "pipe = ..."))
    assert metadata["erased_concepts"] == ["Van_Gogh", "Dogs: big", "No"]  # strings, whatever YAML makes of them
    assert metadata["base_model"] == "canvas-mini"



def test_an_export_of_bf16_frozen_parts_is_one_dtype_and_generates(tiny_sd, tmp_path):
    """frozen_dtype bfloat16 keeps the text encoder and VAE in bf16: the export stores every part in the UNet's
    dtype (a pipeline of fp32 UNet and bf16 text encoder fails at its first step), the model keeps its dtypes."""
    from diffusers import StableDiffusionPipeline

    model = DiffusionModel.from_pretrained(tiny_sd)
    model.text_encoder.to(torch.bfloat16)
    model.vae.to(torch.bfloat16)
    save_pipeline(model, tmp_path / "export")
    assert model.text_encoder.dtype == model.vae.dtype == torch.bfloat16
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "export", local_files_only=True)
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {torch.float32}
    image = pipe(PROMPT, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()

LOAD = textwrap.dedent("""
    import sys
    for name in ("cuig_lightning", "callbacks", "tests"):
        sys.modules[name] = None  # any import of cuig fails: the export's pipeline.py must not need it
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    prompt, out, folders = sys.argv[1], sys.argv[2], sys.argv[3:]
    images = {}
    for i, folder in enumerate(folders):
        pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=f"{folder}/pipeline.py",
                                                 trust_remote_code=True)
        assert type(pipe).__name__ == "CanvasMiniPipeline" and type(pipe).__module__.startswith("diffusers_modules")
        images[str(i)] = pipe(prompt, num_inference_steps=3, guidance_scale=1.5, output_type="np",
                              generator=torch.Generator().manual_seed(3)).images
        pil = pipe(prompt, num_inference_steps=2).images[0]  # the default output: a PIL image
        assert pil.size == images[str(i)].shape[1:3], pil.size
    # the folder's own file found by name, as diffusers documents for a local folder
    named = DiffusionPipeline.from_pretrained(folders[0], custom_pipeline="pipeline", trust_remote_code=True)
    images["named"] = named(prompt, num_inference_steps=3, guidance_scale=1.5, output_type="np",
                            generator=torch.Generator().manual_seed(3)).images
    assert all(sys.modules[name] is None for name in ("cuig_lightning", "callbacks", "tests"))
    assert not [m for m in sys.modules if m.startswith(("cuig_lightning.", "callbacks."))]
    np.savez(out, **images)
""")


def test_pixel_space_export_loads_with_plain_diffusers(exported_run, tiny_sd, tmp_path):
    clip = tmp_path / "clip_export"  # a CLIP text encoder: no causal mask (CLIP is causal itself)
    save_pipeline(_pixel_space(tiny_sd, tmp_path / "model"), clip)
    folders = [exported_run, clip]
    for folder in folders:
        source = (folder / PIPELINE_FILE).read_text()
        assert not re.search(r"^\s*(from|import)\s+(cuig_lightning|callbacks)\b", source, re.MULTILINE)
    # a fresh process with a clean environment (no PYTHONPATH, its own HF cache), outside the repository
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path / "home"),
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    (tmp_path / "load.py").write_text(LOAD)
    result = subprocess.run([sys.executable, str(tmp_path / "load.py"), PROMPT, str(tmp_path / "images.npz"),
                             *map(str, folders)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    got = np.load(tmp_path / "images.npz")
    # the same images as cuig's CanvasMiniPipeline for the same prompt and generator
    for key, folder in (("0", exported_run), ("named", exported_run), ("1", clip)):
        expected = CanvasMiniPipeline.from_pretrained(folder)(
            PROMPT, num_inference_steps=3, guidance_scale=1.5, output_type="np",
            generator=torch.Generator().manual_seed(3)).images
        assert got[key].shape == expected.shape == (1, 8, 8, 4)
        np.testing.assert_allclose(got[key], expected, atol=1e-6)
    assert not np.allclose(got["0"], got["1"])  # two different models


def test_stable_diffusion_export_has_no_pipeline_file(tiny_sd, tmp_path):
    out = tmp_path / "export"
    save_pipeline(DiffusionModel.from_pretrained(tiny_sd), out)  # StableDiffusionPipeline: diffusers' own class
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert not (out / PIPELINE_FILE).exists()
