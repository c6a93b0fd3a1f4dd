"""The robustness probes' core (cuig_lightning/evaluation/robustness.py) on the tiny SD-shaped model: the soft
prompt reproduces encode_text, the attack's sanity checks, determinism, relearning on a copy, bad options.

The judge is a nearest-reference classifier over θ0's own images of the grid (a stand-in for a trained
classifier that is right about the base model): an image gets the style and object of the θ0 image nearest
to it, so θ0's plain prompts are recognised 100% of the time and a changed model's images may not be.
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, AutoTokenizer

from cuig_lightning.evaluation.protocol import Evaluation
from cuig_lightning.evaluation.robustness import (SoftPrompt, attack_concept, concept_row, concept_share,
                                                  denoising_loss, measure_robustness, relearn, unet_weights)
from cuig_lightning.evaluation.robustness_options import Attack, Relearn
from cuig_lightning.models.diffusion import DiffusionModel, trainable_names
from cuig_lightning.requests import caption

STYLES, OBJECTS = ["Van_Gogh", "Picasso", "Monet"], ["Dogs", "Cats"]


class NearestReference:
    """Classifiers (the protocol's interface) that label an image by the nearest of θ0's grid images."""

    styles, objects = STYLES, OBJECTS

    def remember(self, images: torch.Tensor, pairs: list[tuple[str, str]]) -> None:
        """θ0's images of ``pairs``, seed-major (as Evaluation.generate returns them)."""
        self.images = images.flatten(1)
        n = len(images) // len(pairs)
        self.style_of = torch.tensor([STYLES.index(s) for s, _ in pairs] * n)
        self.object_of = torch.tensor([OBJECTS.index(o) for _, o in pairs] * n)

    def predict(self, images):
        nearest = torch.cdist(images.flatten(1), self.images).argmin(1)
        return self.style_of[nearest], self.object_of[nearest]

    def prepare(self, images):
        return images

    def to(self, device):
        return self


@pytest.fixture(scope="module")
def model(tiny_sd) -> DiffusionModel:
    return DiffusionModel.from_pretrained(tiny_sd)


@pytest.fixture(scope="module")
def base(model) -> dict[str, torch.Tensor]:
    """θ0's trainable tensors (the cross-attention keys and values)."""
    params = dict(model.unet.named_parameters())
    return {n: params[n].detach().clone() for n in trainable_names(model.unet, "xattn_kv")}


@pytest.fixture(scope="module")
def changed(base) -> dict[str, torch.Tensor]:
    """θ0's keys and values moved at random: a model whose images of a concept differ from θ0's."""
    g = torch.Generator().manual_seed(5)
    return {n: w + 3 * w.std() * torch.randn(w.shape, generator=g) for n, w in base.items()}


@pytest.fixture(scope="module")
def evaluation(model) -> Evaluation:
    evaluation = Evaluation(retain_styles=["Picasso", "Monet"], retain_objects=list(OBJECTS), seeds=[188, 288],
                            sampler="ddim", steps=2, bf16=False)
    evaluation._classifiers = judge = NearestReference()  # instead of a registered kind's files
    pairs = [(s, o) for s in STYLES for o in OBJECTS]
    judge.remember(evaluation.generate(model, pairs), pairs)  # the model holds θ0 here
    return evaluation


def tiny_bert_model() -> DiffusionModel:
    """A random one-layer BERT with MiniLM's tokenizer: Canvas-mini's text side (bidirectional, causal mask)."""
    from cuig_lightning.canvas_mini.paths import text_encoder_dir

    tokenizer = AutoTokenizer.from_pretrained(text_encoder_dir(), local_files_only=True)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=80))
    return DiffusionModel(None, bert, tokenizer, None)


@pytest.mark.parametrize("encoder", ["clip", "bert"])
def test_the_names_own_token_embeddings_reproduce_encode_text(model, encoder):
    text_model = model if encoder == "clip" else tiny_bert_model()
    assert text_model.causal_mask == (encoder == "bert")
    pairs = [("Van_Gogh", o) for o in OBJECTS]
    soft = SoftPrompt(text_model, pairs, "Van_Gogh", "style")
    plain = text_model.encode_text([caption(s, o) for s, o in pairs])
    assert torch.equal(soft.states(text_model, soft.own), plain)  # bitwise: the same path as encode_text
    # other embeddings change the slots and what follows, never what precedes them (the causal mask)
    other = soft.states(text_model, torch.randn(soft.own.shape, generator=torch.Generator().manual_seed(1)))
    first = int(soft.cols[0])
    assert torch.equal(other[0, :first], plain[0, :first]) and not torch.allclose(other[0, first:], plain[0, first:])
    # a soft prompt of another length: the slots move the rest of the caption, the length stays max_length
    longer = SoftPrompt(text_model, pairs, "Van_Gogh", "style", tokens=soft.tokens + 2)
    assert longer.ids.shape == soft.ids.shape and len(longer.cols) == 2 * (soft.tokens + 2)
    assert torch.equal(longer.ids[:, first + soft.tokens + 2:][:, :3], soft.ids[:, first + soft.tokens:][:, :3])


def test_zero_budget_is_the_plain_prompt(model, evaluation, base, changed):
    """With no steps the only candidate is the plain prompt: ASR = 100 − the concept's UA, exactly."""
    pairs = concept_row(evaluation, "Picasso", "style")
    with unet_weights(model.unet, base):
        targets = evaluation.generate(model, pairs, latents=True)
    for weights in (base, changed):
        with unet_weights(model.unet, weights):
            result = attack_concept(evaluation, model, targets, "Picasso", "style", Attack(steps=0))
            ua = evaluation.unlearn_accuracy(model, ["Picasso"], "style")
        assert torch.equal(result["embeddings"][1], result["embeddings"][0])
        assert result["shares"] == [result["ASR"]] * 2 and result["ASR"] == 100.0 - ua
    assert 0 < ua < 100  # on the changed model: the equality above is not a trivial 100 == 100 or 0 == 0


def test_on_the_base_model_the_attack_finds_what_the_plain_prompt_finds(model, evaluation, base, changed):
    """θ0 is recognised on every image; an attack with a budget keeps that (ASR never under the plain prompt's),
    and on a changed model its steps lower the loss it minimises, on draws it never saw."""
    pairs = concept_row(evaluation, "Van_Gogh", "style")
    with unet_weights(model.unet, base):
        targets = evaluation.generate(model, pairs, latents=True)
        assert concept_share(evaluation, model, pairs, "Van_Gogh", "style") == 100.0
        on_base = attack_concept(evaluation, model, targets, "Van_Gogh", "style", Attack(steps=4, restarts=2))
    assert on_base["ASR"] == 100.0 and len(on_base["shares"]) == 3 and len(on_base["losses"][1]) == 4
    with unet_weights(model.unet, changed):
        found = attack_concept(evaluation, model, targets, "Van_Gogh", "style", Attack(steps=15, learning_rate=0.02))
        assert found["ASR"] == max(found["shares"]) >= found["shares"][0]
        soft = SoftPrompt(model, pairs, "Van_Gogh", "style")

        def held_out_loss(embedding):
            g = torch.Generator().manual_seed(123)
            with torch.no_grad():
                states = soft.states(model, embedding)[torch.arange(len(targets)) % len(pairs)]
                return sum(float(denoising_loss(model, lambda x, t, c: model.unet(x, t, encoder_hidden_states=c).sample,
                                                targets, states, g)) for _ in range(20))

        assert held_out_loss(found["embeddings"][1]) < held_out_loss(found["embeddings"][0])


def test_smaller_budgets_are_the_shorter_attacks(model, evaluation, base, changed):
    """ASR within 2 steps of a 4-step attack is what a 2-step attack finds (the same draws, so the same path);
    the budgets' ASR never falls and ends at the attack's."""
    pairs = concept_row(evaluation, "Van_Gogh", "style")
    with unet_weights(model.unet, base):
        targets = evaluation.generate(model, pairs, latents=True)
    with unet_weights(model.unet, changed):
        long = attack_concept(evaluation, model, targets, "Van_Gogh", "style",
                              Attack(steps=4, restarts=2, learning_rate=0.05, budget_steps=[2, 9]))
        short = attack_concept(evaluation, model, targets, "Van_Gogh", "style",
                               Attack(steps=2, restarts=2, learning_rate=0.05))
    assert list(long["by_steps"]) == [2, 4] and list(short["by_steps"]) == [2]  # 9 > steps: not judged
    assert long["by_steps"][2] == short["ASR"] and long["by_steps"][4] == long["ASR"]
    assert long["shares"][0] <= long["by_steps"][2] <= long["by_steps"][4]
    assert long["losses"][0][:2] == short["losses"][0] and long["losses"][1][:2] == short["losses"][1]


def test_the_attack_is_deterministic_for_a_seed(model, evaluation, base, changed):
    pairs = concept_row(evaluation, "Van_Gogh", "style")
    with unet_weights(model.unet, base):
        targets = evaluation.generate(model, pairs, latents=True)
    attack = Attack(steps=3, restarts=2, tokens=4)
    with unet_weights(model.unet, changed):
        runs = [attack_concept(evaluation, model, targets, "Van_Gogh", "style", a)
                for a in (attack, attack, Attack(steps=3, restarts=2, tokens=4, seed=1))]
        soft = SoftPrompt(model, pairs, "Van_Gogh", "style", tokens=4)
        images = [evaluation.generate(model, pairs, cond=soft.states(model, r["embeddings"][-1]).detach()) for r in runs[:2]]
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["embeddings"], runs[1]["embeddings"]))
    assert runs[0]["shares"] == runs[1]["shares"] and runs[0]["losses"] == runs[1]["losses"]
    assert torch.equal(images[0], images[1])
    assert not torch.equal(runs[0]["embeddings"][-1], runs[2]["embeddings"][-1])  # the seed is used


def test_relearning_fine_tunes_a_copy_deterministically(model, evaluation, base, changed):
    pairs = [(s, o) for s in ["Picasso", "Monet"] for o in OBJECTS]
    with unet_weights(model.unet, base):
        latents = evaluation.generate(model, pairs, latents=True)
    given = {n: w.clone() for n, w in changed.items()}
    with unet_weights(model.unet, changed):
        model.unet.train()  # as after a request's training: the probes' eval mode must not outlive them
        before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
        runs = [relearn(evaluation, model, changed, latents, pairs, Relearn(steps=3, learning_rate=1e-3))
                for _ in range(2)]
        after = dict(model.unet.named_parameters())
        assert all(torch.equal(after[n], w) for n, w in before.items())  # the model's own weights, bitwise
        assert all(p.grad is None for p in model.unet.parameters())
        evaluation.attack, evaluation.relearn = Attack(steps=2), Relearn(steps=2)
        try:  # both probes through the per-request entry point, then the model's weights again
            metrics = measure_robustness(evaluation, model, changed, base, ["Van_Gogh"], "style", lambda p: True, {})
        finally:
            evaluation.attack = evaluation.relearn = None
        assert all(torch.equal(after[n], w) for n, w in before.items())
        assert all(p.grad is None for p in model.unet.parameters()) and model.unet.training
    assert all(torch.equal(changed[n], given[n]) for n in given)  # the weights handed in
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in given)
    assert any(not torch.equal(runs[0][n], given[n]) for n in given)  # it did train
    assert {"ASR", "ASR_per_concept", "ASR_paraphrase", "relearn_UA", "robustness"} <= set(metrics)
    assert set(metrics["ASR_per_concept"]) == {"Van_Gogh"} and 0 <= metrics["relearn_UA"] <= 100


@pytest.mark.parametrize("options, needle", [
    (dict(steps=-1), "attack.steps must be >= 0, got -1"),
    (dict(restarts=0), "attack.restarts must be >= 1"),
    (dict(tokens=0), "attack.tokens must be >= 1"),
    (dict(learning_rate=0.0), "attack.learning_rate must be > 0"),
    (dict(every=0), "attack.every must be >= 1"),
    (dict(every=[4, -1]), "attack.every must be >= 1, got -1"),
    (dict(paraphrase_template="in the style of {style}"), "needs {object} and {style}"),
    (dict(budget_steps=[2, -5]), "attack.budget_steps must be >= 0, got -5"),
])
def test_bad_attack_options_are_one_line(options, needle):
    with pytest.raises(ValueError, match=".*") as err:
        Attack(**options)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bad_relearn_options_and_unknown_concepts_are_one_line():
    for options, needle in ((dict(steps=-2), "relearn.steps must be >= 0"), (dict(batch_size=0), "relearn.batch_size"),
                            (dict(learning_rate=-1.0), "relearn.learning_rate must be > 0")):
        with pytest.raises(ValueError, match=needle):
            Relearn(**options)
    attack = Attack(concepts=["Picasso", "Nope"])
    with pytest.raises(ValueError, match="attack.concepts: Nope not erased here"):
        attack.targets(["Van_Gogh", "Picasso"])
    assert Attack(concepts=["Picasso"]).targets(["Van_Gogh", "Picasso"]) == ["Picasso"]
    assert Attack(concepts=["Picasso"]).targets(["Van_Gogh"], known=["Van_Gogh", "Picasso"]) == []
    assert [Attack(every=4).due(n, last=n == 6) for n in range(1, 7)] == [False, False, False, True, False, True]
    assert [Relearn(every=[4, 1]).due(n, last=n == 6) for n in range(1, 7)] == [True, False, False, True, False, True]
    for every, needle in (([], "attack.every must name at least one request"), ([1, 0], "attack.every must be >= 1")):
        with pytest.raises(ValueError, match=needle):
            Attack(every=every)
