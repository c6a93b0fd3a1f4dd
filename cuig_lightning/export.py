"""Use a finished request of a run: export it as a diffusers folder, or evaluate it."""

from __future__ import annotations

from pathlib import Path

from cuig_lightning.evaluation.protocol import drift
from cuig_lightning.run_folder import RunFolder


def export_request(model, run_dir: Path, config: dict, request: int | None, output: Path) -> Path:
    """Save the model after a finished request as a diffusers folder ``output`` (which must not exist)."""
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"export folder {output} already exists and is not empty")
    RunFolder(run_dir, config).load_request(model, request)
    model.diffusion.save_pretrained(output)
    return output


def evaluate_request(model, run_dir: Path, config: dict, evaluation, request: int) -> dict:
    """Metrics of a finished request (UA / RA-I / RA-C over the concepts its manifest records as erased so
    far, drift), or with ``request == 0`` the base model's style/object accuracy over the full grid."""
    if request == 0:
        return {"request": 0, **evaluation.base_accuracy(model.diffusion, run_dir / "base_samples.png")}
    manifest = RunFolder(run_dir, config).load_request(model, request)
    erased, domain = manifest["erased"], manifest["request"][-1]["domain"]
    result = evaluation.evaluate(model.diffusion, erased, domain)
    return {"request": manifest["index"], "erased": erased, **result, **drift(model.snapshot(), model.base_weights)}
