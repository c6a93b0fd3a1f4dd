"""Shared test helpers and fakes (one place; no test file imports another).

* CLI helpers: :func:`run_cli`, :func:`cuig_process`, :func:`tree_digest`, :func:`write_smoke_overlay`,
  :func:`write_tiny_benchmark_base`, :func:`deltas`, :func:`printed_config`.
* :func:`timm_vit_state` / :func:`write_timm_vit`: random tiny ViTs in the layout of UnlearnCanvas' classifiers
  (the package's, :mod:`cuig_lightning.evaluation.unlearncanvas`, re-exported).
* Callbacks used by tests through configs (importable as ``tests.helpers`` in subprocesses).
* ``FakeUnlearning``: a tiny LightningModule that satisfies the regularizers' module contract
  (:class:`callbacks.contract.RegularizedModule`) with two cross-attention blocks whose names mimic the
  diffusers UNet; ``StreamUnlearning`` draws batch i as a function of i only (resumable, like the real data).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import lightning.pytorch as pl
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from cuig_lightning.checkpoints import save_tensors
from cuig_lightning.evaluation.unlearncanvas import timm_vit_state, write_timm_vit  # noqa: F401 (tests import them here)
from cuig_lightning.requests import Request, Stage

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def deltas(run_dir: Path) -> list[Path]:
    """The request deltas of a run folder, in order."""
    return sorted((run_dir / "requests").glob("*/unet_delta.safetensors"))


def cuig_process(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    """``python -m cuig_lightning ARGS`` as a subprocess (for kill/resume and DDP tests); ``env`` adds variables."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "cuig_lightning", *args], cwd=kw.pop("cwd", REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def write_tiny_job(path: Path, model_path: Path, cache_dir: Path, run_dir: Path, requests: int = 2,
                   evaluation: bool = True, **trainer) -> Path:
    """``configs/seq12.yaml`` shrunk to ``requests`` tiny requests on ``model_path`` (evaluated with one seed
    and 2 DDIM steps unless ``evaluation`` is False), as one self-contained config file."""
    config = yaml.safe_load((CONFIGS / "seq12.yaml").read_text())
    config["trainer"].update({"run_dir": str(run_dir), "requests": config["trainer"]["requests"][:requests],
                              "max_steps": 3, "checkpoint_every": 2, "enable_progress_bar": False,
                              "accelerator": "cpu", **trainer})
    if evaluation:
        config["trainer"]["evaluation"].update(seeds=[188], steps=2, batch_size=256)
    else:
        config["trainer"]["evaluation"] = None
    config["model"]["model_path"] = str(model_path)
    config["data"].update(images_per_prompt=1, batch_size=2, sample_steps=2, cache_dir=str(cache_dir),
                          prompts=["A Cats image."])
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def printed_config(capsys, *configs: Path) -> dict:
    """``cuig fit --config ... --print_config``, parsed."""
    args = ["fit"] + [a for c in configs for a in ("--config", str(c))] + ["--print_config"]
    assert run_cli(*args) == 0
    return yaml.safe_load(capsys.readouterr().out)


def tiny_evaluation(concepts: int = 3) -> dict:
    """``configs/seq12.yaml``'s evaluation shrunk for the tiny model: one seed, 2 DDIM steps, the first ``concepts``
    retained styles and objects."""
    evaluation = yaml.safe_load((CONFIGS / "seq12.yaml").read_text())["trainer"]["evaluation"]
    return {**evaluation, "seeds": [188], "steps": 2, "batch_size": 256,
            "retain_styles": evaluation["retain_styles"][:concepts],
            "retain_objects": evaluation["retain_objects"][:concepts]}


def write_tiny_benchmark_base(path: Path, model_path: Path, cache_dir: Path, requests: int = 3) -> Path:
    """``configs/seq12.yaml`` as a benchmark's base config for the tiny model: its first ``requests`` requests,
    2 steps each, the tiny evaluation (:func:`tiny_evaluation`); no run_dir (the benchmark gives each run one)."""
    config = yaml.safe_load((CONFIGS / "seq12.yaml").read_text())
    config["trainer"].update(requests=config["trainer"]["requests"][:requests], max_steps=2,
                             enable_progress_bar=False, accelerator="cpu", evaluation=tiny_evaluation(3))
    config["model"]["model_path"] = str(model_path)
    config["data"].update(images_per_prompt=1, batch_size=2, sample_steps=2, cache_dir=str(cache_dir),
                          prompts=["A Cats image."])
    path.write_text(yaml.safe_dump(config))
    return path


def write_smoke_overlay(tmp_path: Path, model_path: Path, cache_dir: Path, max_steps: int = 2,
                        job: str = "seq12.yaml") -> Path:
    """A config overlay that shrinks a shipped job (``job`` under configs/) to its first two requests, tiny, on
    ``model_path``, without evaluation."""
    smoke = tmp_path / "smoke.yaml"
    smoke.write_text(yaml.safe_dump({
        "trainer": {"run_dir": str(tmp_path / "run"), "max_steps": max_steps, "evaluation": None, "until_ua": None,
                    "enable_progress_bar": False, "accelerator": "cpu",
                    "requests": yaml.safe_load((CONFIGS / job).read_text())["trainer"]["requests"][:2]},
        "model": {"model_path": str(model_path)},
        "data": {"images_per_prompt": 1, "batch_size": 2, "sample_steps": 2, "cache_dir": str(cache_dir),
                 "prompts": ["A Cats image."]},
    }))
    return smoke


def run_cli(*args: str) -> int:
    """Run ``cuig`` in-process; returns the exit status."""
    from cuig_lightning.cli import main

    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def tree_digest(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, to prove nothing was changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class DumpRankWeights(L.Callback):
    """Save each rank's trainable weights at the end of every stage (to compare DDP ranks)."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        out = Path(self.folder) / f"stage{pl_module.stage.index}-rank{trainer.global_rank}.safetensors"
        save_tensors(pl_module.snapshot(), out)


class DieAt(L.Callback):
    """SIGKILLs its own process in ``on_train_end`` of the stage named by ``$CUIG_TEST_DIE_AT`` (0-based), before
    the callbacks listed after it run (e.g. ModelMerge): a kill after a request's last step. Without the
    variable it does nothing, so the killed and the resuming command have the same config."""

    def on_train_end(self, trainer, pl_module):
        if os.environ.get("CUIG_TEST_DIE_AT") == str(pl_module.stage.index):
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonWeights(L.Callback):
    """Turn one trainable tensor into NaN at a given stage and step, to provoke a non-finite loss."""

    def __init__(self, stage: int = 1, step: int = 1):
        self.stage, self.step = stage, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.stage.index == self.stage and trainer.global_step == self.step:
            with torch.no_grad():
                next(iter(pl_module.trainable.values())).fill_(float("nan"))


# -------------------------------------------------------------------------------------- fakes
D, INNER = 8, 6
VOCAB = {"style": ["Target", "Near", "Mid", "Far", "Other", "Erased"], "object": ["Dogs"]}


def _embedding_table() -> dict[str, torch.Tensor]:
    """Concept embeddings of CLIP-like norm (~10) with known cosines to "Target" (e0)."""
    e = torch.eye(D)
    return {
        "Target": 10 * e[0],
        "Near": 10 * (e[0] + 0.3 * e[1]),  # cos 0.958
        "Erased": 10 * (e[0] + 0.5 * e[5]),  # cos 0.894
        "Mid": 10 * (e[0] + 0.8 * e[2]),  # cos 0.781
        "Far": 10 * e[3],  # cos 0
        "Other": 10 * (-e[0] + e[4]),  # cos -0.707
        "Dogs": 10 * e[6],
    }


TABLE = _embedding_table()


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(INNER, INNER, bias=False)
        self.to_k = nn.Linear(D, INNER, bias=False)
        self.to_v = nn.Linear(D, INNER, bias=False)
        self.to_out = nn.Linear(INNER, INNER)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn2 = _Attention()


class _FakeUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])


class FakeUnlearning(pl.LightningModule):
    """Trainable: every attn2 to_k/to_v/to_out tensor (to_q frozen). Loss: regress keys/values of
    inputs near the target embedding onto fixed random targets."""

    def __init__(self, stage: Stage, optimizer: str = "sgd", lr: float = 0.05, weight_decay: float = 0.0,
                 data_seed: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)  # θ0: the same "pretrained" weights for every instance
        self.unet = _FakeUNet()
        for name, p in self.unet.named_parameters():
            p.requires_grad_("to_q" not in name)
        self.trainable = {n: p for n, p in sorted(self.unet.named_parameters()) if p.requires_grad}
        self.base_weights = {n: p.detach().clone() for n, p in self.trainable.items()}
        self.start_weights = {n: p.detach().clone() for n, p in self.trainable.items()}
        self.loss_terms: dict = {}
        self.stage = stage
        self.opt, self.lr, self.weight_decay, self.data_seed = optimizer, lr, weight_decay, data_seed

    # -- contract ---------------------------------------------------------------------------
    def add_loss_term(self, name, fn) -> None:
        self.loss_terms[name] = fn

    def unlearning_loss(self, batch) -> torch.Tensor:
        x, yk, yv = batch
        loss = x.new_zeros(())
        for block in self.unet.blocks:
            a = block.attn2
            loss = loss + nn.functional.mse_loss(a.to_k(x), yk) + nn.functional.mse_loss(a.to_out(a.to_v(x)), yv)
        return loss

    def _batches(self, n: int, size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        target = self.concept_embeddings(self.stage.targets).mean(0)
        x = target + 3.0 * torch.randn(n * size, D, generator=g)
        return x, torch.randn(n * size, INNER, generator=g), torch.randn(n * size, INNER, generator=g)

    def trajectory_batches(self, num_timesteps: int):
        x, yk, yv = self._batches(num_timesteps, 2, seed=123)
        for t in range(num_timesteps):
            yield x[2 * t : 2 * t + 2], yk[2 * t : 2 * t + 2], yv[2 * t : 2 * t + 2]

    def concept_embeddings(self, names: list[str]) -> torch.Tensor:
        return torch.stack([TABLE[n] for n in names])

    # -- lightning --------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        loss = self.unlearning_loss(batch)
        for fn in self.loss_terms.values():
            loss = loss + fn()
        return loss

    def configure_optimizers(self):
        params = list(self.trainable.values())
        if self.opt == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)

    def train_dataloader(self):
        return DataLoader(TensorDataset(*self._batches(8, 4, seed=self.data_seed)), batch_size=4, shuffle=False)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.trainable.items()}


class Capture(pl.Callback):
    """Records the trainable weights at on_train_end, before callbacks listed after it run."""

    def on_train_end(self, trainer, pl_module):
        self.weights = pl_module.snapshot()


def make_stage(tmp_path: Path, index: int = 0, schedule: str = "sequential", erased=(), previous=()) -> Stage:
    return Stage(index, [Request("Target")], list(erased), VOCAB, schedule, tmp_path / f"r{index}", list(previous))


def make_trainer(callbacks, max_steps: int = 4, root: Path | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, default_root_dir=root,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
    )


def fit(module, callbacks, max_steps: int = 4, ckpt_path=None) -> pl.Trainer:
    trainer = make_trainer(callbacks, max_steps, root=module.stage.request_dir.parent)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def total_elements(module) -> int:
    return sum(p.numel() for p in module.trainable.values())


class _Stream(IterableDataset):
    """Batch i is a function of i only, and the stream starts at the trainer's step (like the real data)."""

    def __init__(self, module: "StreamUnlearning", start: int) -> None:
        self.module, self.start = module, start

    def __iter__(self):
        i = self.start
        while True:
            yield self.module.batch(i)
            i += 1


class StreamUnlearning(FakeUnlearning):
    def batch(self, i: int):
        return self._batches(1, 4, seed=1000 + i)

    def train_dataloader(self):
        return DataLoader(_Stream(self, self.trainer.global_step), batch_size=None)
