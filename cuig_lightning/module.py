"""UnlearningModule: the diffusion model, its trainable group and the unlearning loss of one stage.

The continual trainer reuses one module across stages and calls :meth:`begin_stage` before each fit;
regularizer callbacks read ``trainable``, ``start_weights``, ``base_weights`` and ``stage`` and may add
penalties with :meth:`add_loss_term`.
"""

from __future__ import annotations

from typing import Callable, Iterator, Literal

import lightning as L
import torch

from cuig_lightning.losses import ConAblVariant, SculpMemLoss, conabl_loss, esd_loss, sculpmem_loss
from cuig_lightning.models.diffusion import DiffusionModel, TrainableGroup, trainable_names
from cuig_lightning.requests import Stage

Method = Literal["conabl", "sculpmem", "esd"]
METHODS = ("conabl", "sculpmem", "esd")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the stage is stopped before its weights are saved."""


class UnlearningModule(L.LightningModule):
    """Erase concepts from a text-to-image diffusion model.

    Args:
        model_path: local diffusers folder (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``,
            optional ``vae/``); nothing is downloaded.
        method: base unlearning method (docs/method.md, "Base unlearning losses"):
            ``conabl`` (Concept Ablation); ``sculpmem`` (Sculpting Memory: a SculpMem loss trained under
            the ``callbacks.DynamicMask`` callback, which the trainer must list, on ``trainable: xattn``);
            ``esd`` (ESD: negative guidance from the frozen pretrained weights on the model's own
            trajectory; ESD-x with ``trainable: xattn``).
        trainable: parameter group trained: ``xattn_kv`` (attn2 key/value weights), ``xattn`` or ``full``.
        learning_rate: AdamW learning rate per sample; multiplied by the effective batch size when
            ``scale_lr`` (the reference code's 2e-6 × batch size).
        weight_decay: AdamW weight decay.
        conabl_variant: ``model`` (anchor prediction of the current UNet) or ``noise`` (true noise).
        anchor_preservation: weight of the optional anchor-preservation term (conabl, and sculpmem's
            ``conabl`` loss).
        sculpmem_loss: ``conabl`` (the paper's code: the ConAbl loss) or ``original`` (the paper's losses:
            ConAbl-form forget term + ``align_scale`` · MSE(ε_θ(z_t, t, c_anchor), ε); see
            :func:`cuig_lightning.losses.sculpmem_loss`).
        align_scale: weight of SculpMem's ``original`` alignment term (reference 0.25).
        esd_eta: ESD's negative-guidance scale η.
        esd_trajectory_steps: DDIM steps of the trajectory ESD draws x_t from (each item stops at the
            step nearest its drawn t, so a batch costs on average about half of them, with CFG).
        esd_guidance: classifier-free guidance of that trajectory.
        frozen_dtype: dtype of the frozen text encoder and VAE (``bfloat16`` halves their memory).
    """

    def __init__(
        self,
        model_path: str,
        method: Method = "conabl",
        trainable: TrainableGroup = "xattn_kv",
        learning_rate: float = 2e-6,
        scale_lr: bool = True,
        weight_decay: float = 1e-2,
        conabl_variant: ConAblVariant = "model",
        anchor_preservation: float = 0.0,
        frozen_dtype: Literal["float32", "bfloat16"] = "float32",
        sculpmem_loss: SculpMemLoss = "conabl",
        align_scale: float = 0.25,
        esd_eta: float = 1.0,
        esd_trajectory_steps: int = 50,
        esd_guidance: float = 3.0,
    ):
        super().__init__()
        _check_method(method, trainable, conabl_variant, anchor_preservation, sculpmem_loss, esd_trajectory_steps)
        self.diffusion = DiffusionModel.from_pretrained(model_path)
        self.method, self.learning_rate, self.scale_lr = method, learning_rate, scale_lr
        self.weight_decay = weight_decay
        self.conabl_variant, self.anchor_preservation = conabl_variant, anchor_preservation
        self.sculpmem_loss, self.align_scale = sculpmem_loss, align_scale
        self.esd_eta, self.esd_trajectory_steps, self.esd_guidance = esd_eta, esd_trajectory_steps, esd_guidance
        self._esd_cache: dict = {}  # θ0 trainable tensors and the "" embedding on the UNet's device
        if frozen_dtype == "bfloat16":
            for part in (self.diffusion.text_encoder, self.diffusion.vae):
                if part is not None:
                    part.to(torch.bfloat16)
        unet = self.diffusion.unet
        unet.requires_grad_(False)
        params = dict(unet.named_parameters())
        self.trainable: dict[str, torch.nn.Parameter] = {n: params[n] for n in trainable_names(unet, trainable)}
        for p in self.trainable.values():
            p.requires_grad_(True)
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
        if self.method == "conabl":
            return conabl_loss(self.diffusion, batch, self.conabl_variant, self.anchor_preservation)
        if self.method == "sculpmem":
            return sculpmem_loss(self.diffusion, batch, self.sculpmem_loss, self.align_scale, self.conabl_variant,
                                 self.anchor_preservation)
        if self.method == "esd":
            base, uncond = self._esd_inputs()
            return esd_loss(self.diffusion, batch, base, uncond, self.esd_eta, self.esd_trajectory_steps,
                            self.esd_guidance)
        raise ValueError(f"unknown unlearning method {self.method!r}")

    def _esd_inputs(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """θ0 of the trainable tensors (``base_weights``) and the "" embedding, on the UNet's device, cached.
        On CPU in the parameters' dtype the θ0 tensors are ``base_weights`` themselves (no copy); the
        frozen part of the UNet is shared, so no second UNet exists."""
        p = next(iter(self.trainable.values()))
        key = (p.device, p.dtype)
        if self._esd_cache.get("key") != key:
            base = {n: self.base_weights[n].to(device=t.device, dtype=t.dtype) for n, t in self.trainable.items()}
            self._esd_cache = {"key": key, "base": base, "uncond": self.diffusion.encode_text([""]).to(p.device)}
        return self._esd_cache["base"], self._esd_cache["uncond"]

    def trajectory_batches(self, num_timesteps: int) -> Iterator[dict]:
        return self.trainer.datamodule.trajectory_batches(num_timesteps, self.device)

    def concept_embeddings(self, names: list[str]) -> torch.Tensor:
        return self.diffusion.concept_embeddings(names, self.stage.domain if self.stage is not None else "style")

    # ------------------------------------------------------------------ Lightning
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.method == "sculpmem":
            from callbacks.dynamic_mask import DynamicMask

            if not any(isinstance(c, DynamicMask) for c in self.trainer.callbacks):
                raise ValueError(
                    "model.method sculpmem trains under a dynamic mask: add callbacks.DynamicMask to "
                    "trainer.callbacks (an overlay's callbacks list replaces the base list, so list it there)"
                )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.unlearning_loss(batch)
        self.log("loss/unlearn", loss.detach(), prog_bar=True)
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
        return torch.optim.AdamW(self.trainable.values(), lr=lr, weight_decay=self.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Keep mid-stage checkpoints small: only the trained tensors, not the whole frozen model.
        prefix = "diffusion.unet."
        checkpoint["state_dict"] = {prefix + n: p.detach().cpu() for n, p in self.trainable.items()}


def _check_method(method, trainable, conabl_variant, anchor_preservation, sculpmem_loss, esd_trajectory_steps) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown unlearning method {method!r}; choose {', '.join(METHODS)}")
    if method == "sculpmem":
        if trainable != "xattn":
            raise ValueError(f"model.method sculpmem trains cross-attention q/k/v/out: set model.trainable: xattn "
                             f"(got {trainable!r})")
        if sculpmem_loss not in ("conabl", "original"):
            raise ValueError(f"unknown sculpmem_loss {sculpmem_loss!r}; choose conabl or original")
        if sculpmem_loss == "original" and (anchor_preservation > 0 or conabl_variant != "model"):
            raise ValueError("sculpmem_loss original has its own anchor term (align_scale) and the model-based "
                             "forget target: leave anchor_preservation 0 and conabl_variant model")
    if method == "esd" and esd_trajectory_steps < 1:
        raise ValueError(f"esd_trajectory_steps must be >= 1, got {esd_trajectory_steps}")
