"""UnlearningModule: the diffusion model, its trainable group and the unlearning loss of one stage.

The continual trainer reuses one module across stages and calls :meth:`begin_stage` before each fit;
regularizer callbacks read ``trainable``, ``start_weights``, ``base_weights`` and ``stage`` and may add
penalties with :meth:`add_loss_term`.
"""

from __future__ import annotations

from typing import Callable, Iterator, Literal

import lightning as L
import torch
from jsonargparse import lazy_instance

from cuig_lightning.methods import ConAbl, Method
from cuig_lightning.models.diffusion import (ColumnToken, DiffusionModel, detach_first_text_position,
                                             trainable_names)
from cuig_lightning.requests import Stage


OPTIMIZERS = ("adamw", "sgd")


def build_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float = 0.0) -> torch.optim.Optimizer:
    """``adamw``: ``torch.optim.AdamW(lr, weight_decay)``; ``sgd``: ``torch.optim.SGD(lr, momentum,
    weight_decay)`` (no dampening, no Nesterov)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use {' or '.join(OPTIMIZERS)}")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the stage is stopped before its weights are saved."""


class UnlearningModule(L.LightningModule):
    """Erase concepts from a text-to-image diffusion model.

    Args:
        model_path: local diffusers folder (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``,
            optional ``vae/``); nothing is downloaded.
        method: the base unlearning method (:mod:`cuig_lightning.methods`: ``ConAbl``, ``SculpMem``, ``ESD``),
            with its own arguments and trainable group; default ``ConAbl()``.
        learning_rate: the optimizer's learning rate per sample; multiplied by the effective batch size when
            ``scale_lr`` (the reference code's 2e-6 × batch size). AdamW moves every weight by about this much
            per step whatever the gradient's size; SGD moves it by this times the gradient, so SGD needs a far
            larger value for a comparable step (see configs/paper/gradproj_ablation/).
        scale_lr: multiply ``learning_rate`` by the effective batch size (batch size × gradient accumulation ×
            devices), as the reference code does (for either optimizer).
        weight_decay: AdamW: decoupled weight decay; SGD: an L2 term ``weight_decay · W`` that the optimizer
            adds to the gradient after the callbacks saw it (so GradProj does not project it; 0 keeps SGD
            exactly orthogonal).
        optimizer: ``adamw`` (the paper's) or ``sgd`` (plain stochastic gradient descent, the optimizer under
            which GradProj's projection is exact).
        momentum: SGD's momentum (0: plain SGD); AdamW has none and refuses a non-zero value.
        frozen_dtype: dtype of the frozen text encoder and VAE (``bfloat16`` halves their memory).
    """

    def __init__(
        self,
        model_path: str,
        method: Method = lazy_instance(ConAbl),
        learning_rate: float = 2e-6,
        scale_lr: bool = True,
        weight_decay: float = 1e-2,
        frozen_dtype: Literal["float32", "bfloat16"] = "float32",
        optimizer: Literal["adamw", "sgd"] = "adamw",
        momentum: float = 0.0,
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; use {' or '.join(OPTIMIZERS)}")
        if momentum and optimizer != "sgd":
            raise ValueError(f"model.momentum is an SGD option; {optimizer} has none (got {momentum})")
        self.optimizer_name, self.momentum = optimizer, momentum
        self.diffusion = DiffusionModel.from_pretrained(model_path)
        self.method, self.learning_rate, self.scale_lr = method, learning_rate, scale_lr
        self.weight_decay = weight_decay
        if frozen_dtype == "bfloat16":
            for part in (self.diffusion.text_encoder, self.diffusion.vae):
                if part is not None:
                    part.to(torch.bfloat16)
        unet = self.diffusion.unet
        unet.requires_grad_(False)
        params = dict(unet.named_parameters())
        self.trainable: dict[str, torch.nn.Parameter] = {n: params[n] for n in trainable_names(unet, method.trainable)}
        for p in self.trainable.values():
            p.requires_grad_(True)
        if method.detaches_first_token():
            detach_first_text_position(unet)  # for the module's lifetime: it only changes gradients
        self.base_weights = self.snapshot()  # θ0
        self.start_weights = self.base_weights  # θ(n-1)*, replaced at every stage
        self.stage: Stage | None = None
        self._loss_terms: dict[str, Callable[[], torch.Tensor]] = {}
        # Mid-stage checkpoints hold only the trainable tensors (see on_save_checkpoint).
        self.strict_loading = False

    # ------------------------------------------------------------------ weights
    def snapshot(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the trainable tensors."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.trainable.items()}

    @torch.no_grad()
    def load_trainable(self, weights: dict[str, torch.Tensor]) -> None:
        if set(weights) != set(self.trainable):
            missing, extra = set(self.trainable) - set(weights), set(weights) - set(self.trainable)
            raise ValueError(f"weights do not match the trainable group (missing {len(missing)}, extra {len(extra)})")
        for n, p in self.trainable.items():
            p.copy_(weights[n].to(p.device, p.dtype))

    def begin_stage(self, stage: Stage, start_weights: dict[str, torch.Tensor]) -> None:
        """Set the weights a stage starts from; forget the previous stage's loss terms."""
        self.load_trainable(start_weights)
        self.start_weights = {n: w.detach().to("cpu", copy=True) for n, w in start_weights.items()}
        self.stage = stage
        self._loss_terms = {}

    # ------------------------------------------------------------------ contract for callbacks
    def add_loss_term(self, name: str, fn: Callable[[], torch.Tensor]) -> None:
        """Register a penalty added to every training step's loss (used by regularizer callbacks)."""
        self._loss_terms[name] = fn

    def unlearning_loss(self, batch: dict) -> torch.Tensor:
        return self.method.loss(self, batch)

    def trajectory_batches(self, num_timesteps: int) -> Iterator[dict]:
        return self.trainer.datamodule.trajectory_batches(num_timesteps, self.device)

    def concept_embeddings(self, names: list[str]) -> torch.Tensor:
        return self.diffusion.concept_embeddings(names, self.stage.domain if self.stage is not None else "style")

    def caption_embeddings(self, captions: list[str], token: ColumnToken = "content") -> torch.Tensor:
        """One vector per caption, ``(len(captions), d)``: GradProj's columns by the paper's rule
        (:meth:`DiffusionModel.prompt_columns`; ``token``: the last content token or the token before EOS)."""
        return self.diffusion.prompt_columns(captions, token)

    def anchor_prompts(self) -> list[str]:
        """This stage's anchor prompts (ConAbl's anchor captions), each once: GradProj's ``source: anchors``."""
        return self.trainer.datamodule.anchor_prompts(self.stage)

    # ------------------------------------------------------------------ Lightning
    def configure_callbacks(self) -> list:
        """The callbacks the method trains under (SculpMem's dynamic mask), fresh for every stage."""
        return self.method.callbacks()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.unlearning_loss(batch)
        self.log("loss/unlearn", loss.detach(), prog_bar=True)
        if self.stage is not None:  # names the request in every logged row (run_dir/logs/NN-target/metrics.csv)
            self.log("request", float(self.stage.index + 1))
        for name, term in self._loss_terms.items():
            value = term()
            self.log(f"loss/{name}", value.detach())
            loss = loss + value
        if not torch.isfinite(loss):
            where = f"request {self.stage.index + 1}" if self.stage else "training"
            raise NonFiniteLossError(f"non-finite loss ({loss.item()}) at {where}, step {self.global_step}")
        return loss

    def configure_optimizers(self):
        lr = self.learning_rate
        if self.scale_lr:
            batch = getattr(self.trainer.datamodule, "batch_size", 1)
            lr *= batch * self.trainer.accumulate_grad_batches * self.trainer.world_size
        return build_optimizer(self.optimizer_name, self.trainable.values(), lr, self.weight_decay, self.momentum)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Keep mid-stage checkpoints small: only the trained tensors, not the whole frozen model.
        prefix = "diffusion.unet."
        checkpoint["state_dict"] = {prefix + n: p.detach().cpu() for n, p in self.trainable.items()}
