"""Shared fixtures: a tiny random-init SD-shaped model folder and a config writer (helpers and fakes: tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The test models are tiny: one thread is as fast as two and immune to OpenMP spin-waiting on a busy machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)

STYLES = ["Van_Gogh", "Picasso", "Monet", "Ukiyoe"]
OBJECTS = ["Dogs", "Cats", "Animals"]


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from cuig_lightning.models.tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "model")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_config(tmp_path, tiny_sd, cache_dir):
    """Write a small job config; keyword overrides replace top-level sections' keys."""

    def make(name: str = "job.yaml", requests=None, trainer=None, model=None, data=None, run_dir=None) -> Path:
        config = {
            "seed_everything": 42,
            "trainer": {
                "run_dir": str(run_dir or tmp_path / "run"),
                "schedule": "sequential",
                "requests": requests if requests is not None else [
                    {"target": "Van_Gogh", "domain": "style"},
                    {"target": "Picasso", "domain": "style"},
                    {"target": "Dogs", "domain": "object", "anchor": "Animals"},
                ],
                "max_steps": 4,
                "checkpoint_every": 2,
                "accelerator": "cpu",
                "devices": 1,
                "gradient_clip_val": 1.0,
                "enable_progress_bar": False,
                "enable_model_summary": False,
                **(trainer or {}),
            },
            "model": {"model_path": str(tiny_sd), "learning_rate": 1e-3, **(model or {})},
            "data": {
                "images_per_prompt": 1,
                "batch_size": 2,
                "sample_steps": 2,
                "cache_dir": str(cache_dir),
                "vocabulary": {"style": STYLES, "object": OBJECTS},
                **(data or {}),
            },
        }
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    return make
