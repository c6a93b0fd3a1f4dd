"""KeyValueDrift: a probe of how far the cross-attention keys and values of given texts move in a stage (issue 14).

For an attn2.to_k / attn2.to_v weight W, its value W0 at the stage's start (``pl_module.start_weights``) and a
text state c, the **drift ratio** is ‖(W − W0)·c‖ / ‖W0·c‖: the share of the key (value) that c had at the
stage's start that has changed since (:func:`drift_ratios`). Every ``every`` optimizer steps the probe averages
it over three sets of text states, per layer, then over the layers (:func:`layer_drift`):

* ``C``: the columns of the active :class:`~callbacks.gradient_projection.GradientProjection`'s C (what
  GradProj keeps fixed; absent without GradProj),
* ``retained``: the states of *every* position, padding included (the UNet attends to all of them), of the
  prompts "A {object} image in {style} style." for the retained concepts × a few companions (:func:`prompts`),
* ``target``: the same for the stage's targets,

plus ``weights``: ‖W − W0‖_F / ‖W0‖_F, how far the layer moved at all. The means over layers are logged
(``kv_drift/C``, ``kv_drift/retained``, ``kv_drift/target``, ``kv_drift/weights``) and the stage's series is
recorded in the request folder as ``kv_drift.json`` (:data:`KEY_VALUE_DRIFT_JSON`): the means per measured step,
the per-layer values of the last one, the optimizer and GradProj's source. It reads the weights under
``no_grad`` after the optimizer step and draws no random numbers, so the trained weights are those of the same
stage without the probe, bit for bit. Its series is checkpointed with the stage (a resumed stage continues it).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from callbacks.base import Regularizer
from callbacks.gradient_projection import GradientProjection, is_projected
from cuig_lightning.requests import caption

KEY_VALUE_DRIFT_JSON = "kv_drift.json"


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def layer_mean(values: list[float]) -> float:
    """The mean over layers of one group's per-layer values."""
    return sum(values) / len(values)


def drift_ratios(W: Tensor, W0: Tensor, states: Tensor) -> Tensor:
    """‖(W − W0)·x‖ / ‖W0·x‖ for every row x of ``states`` (n, d); W, W0: (out, d). Returns (n,)."""
    return (states @ (W - W0).T).norm(dim=1) / (states @ W0.T).norm(dim=1)


def layer_drift(weights: dict[str, Tensor], start: dict[str, Tensor],
                states: dict[str, Tensor]) -> dict[str, list[float]]:
    """Per layer (``weights``' order): the mean drift ratio over each group's states (group -> (n, d)), and
    ``weights``: ‖W − W0‖_F / ‖W0‖_F."""
    out: dict[str, list[float]] = {group: [] for group in (*states, "weights")}
    for name, W in weights.items():
        for group, x in states.items():
            out[group].append(float(drift_ratios(W, start[name], x).mean()))
        out["weights"].append(float((W - start[name]).norm() / start[name].norm()))
    return out


def prompts(concepts: list[str], companions: list[str | None], domain: str) -> list[str]:
    """The evaluation's prompt "A {object} image in {style} style." for every concept × companion: a style
    stage's concepts are styles and its companions objects; an object stage's the other way round (a None
    style gives "A {object} image.")."""
    if domain == "style":
        return [caption(c, o) for c in concepts for o in companions]
    return [caption(s, c) for c in concepts for s in companions]


class KeyValueDrift(Regularizer):
    """Records the drift ratios of the module docstring every ``every`` steps; changes nothing it measures.

    Args:
        every: optimizer steps between measurements (the stage's last step is always measured).
        retain: the retained concepts of the stage's domain (e.g. the evaluation's ``retain_styles``); default
            the domain's vocabulary. The concepts erased by the end of the stage are left out either way.
        companions: the other domain's concepts each retained / target concept is paired with in a prompt
            (objects for a style stage, styles for an object stage); default the first three of that domain's
            vocabulary (none for an object stage: "A {object} image.").
    """

    def __init__(self, every: int = 1, retain: list[str] | None = None, companions: list[str] | None = None) -> None:
        if every < 1:
            raise ValueError(f"KeyValueDrift every must be >= 1, got {every}")
        self.every = every
        self.retain = list(retain) if retain is not None else None
        self.companions = list(companions) if companions is not None else None
        self.rows: list[dict[str, Any]] = []  # one per measured step: step, then group -> per-layer values
        self._states: dict[str, Tensor] | None = None
        self._prompts: dict[str, list[str]] = {}  # retained / target: the prompts their states come from
        self._start: dict[str, Tensor] | None = None
        self._gradproj: GradientProjection | None = None

    # -- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        self.rows, self._states, self._prompts, self._start, self._gradproj = [], None, {}, None, None

    def stage_state(self) -> dict[str, Any] | None:
        return {"rows": list(self.rows)} if self.rows else None

    def load_stage_state(self, state: dict[str, Any]) -> None:
        self.rows = list(state["rows"])

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not callable(getattr(getattr(pl_module, "diffusion", None), "encode_text", None)):
            raise TypeError(f"KeyValueDrift needs {type(pl_module).__name__}.diffusion.encode_text(prompts)")

    # -- hooks -------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_stage(pl_module, "drift series was")
        gradproj = [c for c in trainer.callbacks if isinstance(c, GradientProjection)]
        self._gradproj = gradproj[0] if gradproj else None  # its C exists once its on_train_start has run

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every == 0 and not self._measured(step):  # accumulation: once per step
            row = self._measure(pl_module, step)
            for group, values in row.items():
                if group != "step":
                    pl_module.log(f"kv_drift/{group}", layer_mean(values))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._measured(trainer.global_step):
            self._measure(pl_module, trainer.global_step)
        self.record(trainer, pl_module, KEY_VALUE_DRIFT_JSON, self.summary(trainer, pl_module))

    # -- helpers -----------------------------------------------------------------------------
    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """What ``kv_drift.json`` holds: the layer means per measured step (``series``), the per-layer values
        of the last measured step (``last``) and their means (``final``), and what was measured (the optimizer,
        GradProj's source, the states per group and the prompts they come from)."""
        groups = [g for g in self.rows[-1] if g != "step"] if self.rows else []
        mean = lambda values: _round(layer_mean(values))  # noqa: E731
        return {
            "optimizer": type(trainer.optimizers[0]).__name__ if trainer.optimizers else None,
            "c_source": self._gradproj.source if self._gradproj else None,
            "every": self.every, "targets": pl_module.stage.targets,
            "columns": {g: int(x.shape[0]) for g, x in (self._states or {}).items()},
            "prompts": self._prompts,
            "layers": [n for n in pl_module.trainable if is_projected(n)],
            "series": {"step": [r["step"] for r in self.rows], **{g: [mean(r[g]) for r in self.rows] for g in groups}},
            "last": {g: [_round(v) for v in self.rows[-1][g]] for g in groups} if self.rows else {},
            "final": {g: mean(self.rows[-1][g]) for g in groups} if self.rows else {},
        }

    def _measured(self, step: int) -> bool:
        return bool(self.rows) and self.rows[-1]["step"] == step

    @torch.no_grad()
    def _measure(self, pl_module: pl.LightningModule, step: int) -> dict[str, Any]:
        weights = {n: p.detach().float() for n, p in pl_module.trainable.items() if is_projected(n)}
        device = next(iter(weights.values())).device
        if self._states is None:
            self._states = {g: x.to(device, torch.float32) for g, x in self._text_states(pl_module).items()}
            self._start = {n: pl_module.start_weights[n].to(device, torch.float32) for n in weights}
        row = {"step": step, **layer_drift(weights, self._start, self._states)}
        self.rows.append(row)
        return row

    def _text_states(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """The states each group's drift is measured on, (n, d) each."""
        stage, diffusion = pl_module.stage, pl_module.diffusion
        other = "object" if stage.domain == "style" else "style"
        companions = self.companions
        if companions is None:
            companions = stage.vocabulary.get(other, [])[:3] or ([None] if stage.domain == "object" else [])
        if not companions:
            raise ValueError("KeyValueDrift pairs each style with objects in its prompts, and the vocabulary has "
                             "none: give companions")
        erased = set(stage.erased) | set(stage.targets)
        retain = [c for c in (self.retain if self.retain is not None else stage.vocabulary.get(stage.domain, []))
                  if c not in erased]
        states = {}
        if self._gradproj is not None and self._gradproj.C is not None:
            states["C"] = self._gradproj.C.T
        groups = (("retained", retain), ("target", stage.targets))
        self._prompts = {g: prompts(concepts, companions, stage.domain) for g, concepts in groups if concepts}
        for group, texts in self._prompts.items():
            encoded = diffusion.encode_text(texts)
            states[group] = encoded.reshape(-1, encoded.shape[-1])
        return states
