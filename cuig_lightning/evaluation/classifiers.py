"""What the evaluation protocol asks of its classifiers (:class:`Classifiers`), and where it finds them by kind.

The protocol knows no world: a classifier kind (``trainer.evaluation.classifier_kind``) is a name that a
package registers a factory for with :func:`register_classifiers`. UnlearnCanvas' ViTs register themselves
(:mod:`cuig_lightning.evaluation.unlearncanvas`); the embedded world's judges are registered by the package
that ships them (``cuig_lightning.canvas_mini``, imported with every diffusion model, whose default model it is).
A factory is called with the :class:`~cuig_lightning.evaluation.protocol.Evaluation`'s classifier arguments, as
keywords: ``classifiers`` (a folder or ``canvas-mini``), ``style_classifier``, ``object_classifier`` (files or
None) and ``batch_size``; it uses those it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Classifiers(Protocol):
    """A style and an object classifier judging images in [0, 1] (N, 3, H, W).

    ``styles`` and ``objects`` are the class names, in the order of the predicted indices.
    """

    styles: list[str]
    objects: list[str]

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted (style, object) class indices, one each per image."""
        ...

    def style_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """The style classifier's softmax over :attr:`styles`, one row per image."""
        ...

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] as the classifiers read them (what :meth:`Evaluation.generate` returns)."""
        ...

    def to(self, device: torch.device | str) -> Classifiers:
        """The classifiers where they classify a model on ``device`` (they may stay on the CPU)."""
        ...


ClassifierFactory = Callable[..., Classifiers]

_FACTORIES: dict[str, ClassifierFactory] = {}


def register_classifiers(kind: str, factory: ClassifierFactory) -> None:
    """Make ``factory`` the maker of the ``kind`` classifiers (a later registration of the same kind replaces it)."""
    _FACTORIES[kind] = factory


def registered_kinds() -> list[str]:
    """The classifier kinds a factory is registered for."""
    return list(_FACTORIES)


def load_classifiers(kind: str, **arguments) -> Classifiers:
    """The ``kind`` classifiers, made by its registered factory from the evaluation's classifier ``arguments``."""
    if kind not in _FACTORIES:
        raise ValueError(f"no classifiers are registered for classifier_kind {kind!r} (registered: "
                         f"{', '.join(_FACTORIES) or 'none'}); import the package that provides them first")
    return _FACTORIES[kind](**arguments)
