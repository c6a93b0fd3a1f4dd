"""Canvas-mini, the embedded world: its drawings, model, judges and instrument checks.

Importing the package registers its judges as the evaluation's ``canvas-mini`` classifier kind
(:func:`cuig_lightning.evaluation.classifiers.register_classifiers`); they load only when an evaluation asks.
Every diffusion model imports the package (``canvas-mini`` is its default model), so the kind is always there.
"""

from cuig_lightning.evaluation.classifiers import register_classifiers


def _canvas_mini_classifiers(*, classifiers: str = "canvas-mini", **_):
    """The Canvas-mini judges in the folder ``classifiers`` (``canvas-mini``: the shipped ones)."""
    from cuig_lightning.canvas_mini.classifiers import CanvasClassifiers

    return CanvasClassifiers(None if classifiers == "canvas-mini" else classifiers)


register_classifiers("canvas-mini", _canvas_mini_classifiers)
