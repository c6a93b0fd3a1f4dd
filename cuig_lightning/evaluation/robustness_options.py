"""The robustness probes' options (``trainer.evaluation.attack`` / ``relearn``; ``cuig evaluate --attack`` /
``--relearn``): their budgets, checked once with one-line errors, and when they run. The probes themselves:
:mod:`cuig_lightning.evaluation.robustness`."""

from __future__ import annotations


def _at_least(name: str, value, least) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= least:
        raise ValueError(f"{name} must be {'> 0' if least == 1e-12 else f'>= {least}'}, got {value!r}")


def _every(name: str, every) -> int | list[int]:
    """``every``: a positive int, or a non-empty list of request numbers (>= 1)."""
    if isinstance(every, (list, tuple)):
        if not every:
            raise ValueError(f"{name} must name at least one request, got []")
        for n in every:
            _at_least(name, n, 1)
        return sorted(set(every))
    _at_least(name, every, 1)
    return every


class _Probe:
    """What both probes' options share: when they run, and their settings as recorded in metrics.json."""

    every: int | list[int]

    def due(self, request: int, last: bool) -> bool:
        """Whether the probe runs after request ``request`` (1-based): every ``every``-th (a list: those
        requests), and the last."""
        return last or (request in self.every if isinstance(self.every, list) else request % self.every == 0)

    def settings(self) -> dict:
        return dict(vars(self))


class Attack(_Probe):
    """The soft-prompt attack's budget (``trainer.evaluation.attack``; ``cuig evaluate --attack``).

    Args:
        steps: Adam steps per restart (0: the candidates are the starting points).
        tokens: free token embeddings in place of the concept's words (None: as many as the name has tokens).
        restarts: restart 0 starts at the name's own token embeddings, the others at random vocabulary tokens.
        learning_rate: Adam's learning rate on the embeddings.
        seed: seed of the restarts' starts and of the loss's noise and timesteps.
        every: run after every ``every``-th request (request numbers divisible by it), or after the listed
            requests (e.g. [1, 4, 8, 12]); and after the last.
        concepts: attack only these erased concepts (None: every concept erased so far).
        paraphrase_template: the other-template paraphrase, with ``{object}`` and ``{style}``.
        budget_steps: smaller step budgets also judged on the way (each restart's embedding after that many steps
            is sampled too): ``ASR_by_steps``, how much of the attack it takes; those above ``steps`` are ignored.
    """

    def __init__(self, steps: int = 20, tokens: int | None = None, restarts: int = 1, learning_rate: float = 0.01,
                 seed: int = 0, every: int | list[int] = 1, concepts: list[str] | None = None,
                 paraphrase_template: str = "{object} in the style of {style}.", budget_steps: list[int] = [2, 5, 10]):
        for name, value, least in (("steps", steps, 0), ("restarts", restarts, 1), ("seed", seed, 0),
                                   ("learning_rate", learning_rate, 1e-12)):
            _at_least(f"attack.{name}", value, least)
        if tokens is not None:
            _at_least("attack.tokens", tokens, 1)
        if "{object}" not in paraphrase_template or "{style}" not in paraphrase_template:
            raise ValueError(f"attack.paraphrase_template needs {{object}} and {{style}}, got {paraphrase_template!r}")
        self.steps, self.tokens, self.restarts, self.learning_rate = steps, tokens, restarts, learning_rate
        self.seed, self.every = seed, _every("attack.every", every)
        self.concepts = None if concepts is None else list(concepts)
        self.paraphrase_template = paraphrase_template
        for k in budget_steps:
            _at_least("attack.budget_steps", k, 0)
        self.budget_steps = sorted(set(budget_steps))

    def budgets(self) -> list[int]:
        """The step budgets judged: the smaller ones below ``steps``, then ``steps``."""
        return [k for k in self.budget_steps if k < self.steps] + [self.steps]

    def targets(self, erased: list[str], known: list[str] | None = None) -> list[str]:
        """The concepts attacked among ``erased``; a name in :attr:`concepts` outside ``known`` (default
        ``erased``) is an error."""
        known = erased if known is None else known
        unknown = [c for c in self.concepts or [] if c not in known]
        if unknown:
            raise ValueError(f"attack.concepts: {', '.join(unknown)} not erased here "
                             f"(erased: {', '.join(known) or 'none'})")
        return [c for c in erased if self.concepts is None or c in self.concepts]


class Relearn(_Probe):
    """The relearning probe (``trainer.evaluation.relearn``; ``cuig evaluate --relearn``).

    Args:
        steps: Adam steps of fine-tuning on θ0's images of the retained concepts.
        learning_rate: Adam's learning rate on the trainable tensors.
        batch_size: images per step, drawn from retain styles × retain objects × evaluation seeds.
        seed: seed of the drawn images, noise and timesteps.
        every: run after every ``every``-th request, or after the listed requests; and after the last.
    """

    def __init__(self, steps: int = 20, learning_rate: float = 1e-4, batch_size: int = 8, seed: int = 0,
                 every: int | list[int] = 1):
        for name, value, least in (("steps", steps, 0), ("batch_size", batch_size, 1), ("seed", seed, 0),
                                   ("learning_rate", learning_rate, 1e-12)):
            _at_least(f"relearn.{name}", value, least)
        self.steps, self.learning_rate, self.batch_size, self.seed = steps, learning_rate, batch_size, seed
        self.every = _every("relearn.every", every)
