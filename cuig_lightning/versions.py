"""The library versions a run was made with (recorded in ``job.json`` and exported model cards)."""

from __future__ import annotations

import platform
from importlib import metadata

_PACKAGES = ("cuig", "torch", "lightning", "diffusers", "transformers", "jsonargparse", "safetensors", "peft")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
