"""The ``cuig`` commands that are not Trainer stages, as typed functions (their docstrings are the help):
``benchmark``, ``pretrain``, ``evaluate-base`` and ``train-classifier``. Thin wrappers: the work is done by
:mod:`cuig_lightning.benchmark`, :mod:`cuig_lightning.pretrain` and :mod:`cuig_lightning.evaluation.classifiers`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Literal

from cuig_lightning import pretrain as canvas_pretrain
from cuig_lightning.benchmark import Tuning, run_benchmark
from cuig_lightning.evaluation import classifiers
from cuig_lightning.lightning_cli import CuigCLI


def benchmark(
    base: str | list[str] = "configs/seq12.yaml",
    methods: dict[str, str] | None = None,
    rows: list[str] | None = None,
    seeds: list[int] | None = None,
    output: str = "results/runs",
    report: str = "results",
    tuning: Tuning | None = None,
    jobs: int = 1,
    report_only: bool = False,
) -> None:
    """The paper's main table: tuning on a validation split, every row x method x seed (a `cuig fit` each), the report.

    Args:
        base: the job config(s) every run starts from.
        methods: method name -> folder holding one overlay YAML per row.
        rows: row names (overlay file stems), in table order.
        seeds: seeds (``seed_everything`` and ``data.seed``).
        output: folder of the run folders (``output/method/row/seedN``, ``output/tuning/...``).
        report: folder of the report files.
        tuning: the hyperparameter search on a validation split (None: the overlays as they are).
        jobs: ``cuig fit`` processes at once (1: one after another, in this process).
        report_only: rebuild the report from the finished runs without training.
    """
    try:
        run_benchmark(base, methods, rows, seeds, output, report, tuning, jobs, report_only,
                      fit=lambda args: CuigCLI(args=args))
    except RuntimeError as err:  # failed runs: the report of the finished ones is written; say which failed
        print(f"cuig: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def pretrain(
    out: Path = Path("runs/canvas_mini_base"),
    steps: int = 1800,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    ema_decay: float = 0.999,
    cond_dropout: float = 0.1,
    warmup: int = 200,
    snr_gamma: float = 5.0,
    checkpoint_every: int = 500,
    eval_every: int = 0,
    bf16: bool = True,
    fp32_weights: bool = False,
    device: str = "cpu",
    threads: int = 2,
    eval_seeds: list[int] | None = None,
    eval_steps: int = 20,
    guidance: list[float] | None = None,
    eval_only: Path | None = None,
) -> None:
    """Pretrain the Canvas-mini base model (defaults: the committed recipe), then score it on the full grid.

    Args:
        out: output folder (``unet/`` + ``scheduler/``).
        steps: optimizer steps.
        batch_size: fresh drawings per step.
        lr: AdamW learning rate (cosine schedule after ``warmup`` steps).
        seed: random seed.
        ema_decay: EMA decay of the saved weights.
        cond_dropout: fraction of empty prompts.
        warmup: learning-rate warm-up steps.
        snr_gamma: min-SNR loss weighting γ.
        checkpoint_every: steps between checkpoints.
        eval_every: steps between mid-run grid evaluations (0: none).
        bf16: bfloat16 autocast for training and evaluation.
        fp32_weights: store float32 weights (default float16).
        device: torch device.
        threads: CPU threads.
        eval_seeds: seeds of the final grid evaluation (default: the pretraining module's).
        eval_steps: DDIM steps of the evaluation.
        guidance: guidance scales to evaluate at.
        eval_only: evaluate this model folder; no training.
    """
    import torch

    torch.set_num_threads(threads)
    if eval_only is None:
        t0 = time.perf_counter()
        result = canvas_pretrain.pretrain(
            out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, ema_decay=ema_decay,
            cond_dropout=cond_dropout, warmup=warmup, snr_gamma=snr_gamma, bf16=bf16,
            checkpoint_every=checkpoint_every, eval_every=eval_every, half=not fp32_weights, device=device,
            num_threads=threads)
        print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2))
        print(f"training wall time: {(time.perf_counter() - t0) / 60:.1f} min")
    for g in guidance or [1.5]:
        evaluate_base(eval_only or out, eval_seeds, eval_steps, g, bf16, device)


def evaluate_base(model_folder: Path | None = None, seeds: list[int] | None = None, steps: int = 20,
                  guidance: float = 1.5, bf16: bool = True, device: str = "cpu") -> None:
    """Style / object accuracy of a Canvas-mini model over every style x every object.

    Args:
        model_folder: a model folder (``unet/`` + ``scheduler/``, or a full diffusers folder); default: the shipped model.
        seeds: sampling seeds (default: the pretraining module's).
        steps: DDIM steps.
        guidance: classifier-free guidance.
        bf16: sample under bfloat16 autocast.
        device: torch device.
    """
    seeds = list(seeds or canvas_pretrain.EVAL_SEEDS)
    res = canvas_pretrain.evaluate_base(model_folder, seeds=seeds, steps=steps, guidance=guidance, bf16=bf16,
                                        device=device)
    print(json.dumps(res, indent=2))
    print(f"guidance {guidance}: style {res['style_acc']:.3f} object {res['object_acc']:.3f} "
          f"({res['n_images']} images, DDIM {steps}, sampling {res['sample_seconds']} s)")


def train_classifier(kind: Literal["style", "object", "both"] = "both", steps: int = 400, seed: int = 0,
                     batch_size: int = 128, lr: float = 3e-3, width: int = 24, out: Path | None = None,
                     fp32: bool = False, threads: int | None = None) -> None:
    """Train the Canvas-mini style and/or object classifier used by the evaluation.

    Args:
        kind: ``style``, ``object`` or ``both``.
        steps: optimizer steps.
        seed: random seed.
        batch_size: drawings per step.
        lr: learning rate.
        width: channel width of the CNN.
        out: output folder (default: the shipped classifiers' folder).
        fp32: store float32 weights instead of float16.
        threads: CPU threads (default: torch's).
    """
    for k in ["style", "object"] if kind == "both" else [kind]:
        _, result = classifiers.train_classifier(k, steps=steps, seed=seed, batch_size=batch_size, lr=lr,
                                                 width=width, out_dir=out or classifiers.DEFAULT_DIR,
                                                 half=not fp32, num_threads=threads)
        print(json.dumps({"kind": k, **result}, indent=2))


COMMANDS = {"benchmark": benchmark, "pretrain": pretrain, "evaluate-base": evaluate_base,
            "train-classifier": train_classifier}
