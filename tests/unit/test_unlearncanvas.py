"""UnlearnCanvas' classifiers without timm: class lists, the ViT loader against a hand-written timm forward,
bad files as one-line errors, and the classifier choice in :class:`Evaluation`."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from cuig_lightning.evaluation.protocol import Evaluation
from cuig_lightning.evaluation.unlearncanvas import OBJECTS, STYLES, UnlearnCanvasClassifiers, load_classifier
from tests.helpers import timm_vit_state, write_timm_vit

TINY = {"width": 256, "depth": 2, "patch": 4, "image_size": 16}  # 4 heads of 64, 16 patches + the class token


def timm_forward(state: dict[str, torch.Tensor], images: torch.Tensor, heads: int) -> torch.Tensor:
    """timm VisionTransformer's forward written out from its state dict (images normalized to [-1, 1])."""
    patch = state["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x], dim=1) + state["pos_embed"]
    batch, tokens, width = x.shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        p = {k[len(f"blocks.{i}."):]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (width,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        qkv = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) / math.sqrt(width // heads)).softmax(dim=-1)
        mixed = (attention @ v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + F.linear(mixed, p["attn.proj.weight"], p["attn.proj.bias"])
        h = F.layer_norm(x, (width,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"],
                         p["mlp.fc2.bias"])
    x = F.layer_norm(x, (width,), state["norm.weight"], state["norm.bias"], eps=1e-6)
    return F.linear(x[:, 0], state["head.weight"], state["head.bias"])


def test_class_lists_are_unlearncanvas_head_orders():
    assert len(STYLES) == 51 and len(OBJECTS) == 20
    assert STYLES == sorted(STYLES) and OBJECTS == sorted(OBJECTS)  # both upstream lists are alphabetical
    assert STYLES.index("Seed_Images") == 38 and STYLES[:3] == ["Abstractionism", "Artist_Sketch", "Blossom_Season"]
    assert STYLES[-1] == "Winter" and OBJECTS[0] == "Architectures" and OBJECTS[-1] == "Waterfalls"


def test_loaded_vit_equals_an_independent_timm_forward(tmp_path):
    path = write_timm_vit(tmp_path / "style50.pth", len(STYLES), **TINY)
    model = load_classifier(path, STYLES, "style")
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        got = model(images)
    expected = timm_forward(timm_vit_state(len(STYLES), **TINY), images, heads=4)
    assert got.shape == (5, 51) and expected.std() > 0.5
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_safetensors_loads_the_same(tmp_path):
    pth = load_classifier(write_timm_vit(tmp_path / "o.pth", len(OBJECTS), **TINY), OBJECTS, "object")
    st = load_classifier(write_timm_vit(tmp_path / "o.safetensors", len(OBJECTS), **TINY), OBJECTS, "object")
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(pth(images), st(images))


def test_classifiers_resize_to_their_input_and_batch(tmp_path):
    clf = UnlearnCanvasClassifiers(write_timm_vit(tmp_path / "s.pth", len(STYLES), **TINY),
                                   write_timm_vit(tmp_path / "o.pth", len(OBJECTS), seed=1, **TINY), batch_size=3)
    images = torch.rand(7, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    prepared = clf.prepare(images)
    assert prepared.shape == (7, 3, 16, 16) and torch.equal(clf.prepare(prepared), prepared)  # idempotent
    assert torch.equal(prepared * 255, (prepared * 255).round())  # 8-bit levels, as the saved images
    style, obj = clf.predict(images)
    with torch.no_grad():
        expected = timm_forward(timm_vit_state(len(STYLES), **TINY), prepared * 2 - 1, heads=4)
    assert torch.equal(style, expected.argmax(-1)) and obj.shape == (7,) and int(obj.max()) < 20
    torch.testing.assert_close(clf.style_probabilities(images), expected.softmax(-1), atol=1e-5, rtol=1e-5)


def test_classifiers_of_different_input_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="read different image sizes: style 16, object 32"):
        UnlearnCanvasClassifiers(write_timm_vit(tmp_path / "s.pth", 51), write_timm_vit(tmp_path / "o.pth", 20, image_size=32))


def _not_weights_only(path):
    torch.save({"model_state_dict": timm_vit_state(51), "args": argparse.Namespace(lr=1.0)}, path)


def _truncated(path):
    write_timm_vit(path, 51)
    path.write_bytes(path.read_bytes()[:200])


def _flat_unknown(path):
    torch.save({"state": {"weight": torch.zeros(2)}}, path)


def _extra_key(path):
    torch.save({"model_state_dict": {**timm_vit_state(51), "fc_norm.weight": torch.ones(64)}}, path)


@pytest.mark.parametrize("make, error, needle", [
    (None, FileNotFoundError, "the UnlearnCanvas style classifier .* does not exist"),
    (_not_weights_only, ValueError, "cannot be read as weights only: it pickles argparse.Namespace"),
    (_truncated, ValueError, "cannot be read as weights only"),
    (_flat_unknown, ValueError, "holds no state dict"),
    (lambda p: write_timm_vit(p, 20), ValueError, "has 20 outputs, but UnlearnCanvas has 51 style classes"),
    (lambda p: torch.save({"model_state_dict": {"head.weight": torch.zeros(51, 64)}}, p), ValueError,
     "not a timm ViT state dict: no cls_token"),
    (_extra_key, ValueError, "does not fit a timm ViT: Unexpected key.*fc_norm.weight"),
    (lambda p: write_timm_vit(p, 51, width=48), ValueError, "width 48 is not a multiple of 64"),
])
def test_bad_classifier_files_are_one_line_errors(tmp_path, make, error, needle):
    path = tmp_path / "style50.pth"
    if make is not None:
        make(path)
    with pytest.raises(error, match=needle) as err:
        load_classifier(path, STYLES, "style")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ the choice in Evaluation
@pytest.mark.parametrize("kwargs, needle", [
    ({"classifier_kind": "vit"}, "classifier_kind must be one of canvas-mini, unlearncanvas, got 'vit'"),
    ({"classifier_kind": "unlearncanvas", "style_classifier": "s.pth"}, "needs style_classifier and object_classifier"),
    ({"classifier_kind": "unlearncanvas", "style_classifier": "s.pth", "object_classifier": "o.pth",
      "classifiers": "folder"}, "classifiers names Canvas-mini classifiers"),
    ({"style_classifier": "s.pth"}, "set classifier_kind: unlearncanvas"),
])
def test_classifier_choice_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Evaluation(**kwargs)


def test_each_kind_has_its_protocol_defaults():
    canvas = Evaluation()
    assert (canvas.seeds, canvas.steps, canvas.guidance) == ([188, 288], 20, 1.5)
    unlearncanvas = Evaluation(classifier_kind="unlearncanvas", style_classifier="s.pth", object_classifier="o.pth")
    assert (unlearncanvas.seeds, unlearncanvas.steps, unlearncanvas.guidance) == ([188, 288, 588, 688, 888], 100, 9.0)
    explicit = Evaluation(classifier_kind="unlearncanvas", style_classifier="s.pth", object_classifier="o.pth",
                          seeds=[7], steps=3, guidance=2.0)
    assert (explicit.seeds, explicit.steps, explicit.guidance) == ([7], 3, 2.0)


def test_a_vocabulary_the_classifiers_do_not_cover_is_named(tmp_path):
    files = {"style_classifier": str(write_timm_vit(tmp_path / "s.pth", 51)),
             "object_classifier": str(write_timm_vit(tmp_path / "o.safetensors", 20))}
    evaluation = Evaluation(classifier_kind="unlearncanvas", retain_styles=["Monet", "Expressionism"],
                            retain_objects=["Dogs", "Trees"], **files)
    evaluation.check_vocabulary({"style": ["Van_Gogh", "Seed_Images"], "object": ["Cats"]})  # all known
    with pytest.raises(ValueError, match="the unlearncanvas object classifier has no class for Animals, Circle; "
                                         "retained and erased concepts must be among its 20 classes"):
        evaluation.check_vocabulary({"object": ["Animals", "Circle", "Animals"]})
    with pytest.raises(ValueError, match="the unlearncanvas style classifier has no class for Rembrandt"):
        evaluation.grid(["Rembrandt"], "style")
    canvas_mini = Evaluation(retain_styles=["Monet", "Expressionism", "Impressionism"], retain_objects=["Circle"])
    with pytest.raises(ValueError, match="the canvas-mini style classifier has no class for Expressionism, "
                                         "Impressionism"):
        canvas_mini.grid(["Van_Gogh"], "style")
