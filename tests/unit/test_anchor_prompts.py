"""How a request's anchor and target prompts are paired (the ConAbl / SculpMem training prompts)."""

from __future__ import annotations

import pytest

from cuig_lightning.data.anchors import PairedPrompts, UnlearningData
from cuig_lightning.requests import Request


def test_default_style_pairs_append_the_style():
    pairs = PairedPrompts(Request("Van_Gogh"), ["A Circle image.", "A Star image."], [])
    assert pairs.anchor == ["A Circle image.", "A Star image."]
    assert pairs.target == ["A Circle image in Van Gogh style.", "A Star image in Van Gogh style."]


def test_every_anchor_prompt_meets_every_style_template():
    templates = ["{prompt} in {style} style.", "In {style} style, {prompt}."]
    pairs = PairedPrompts(Request("Pop_Art"), ["A Circle image.", "A Star image."], [], templates)
    assert pairs.anchor == ["A Circle image.", "A Star image."] * 2
    assert pairs.target == ["A Circle image in Pop Art style.", "A Star image in Pop Art style.",
                            "In Pop Art style, A Circle image.", "In Pop Art style, A Star image."]


def test_object_requests_swap_the_anchor_word():
    pairs = PairedPrompts(Request("Star", domain="object", anchor="Circle"), [], ["A {} image."],
                          ["In {style} style, {prompt}."])  # style templates do not apply to objects
    assert (pairs.anchor, pairs.target) == (["A Circle image."], ["A Star image."])


def test_a_template_without_its_fields_is_refused():
    with pytest.raises(ValueError, match="style_templates"):
        UnlearningData(style_templates=["{prompt} in the style."])


@pytest.mark.parametrize("key, value", [("images_per_prompt", 0), ("sample_steps", 0), ("batch_size", 0),
                                        ("batch_size", -2), ("images_per_prompt", 1.5)])
def test_sizes_below_one_are_refused_when_the_data_module_is_made(key, value):
    with pytest.raises(ValueError, match=rf"data\.{key} must be an integer >= 1, got {value}"):
        UnlearningData(**{key: value})
    UnlearningData(**{key: 1})  # the smallest valid value is accepted
