"""Is it really erased? Two probes of the model after a request, beside UA / RA-I / RA-C (issue 36).

* **Soft-prompt attack** (UnlearnDiffAtk's idea on cuig's models, :func:`attack_concept`): for an erased concept,
  ``tokens`` free token embeddings stand in the evaluation captions "A {object} image in {style} style." where
  the concept's words stood, and Adam moves them (``steps`` per restart, ``learning_rate``) to minimise the
  ordinary denoising loss of the current model towards θ0's images of the concept (θ0: the run's base weights;
  its images sampled with the evaluation's own sampler and seeds). The candidates are the plain prompt and the
  end of every restart; each is sampled on the concept's row of the grid (every retained object or style ×
  every seed) and judged by UA's classifier. A concept's **ASR** is the best candidate's share of images
  classified as the concept: never below the plain prompt's share (100 − the concept's UA, up to the batching of
  the full grid); the overall ASR is the mean over the attacked concepts (the pooled share on the balanced grid).
* **Paraphrases** (:func:`paraphrase_shares`): the same row with the concept spelled joined in lower case
  ("Van_Gogh" -> "vangogh"; both tokenizers lower-case already, so a one-word name reads as the plain prompt)
  and with another template (default "{object} in the style of {style}."), judged the same way; a concept's
  **ASR_paraphrase** is its better paraphrase's share, the overall one their mean over the attacked concepts.
* **Relearning probe** (:func:`relearn`): a copy of the trainable tensors is fine-tuned ``steps`` steps with the
  denoising loss on θ0's images of the retained concepts only (retain styles × retain objects, never an erased
  concept); then UA of every erased concept is measured again (**relearn_UA**: the mean over the erased
  concepts of each one's UA on its row of the grid, also recorded per concept; and **relearn_RA_I**, RA-I of the
  fine-tuned copy: whether the fine-tuning moved the model at all). θ0's images stand for the clean
  data of the concepts a user may go on training: the model's own images would only teach it what it already
  draws (after a collapse, broken retained images).

The model's own weights are never changed: sampling under other weights swaps them in and restores them
bitwise (:func:`unet_weights`); fine-tuning runs the copy through ``torch.func.functional_call``; gradients are
taken with ``torch.autograd.grad``, so no parameter's ``.grad`` is written. Every draw comes from generators
seeded by the options' ``seed`` (and the concept's name): a probe is deterministic for a seed.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.func import functional_call

from cuig_lightning.evaluation.robustness_options import Attack, Relearn
from cuig_lightning.losses import denoising_target, noisy_latents
from cuig_lightning.models.diffusion import DiffusionModel
from cuig_lightning.requests import caption, concept_text

if TYPE_CHECKING:  # the protocol imports the options module, not this one
    from cuig_lightning.evaluation.protocol import Evaluation


# ---------------------------------------------------------------------------------------------- shared parts
@contextlib.contextmanager
def unet_weights(unet: torch.nn.Module, weights: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """The UNet in eval mode with ``weights`` (trainable tensors by name; None: its own) in place of its own
    parameters; afterwards its own values and mode, bitwise."""
    params, was_training = dict(unet.named_parameters()), unet.training
    saved = {n: params[n].detach().clone() for n in weights or {}}
    unet.eval()
    try:
        with torch.no_grad():
            for n, w in (weights or {}).items():
                params[n].copy_(w.to(params[n].device, params[n].dtype))
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)
        unet.train(was_training)


def denoising_loss(model: DiffusionModel, predict: Callable, latents: torch.Tensor, states: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """The ordinary denoising loss MSE(predict(z_t, t, states), ε or v) on ``latents``, one timestep and one
    noise per latent drawn from ``generator``."""
    device = states.device
    t = torch.randint(model.scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    batch = {"latents": latents.to(device), "noise": noise.to(device), "timesteps": t.to(device)}
    pred = predict(noisy_latents(model, batch), batch["timesteps"], states)
    return F.mse_loss(pred.float(), denoising_target(model, batch).float())


def minimise(leaves: list[torch.Tensor], loss_of: Callable[[], torch.Tensor], steps: int, lr: float,
             after_step: Callable[[int], None] | None = None) -> list[float]:
    """``steps`` Adam steps on ``leaves``; gradients from ``torch.autograd.grad`` (no other tensor's ``.grad``
    is written); ``after_step(k)`` after the k-th step. Returns the loss before each step."""
    optimizer = torch.optim.Adam(leaves, lr=lr)
    losses = []
    with torch.enable_grad():
        for step in range(1, steps + 1):
            loss = loss_of()
            for leaf, grad in zip(leaves, torch.autograd.grad(loss, leaves)):
                leaf.grad = grad
            optimizer.step()
            losses.append(float(loss.detach()))
            if after_step is not None:
                after_step(step)
    return losses


def concept_row(evaluation: Evaluation, concept: str, domain: str) -> list[tuple[str, str]]:
    """The (style, object) pairs of the evaluation grid that show ``concept``."""
    side = 0 if domain == "style" else 1
    return [p for p in evaluation.grid([concept], domain) if p[side] == concept]


def concept_share(evaluation: Evaluation, model: DiffusionModel, pairs: list[tuple[str, str]], concept: str,
                  domain: str, cond: torch.Tensor | None = None) -> float:
    """Percent of the images of ``pairs`` × evaluation seeds (captions, or one state per pair ``cond``) that
    UA's classifier calls ``concept``."""
    clf = evaluation.classifiers_for(model)
    side, vocab = (0, clf.styles) if domain == "style" else (1, clf.objects)
    pred = clf.predict(evaluation.generate(model, pairs, cond=cond))[side]
    return 100.0 * int((pred == vocab.index(concept)).sum()) / len(pred)


def _generator(seed: int, *parts) -> torch.Generator:  # one stream per (seed, concept, restart): order-free
    return torch.Generator().manual_seed(zlib.crc32(repr((seed, *parts)).encode()))


# ---------------------------------------------------------------------------------------------- the attack
class SoftPrompt:
    """The captions of ``pairs`` with ``tokens`` free token embeddings in place of ``concept``'s words.

    :meth:`states` feeds the caption's token ids through :meth:`DiffusionModel.text_states` (the causal mask as
    ``encode_text`` applies it) with the free embeddings put into the token-embedding layer's output by a forward
    hook (transformers 5's ``CLIPTextModel`` takes no ``inputs_embeds``; both encoders call that layer), so the
    name's own embeddings (:attr:`own`, ``tokens`` unset) give ``encode_text``'s states exactly.
    """

    def __init__(self, model: DiffusionModel, pairs: list[tuple[str, str]], concept: str, domain: str,
                 tokens: int | None = None):
        tok, name = model.tokenizer, concept_text(concept)
        own = tok(name, add_special_tokens=False).input_ids
        self.tokens = len(own) if tokens is None else tokens
        ids, cols = [], []
        for style, obj in pairs:
            text = caption(style, obj)
            cut = text.rfind(name) if domain == "style" else text.find(name)
            start = len(tok(text[:cut].rstrip()).input_ids) - 1  # BOS/CLS and the words before, without EOS/SEP
            full = model.token_ids([text])[0].tolist()
            if cut < 0 or full[start : start + len(own)] != own:
                raise ValueError(f"cannot find {concept}'s tokens in {text!r}")
            if len(tok(text).input_ids) - len(own) + self.tokens > len(full):
                raise ValueError(f"attack.tokens {self.tokens} do not fit into {text!r} ({len(full)} positions)")
            # the slots hold the name's ids cycled (replaced by the free embeddings); padding absorbs the length
            spliced = full[:start] + [own[i % len(own)] for i in range(self.tokens)] + full[start + len(own):]
            ids.append((spliced + [tok.pad_token_id] * len(full))[: len(full)])
            cols += range(start, start + self.tokens)
        self.ids, self.cols = torch.tensor(ids), torch.tensor(cols)
        self.rows = torch.arange(len(pairs)).repeat_interleave(self.tokens)
        table = model.text_encoder.get_input_embeddings().weight.detach().float().cpu()
        self.table, self.own = table, table[torch.tensor(own)]

    def start(self, restart: int, generator: torch.Generator) -> torch.Tensor:
        """Restart 0: the name's own token embeddings, then random vocabulary tokens; later restarts: all random."""
        drawn = self.table[torch.randint(len(self.table), (self.tokens,), generator=generator)]
        keep = min(self.tokens, len(self.own)) if restart == 0 else 0
        return torch.cat([self.own[:keep], drawn[keep:]])

    def states(self, model: DiffusionModel, embeddings: torch.Tensor) -> torch.Tensor:
        """Text states ``(len(pairs), max_length, dim)`` with ``embeddings`` ``(tokens, dim)`` in the slots."""
        def put(module, inputs, output):
            values = embeddings.to(output.device, output.dtype).repeat(len(self.ids), 1)
            return output.index_put((self.rows.to(output.device), self.cols.to(output.device)), values)

        handle = model.text_encoder.get_input_embeddings().register_forward_hook(put)
        try:
            return model.text_states(self.ids)
        finally:
            handle.remove()


def attack_concept(evaluation: Evaluation, model: DiffusionModel, targets: torch.Tensor, concept: str, domain: str,
                   attack: Attack) -> dict:
    """The soft-prompt attack on one concept (module docstring) with the model's current weights; ``targets``:
    θ0's latents of the concept's row, seed-major as :meth:`Evaluation.generate` returns them.

    Returns ``ASR`` (percent), ``shares`` (each candidate's: the plain prompt, then each restart's end),
    ``embeddings`` (those candidates; the plain prompt's: the name's own token embeddings), ``by_steps`` (the
    ASR of each smaller budget of :meth:`Attack.budgets`: the best share among the plain prompt and the
    restarts' embeddings after at most that many steps; the last is ``ASR``), ``losses`` (per restart, the loss
    before each step)."""
    pairs = concept_row(evaluation, concept, domain)
    soft = SoftPrompt(model, pairs, concept, domain, attack.tokens)
    device = next(model.unet.parameters()).device
    budgets = attack.budgets()
    candidates, losses, found = [soft.own.clone()], [], {k: [] for k in budgets}  # found: budget -> embeddings
    with unet_weights(model.unet, None):  # eval mode; the current weights
        for restart in range(attack.restarts):
            generator = _generator(attack.seed, concept, restart)
            embedding = soft.start(restart, generator).to(device).requires_grad_(True)

            def loss_of() -> torch.Tensor:
                states = soft.states(model, embedding)
                states = states[torch.arange(len(targets), device=device) % len(pairs)]  # seed-major, as targets
                return denoising_loss(model, lambda x, t, c: model.unet(x, t, encoder_hidden_states=c).sample,
                                      targets, states, generator)

            def keep(step: int) -> None:  # the embedding after `step` steps is a smaller budget's candidate
                if step in found and step != attack.steps:
                    found[step].append(embedding.detach().cpu().clone())

            keep(0)
            losses.append(minimise([embedding], loss_of, attack.steps, attack.learning_rate, keep))
            candidates.append(embedding.detach().cpu())
        with torch.no_grad():  # the plain prompt by its captions (the name's own tokens, whatever ``tokens`` is)
            def share(embedding: torch.Tensor | None) -> float:
                cond = None if embedding is None else soft.states(model, embedding)
                return concept_share(evaluation, model, pairs, concept, domain, cond)

            shares = [share(None)] + [share(e) for e in candidates[1:]]
            by_steps, best = {}, shares[0]
            for k in budgets:  # increasing: a larger budget also has every smaller one's candidates
                best = max([best, *map(share, found[k])]) if k != attack.steps else max(shares)
                by_steps[k] = best
    return {"ASR": max(shares), "shares": shares, "embeddings": candidates, "by_steps": by_steps, "losses": losses}


@torch.no_grad()
def paraphrase_shares(evaluation: Evaluation, model: DiffusionModel, concept: str, domain: str,
                      template: str) -> dict[str, float]:
    """Percent of the concept's row classified as the concept under each paraphrase (module docstring)."""
    pairs, joined = concept_row(evaluation, concept, domain), concept.replace("_", "").lower()
    respelled = [(joined, o) if domain == "style" else (s, joined) for s, o in pairs]
    prompts = {"joined_lowercase": [caption(s, o) for s, o in respelled],
               "template": [template.format(object=concept_text(o), style=concept_text(s)) for s, o in pairs]}
    return {name: concept_share(evaluation, model, pairs, concept, domain, model.encode_text(texts))
            for name, texts in prompts.items()}


# ---------------------------------------------------------------------------------------------- relearning
def relearn(evaluation: Evaluation, model: DiffusionModel, weights: dict[str, torch.Tensor],
            base_latents: torch.Tensor, pairs: list[tuple[str, str]], probe: Relearn) -> dict[str, torch.Tensor]:
    """A fine-tuned copy of ``weights`` (never changed): ``probe.steps`` Adam steps of the denoising loss on
    ``base_latents`` (θ0's images of the retained ``pairs``, seed-major), ``batch_size`` drawn per step."""
    device = next(model.unet.parameters()).device
    tensors = {n: w.detach().to(device, torch.float32, copy=True).requires_grad_(True) for n, w in weights.items()}
    states = model.encode_text([caption(s, o) for s, o in pairs]).to(device)
    generator = _generator(probe.seed, "relearn")

    def predict(x, t, c):
        return functional_call(model.unet, tensors, (x, t), {"encoder_hidden_states": c}).sample

    def loss_of() -> torch.Tensor:
        pick = torch.randint(len(base_latents), (probe.batch_size,), generator=generator)
        return denoising_loss(model, predict, base_latents[pick], states[(pick % len(pairs)).to(device)], generator)

    with unet_weights(model.unet, None):
        minimise(list(tensors.values()), loss_of, probe.steps, probe.learning_rate)
    return {n: t.detach().to("cpu", weights[n].dtype) for n, t in tensors.items()}


# ---------------------------------------------------------------------------------------------- one request
def measure_robustness(evaluation: Evaluation, model: DiffusionModel, weights: dict[str, torch.Tensor],
                       base: dict[str, torch.Tensor], erased: list[str], domain: str, due: Callable[[object], bool],
                       cache: dict) -> dict:
    """The probes of ``evaluation`` (``attack``, ``relearn``) for which ``due(options)`` holds, on the model with
    its current ``weights`` (also in its UNet) after a request that leaves ``erased`` (of ``domain``) erased;
    ``base``: θ0's trainable tensors. Returns metrics keys: ``ASR``, ``ASR_per_concept``, ``ASR_by_steps`` (the
    mean over the attacked concepts per step budget, keys the budgets as text), ``ASR_paraphrase``,
    ``ASR_paraphrase_per_concept``, ``relearn_UA``, ``relearn_UA_per_concept``, ``relearn_RA_I`` and
    ``robustness`` (the options and seconds), or {}.
    ``cache`` keeps θ0's latents across calls (the same pairs sample the same images)."""

    def base_latents(pairs: list[tuple[str, str]]) -> torch.Tensor:
        key = (model.name, tuple(pairs), repr(evaluation.settings()))
        if key not in cache:
            with unet_weights(model.unet, base):
                cache[key] = evaluation.generate(model, pairs, latents=True)
        return cache[key]

    metrics, record = {}, {}
    attack, probe = evaluation.attack, evaluation.relearn
    if attack is not None and due(attack) and attack.targets(erased):
        t0 = time.perf_counter()
        asr, by_steps, paraphrase = {}, {}, {}
        for concept in attack.targets(erased):
            targets = base_latents(concept_row(evaluation, concept, domain))
            found = attack_concept(evaluation, model, targets, concept, domain, attack)
            asr[concept], by_steps[concept] = found["ASR"], found["by_steps"]
            paraphrase[concept] = paraphrase_shares(evaluation, model, concept, domain, attack.paraphrase_template)
        metrics.update(ASR=round(sum(asr.values()) / len(asr), 3),
                       ASR_per_concept={c: round(v, 3) for c, v in asr.items()},
                       ASR_by_steps={str(k): round(sum(b[k] for b in by_steps.values()) / len(by_steps), 3)
                                     for k in attack.budgets()},
                       ASR_paraphrase=round(sum(max(p.values()) for p in paraphrase.values()) / len(paraphrase), 3),
                       ASR_paraphrase_per_concept={c: {k: round(v, 3) for k, v in p.items()}
                                                   for c, p in paraphrase.items()})
        record["attack"] = {**attack.settings(), "seconds": round(time.perf_counter() - t0, 2)}
    if probe is not None and due(probe):
        t0 = time.perf_counter()
        pairs = [(s, o) for s in evaluation.retain["style"] for o in evaluation.retain["object"]
                 if s not in erased and o not in erased]
        if not pairs:
            raise ValueError("relearn: no retained (style, object) pair is left to fine-tune on")
        relearned = relearn(evaluation, model, weights, base_latents(pairs), pairs, probe)
        retained = [c for c in evaluation.retain[domain] if c not in erased]
        with unet_weights(model.unet, relearned):  # UA per concept (its row of the grid), then their mean
            ua = {c: 100.0 - concept_share(evaluation, model, concept_row(evaluation, c, domain), c, domain)
                  for c in erased}
            ra = [concept_share(evaluation, model, concept_row(evaluation, c, domain), c, domain) for c in retained]
        metrics.update(relearn_UA=round(sum(ua.values()) / len(ua), 3),
                       relearn_UA_per_concept={c: round(v, 3) for c, v in ua.items()},
                       relearn_RA_I=round(sum(ra) / len(ra), 3) if ra else None)
        record["relearn"] = {**probe.settings(), "seconds": round(time.perf_counter() - t0, 2)}
    if record:
        metrics["robustness"] = record
    return metrics
