"""Continual-unlearning regularizers as Lightning callbacks (see docs/method.md, "Regularizers").

Each callback talks to the LightningModule only through its contract: ``trainable``,
``start_weights``, ``base_weights``, ``add_loss_term``, ``unlearning_loss``, ``trajectory_batches``,
``concept_embeddings`` and ``stage``. They compose: any subset can be passed to one Trainer.
``DynamicMask`` is SculpMem's training mask (part of that base method, see ``model.method``).
"""

from callbacks.dynamic_mask import DynamicMask
from callbacks.gradient_projection import GradientProjection
from callbacks.merge import ModelMerge
from callbacks.norm import NormRegularizer
from callbacks.selective_finetuning import SelectiveFineTuning

__all__ = ["DynamicMask", "GradientProjection", "ModelMerge", "NormRegularizer", "SelectiveFineTuning"]
