"""Unlearning requests, the stages they are grouped into, and their validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Domain = Literal["style", "object"]
Schedule = Literal["sequential", "simultaneous", "independent"]


class RequestError(ValueError):
    """A request list that cannot be run (empty, unknown or repeated concept, ...)."""


@dataclass
class Request:
    """One concept to erase.

    Args:
        target: concept name as in the vocabulary, e.g. ``Van_Gogh`` (underscores read as spaces in prompts).
        domain: ``style`` or ``object``.
        anchor: the concept that replaces the target. Objects need one (e.g. ``Dogs`` -> ``Animals``);
            styles default to neutral prompts without any style.
        prompts: anchor prompts overriding the data module's defaults for this request.
    """

    target: str
    domain: Domain = "style"
    anchor: str | None = None
    prompts: list[str] | None = None

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in self.target)


def concept_text(name: str) -> str:
    """How a concept name reads inside a prompt: ``Van_Gogh`` -> ``Van Gogh``."""
    return name.replace("_", " ")


#: The style class of style-less images (Canvas-mini's neutral look); its caption names no style.
NEUTRAL_STYLE = "Neutral"
#: How ConAbl-style target prompts are made from neutral anchor prompts by default ({prompt} without its period).
DEFAULT_STYLE_TEMPLATES = ["{prompt} in {style} style."]


def caption(style: str | None, obj: str) -> str:
    """UnlearnCanvas prompt ``"A Cats image in Van Gogh style."``; no style (``None`` or ``Neutral``): ``"A Cats image."``."""
    if style is None or style == NEUTRAL_STYLE:
        return f"A {concept_text(obj)} image."
    return f"A {concept_text(obj)} image in {concept_text(style)} style."


@dataclass
class Stage:
    """What one ``fit`` stage erases and where it writes; handed to the module and read by callbacks.

    Attributes:
        index: 0-based position of the stage in the job.
        requests: the requests this stage erases (several only for the ``simultaneous`` schedule).
        erased_before: targets erased by earlier stages, in order.
        vocabulary: the benchmark's concepts per domain, e.g. ``{"style": [...], "object": [...]}``.
        schedule: the job's schedule.
        request_dir: folder of this stage's results (see :mod:`cuig_lightning.run_folder`).
        previous_dirs: finished request folders of the earlier stages, in order.
        erased: the concepts of this stage's domain erased once it is done (what UA is measured on; stored
            in the request's manifest).
        recorded: files callbacks recorded into ``request_dir`` (listed in its manifest).
    """

    index: int
    requests: list[Request]
    erased_before: list[str]
    vocabulary: dict[str, list[str]]
    schedule: Schedule
    request_dir: Path
    previous_dirs: list[Path] = field(default_factory=list)
    erased: list[str] = field(default_factory=list)
    recorded: list[str] = field(default_factory=list)

    @property
    def targets(self) -> list[str]:
        return [r.target for r in self.requests]

    @property
    def domain(self) -> Domain:
        return self.requests[-1].domain


def validate_requests(requests: list[Request], vocabulary: dict[str, list[str]]) -> None:
    if not requests:
        raise RequestError("the request list is empty: give at least one concept to erase")
    seen: set[str] = set()
    for i, r in enumerate(requests):
        if not r.target or not r.target.strip():
            raise RequestError(f"request {i + 1} has an empty target concept")
        if r.domain not in ("style", "object"):
            raise RequestError(f"request {i + 1} ({r.target}) has unknown domain {r.domain!r}")
        known = vocabulary.get(r.domain)
        if known is not None and r.target not in known:
            raise RequestError(
                f"unknown {r.domain} concept {r.target!r} in request {i + 1}; known: {', '.join(known)}"
            )
        if r.domain == "object" and not (r.anchor or r.prompts):
            raise RequestError(f"object request {r.target!r} needs an anchor concept (e.g. anchor: Animals)")
        if r.target in seen:
            raise RequestError(f"concept {r.target!r} is requested twice")
        seen.add(r.target)


def plan_stages(requests: list[Request], schedule: Schedule) -> list[list[Request]]:
    """Group requests into fit stages: one per request, or one for all under ``simultaneous``."""
    if schedule == "simultaneous":
        return [list(requests)]
    return [[r] for r in requests]


def erased_after(stages: list[list[Request]], index: int) -> list[str]:
    """The concepts of stage ``index``'s domain erased once it is done (the UA set of its evaluation)."""
    domain = stages[index][-1].domain
    return [r.target for reqs in stages[: index + 1] for r in reqs if r.domain == domain]
