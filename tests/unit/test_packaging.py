"""The Docker image and the dependency floors agree: the base image's torch meets every floor the
dependencies set (transformers 5 silently disables PyTorch < 2.6, so an image below it loads no text encoder)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def dockerfile_torch(text: str) -> Version:
    """The torch version of a ``FROM pytorch/pytorch:<torch>-cuda...`` base image."""
    match = re.search(r"^FROM\s+(?:\S+/)?pytorch/pytorch:(\d+\.\d+(?:\.\d+)?)-\S*", text, re.MULTILINE)
    assert match, "the Dockerfile's base image is not a pytorch/pytorch:<version>-... tag"
    return Version(match.group(1))


def torch_floor(requirements: list[str]) -> Version:
    """The highest ``torch>=X`` lower bound among requirement strings (any extra)."""
    floors = [Version(spec.version) for r in map(Requirement, requirements) if r.name == "torch"
              for spec in r.specifier if spec.operator in (">=", "==", "~=")]
    return max(floors, default=Version("0"))


def project_dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_dockerfile_torch_parsing_sees_the_tag():
    assert dockerfile_torch("FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime\n") == Version("2.5.1")
    assert torch_floor(["torch>=2.6", "numpy", 'torch>=2.7; extra == "x"']) == Version("2.7")


def test_the_docker_base_image_meets_the_project_torch_floor():
    image = dockerfile_torch((ROOT / "Dockerfile").read_text())
    floor = torch_floor(project_dependencies())
    assert image >= floor, f"Dockerfile base has torch {image}, pyproject.toml needs >= {floor}"


def test_the_project_torch_floor_covers_what_its_libraries_need():
    # The installed transformers / diffusers declare their own torch floor (under an extra); the project's
    # floor, and so the image, must not be below it.
    floor = torch_floor(project_dependencies())
    for lib in ("transformers", "diffusers", "lightning", "peft", "torchmetrics"):
        needed = torch_floor([r for r in metadata.requires(lib) or [] if not _test_only(r)])
        assert floor >= needed, f"{lib} {metadata.version(lib)} needs torch >= {needed}; pyproject.toml says {floor}"


def _test_only(requirement: str) -> bool:
    """Requirements of a library's own test / dev / typing extras (pins like torch==2.8.0 for its type checks)."""
    marker = Requirement(requirement).marker
    return marker is not None and any(f'extra == "{e}"' in str(marker) for e in ("test", "dev", "typing", "all", "docs"))


def test_the_sbatch_example_runs_a_command_line_cuig_accepts(capsys):
    """The multi-node example's ``cuig fit`` line (continuations joined, SLURM variables filled in, the image's
    /opt/cuig paths mapped to this checkout) parses, with the DDP settings Lightning needs."""
    import shlex

    import pytest

    from cuig_lightning.cli import main

    text = (ROOT / "configs" / "slurm" / "multinode_ddp.sbatch").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("srun") and " cuig fit " in ln)
    line = (line.replace('"$SLURM_JOB_NUM_NODES"', "2").replace('"$SLURM_NTASKS_PER_NODE"', "4")
            .replace("/opt/cuig/", f"{ROOT}/"))
    args = shlex.split(line)
    args = args[args.index("cuig") + 1:]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "strategy: ddp" in printed and "num_nodes: 2" in printed and "classifier_kind: unlearncanvas" in printed
