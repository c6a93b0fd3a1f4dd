"""Export the model after a finished request as a diffusers folder."""

from __future__ import annotations

from pathlib import Path

from cuig_lightning.checkpoints import DELTA, CheckpointError, load_tensors, read_manifest
from cuig_lightning.continual import RunFolder, finished_requests


def export_request(model, run_dir: Path, config_text: str, request: int | None, output: Path) -> Path:
    """Apply request ``request``'s verified weights to ``model`` and save all its parts under ``output``."""
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"export folder {output} already exists and is not empty")
    run = RunFolder(run_dir, config_text)
    run.check_owner()
    done = finished_requests(run_dir)
    if not done:
        raise CheckpointError(f"no finished request in {run_dir}")
    if request is None:
        folder = done[-1]
    else:
        matches = [d for d in done if int(d.name.split("-")[0]) == request]
        if not matches:
            raise CheckpointError(f"request {request} is not finished in {run_dir} (finished: {len(done)})")
        folder = matches[0]
    read_manifest(folder, verify=True)
    model.load_trainable(load_tensors(folder / DELTA))
    model.diffusion.save_pretrained(output)
    return output
