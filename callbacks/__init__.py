"""Continual-unlearning regularizers as Lightning callbacks (the paper's regularizers; docs/configuration.md).

Each callback derives from :class:`callbacks.base.Regularizer` (per-stage state, checkpointing, rank-0
broadcast, files recorded into the request folder) and talks to the LightningModule only through the
contract :class:`callbacks.contract.RegularizedModule`, checked once in ``on_fit_start``. They compose: any
subset can be passed to one Trainer. ``DynamicMask`` is SculpMem's training mask, supplied by
``cuig_lightning.methods.SculpMem`` (never listed in a config). ``KeyValueDrift`` regularizes nothing: a probe
of how far the cross-attention keys and values of chosen texts move (GradProj's ablation), built on the same base.
"""

from callbacks.base import Regularizer
from callbacks.contract import RegularizedModule
from callbacks.dynamic_mask import DynamicMask
from callbacks.gradient_projection import GradientProjection
from callbacks.key_value_drift import KeyValueDrift
from callbacks.merge import ModelMerge
from callbacks.norm import NormRegularizer
from callbacks.selective_finetuning import SelectiveFineTuning

__all__ = ["DynamicMask", "Regularizer", "RegularizedModule", "GradientProjection", "KeyValueDrift", "ModelMerge",
           "NormRegularizer", "SelectiveFineTuning"]
