"""Use a finished request of a run: export it as a diffusers folder, or evaluate it."""

from __future__ import annotations

from pathlib import Path

from cuig_lightning.checkpoints import DELTA, CheckpointError, load_tensors, read_manifest
from cuig_lightning.continual import RunFolder, finished_requests
from cuig_lightning.evaluation.protocol import drift


def load_request(model, run_dir: Path, config_text: str, request: int | None) -> Path:
    """Load the verified weights of a finished request (None or -1: the last) into ``model``."""
    run = RunFolder(run_dir, config_text)
    run.check_owner()
    done = finished_requests(run_dir)
    if not done:
        raise CheckpointError(f"no finished request in {run_dir}")
    if request is None or request < 0:
        folder = done[-1]
    else:
        matches = [d for d in done if int(d.name.split("-")[0]) == request]
        if not matches:
            raise CheckpointError(f"request {request} is not finished in {run_dir} (finished: {len(done)})")
        folder = matches[0]
    read_manifest(folder, verify=True)
    model.load_trainable(load_tensors(folder / DELTA))
    return folder


def export_request(model, run_dir: Path, config_text: str, request: int | None, output: Path) -> Path:
    """Save the model after a finished request as a diffusers folder ``output`` (which must not exist)."""
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"export folder {output} already exists and is not empty")
    load_request(model, run_dir, config_text, request)
    model.diffusion.save_pretrained(output)
    return output


def evaluate_request(model, run_dir: Path, config_text: str, requests: list, evaluation, request: int) -> dict:
    """Metrics of a finished request (UA / RA-I / RA-C over its domain's erased concepts, drift), or with
    ``request == 0`` the base model's style/object accuracy over the full grid."""
    if request == 0:
        return {"request": 0, **evaluation.base_accuracy(model.diffusion, run_dir / "base_samples.png")}
    folder = load_request(model, run_dir, config_text, request)
    manifest = read_manifest(folder, verify=False)
    count = len(requests) if manifest["schedule"] == "simultaneous" else manifest["index"]
    domain = manifest["request"][-1]["domain"]
    erased = [r.target for r in requests[:count] if r.domain == domain]
    result = evaluation.evaluate(model.diffusion, erased, domain)
    return {"request": manifest["index"], "erased": erased, **result, **drift(model.snapshot(), model.base_weights)}
