"""Generic, style-less captions: the text GradProj protects when it erases a style (``source: captions``).

The paper's code builds C for its style table from its ~200 generic ConAbl anchor captions (LAION painting
captions); Canvas-mini knows only shapes, so :func:`generic_captions` writes its ~200 from the world's objects
and a fixed list of neutral templates. SD-1.5 users give their own list or file (:func:`read_captions`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from cuig_lightning.requests import concept_text

#: Neutral caption templates: article, framing, count, size, position and pose, never a style. No word of
#: them may be a word or a wordpiece of a Canvas-mini style name (tests/unit/test_gradproj_captions.py checks
#: this against configs/seq12.yaml with the real tokenizer), hence no "on" (On_Fire), "art", "drawing",
#: "lines", "color", colour names (Red_Blue_Ink, Greenfield) or words ending in "-ing".
NEUTRAL_TEMPLATES: tuple[str, ...] = (
    "A {} image.",
    "An image of a {}.",
    "A picture of a {}.",
    "A photo of a {}.",
    "A {}.",
    "A single {}.",
    "Two {} shapes.",
    "Three small {} shapes.",
    "A small {}.",
    "A large {}.",
    "A {} in the middle.",
    "A {} near the top.",
    "A {} at the bottom left.",
    "A tilted {}.",
    "A plain {} image.",
    "A simple picture of one {}.",
    "One {} and nothing else.",
)


def generic_captions(objects: Sequence[str], templates: Sequence[str] = NEUTRAL_TEMPLATES) -> list[str]:
    """Every template filled with every object (underscores read as spaces), template by template: the
    caption set of GradProj's ``caption_set: generic``. Deterministic; 17 templates x Canvas-mini's 20
    objects = 340 captions (204 with the 12 shapes of the world before issue 34), none naming a style."""
    return [template.format(concept_text(o)) for template in templates for o in objects]


def read_captions(path: str | Path) -> list[str]:
    """One caption per line of a text file; blank lines and lines starting with ``#`` are skipped."""
    lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def names_concept(caption: str, concept: str) -> bool:
    """Whether ``caption`` contains the concept's words as a whole phrase (case-insensitive): ``Van_Gogh`` in
    "A Van Gogh sketch", not ``Ring`` in "A string"."""
    phrase = r"\s+".join(re.escape(w) for w in concept_text(concept).split())
    return re.search(rf"(?<!\w){phrase}(?!\w)", caption, flags=re.IGNORECASE) is not None
