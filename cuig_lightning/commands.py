"""The ``cuig`` commands that are not Trainer stages, as typed functions (their docstrings are the help):
``benchmark``, ``fidelity``, ``robustness``, ``pretrain``, ``evaluate-base``, ``train-classifier``, ``instrument``, ``speed``,
``smoke`` and ``evaluation-speed``. Thin wrappers: the
work is done by :mod:`cuig_lightning.benchmark`, the :mod:`cuig_lightning.canvas_mini` package (``pretrain`` and
``instrument`` are its functions as they are) and :mod:`cuig_lightning.speed` / :mod:`cuig_lightning.smoke` (``speed`` and ``smoke`` as they are).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from cuig_lightning.benchmark import Tuning, run_benchmark
from cuig_lightning.benchmark.evaluation_speed import evaluation_speed
from cuig_lightning.benchmark.fidelity import run_fidelity
from cuig_lightning.benchmark.robustness import run_robustness
from cuig_lightning.benchmark.slurm import Slurm
from cuig_lightning.canvas_mini import classifiers
from cuig_lightning.canvas_mini import pretrain as canvas_pretrain
from cuig_lightning.canvas_mini.instrument import instrument
from cuig_lightning.lightning_cli import run_cuig_cli
from cuig_lightning.smoke import smoke
from cuig_lightning.speed import speed

MAIN_TABLE_ROWS = ["sequential", "simultaneous", "l1", "l2", "selft", "merge", "gradproj", "gradproj_topk",
                   "merge_gradproj", "gradproj_selft"]


def benchmark(
    base: str | list[str] = "configs/seq12.yaml",
    methods: dict[str, str] | None = None,
    rows: list[str] | None = None,
    seeds: list[int] | None = None,
    simultaneous_n: list[int] | None = None,
    output: str = "results/runs",
    report: str = "results",
    tuning: Tuning | None = None,
    jobs: int | None = None,
    report_only: bool = False,
    gradproj_ablation: bool = False,
    curve_seeds: int | None = None,
    launcher: Literal["local", "slurm"] = "local",
    slurm: dict[str, Any] | None = None,
) -> None:
    """The paper's main table: tuning on a validation split, every row x method x seed (a `cuig fit` each), the report.

    Args:
        base: the job config(s) every run starts from, in order (tuning runs included).
        methods: method name -> folder holding one overlay YAML per row.
        rows: row names (overlay file stems), in table order (None: all ten; ``[]``: none, e.g. the
            simultaneous curve alone).
        seeds: seeds (``seed_everything`` and ``data.seed``).
        simultaneous_n: the simultaneous curve: for each n, a run of the ``simultaneous`` overlay from θ0 on the
            first n requests of ``base`` per method and seed (``output/METHOD/simultaneous_n/nN/seedS``; for n =
            all of them, the simultaneous row's runs). None: no curve.
        output: folder of the run folders (``output/method/row/seedN``, ``output/tuning/...``).
        report: folder of the report files.
        tuning: the hyperparameter search on a validation split (None: the overlays as they are). Its ``grid``
            maps row -> ``CallbackClass: {init_arg: [values]}`` and/or ``dotted.config.path: [values]`` (a key
            with a dot, e.g. ``model.learning_rate``); see :class:`cuig_lightning.benchmark.Tuning`.
        jobs: runs at once: ``cuig fit`` processes here (None or 1: one after another, in this process), or with
            ``launcher: slurm`` jobs in the queue (None: every run whose needs have finished).
        report_only: rebuild the report from the finished runs without training.
        gradproj_ablation: also run the GradProj ablation ({AdamW, SGD} x C sources, one seed, with the
            key/value drift probe; :mod:`cuig_lightning.benchmark.ablation`) and report it in gradproj_ablation.md.
        curve_seeds: the reported and ablation runs' ``trainer.curve_seeds``: RA-I / RA-C between the first and
            the last request from this many of the evaluation seeds (UA from all); None: all of them.
        launcher: where the runs go: ``local`` (this machine) or ``slurm`` (one SLURM job per run, through
            submitit: ``pip install 'cuig[cluster]'``; this command submits each run once the runs it needs have
            finished and waits for them; stopping it cancels its jobs, and a rerun resumes them).
        slurm: each job's resources with ``launcher: slurm``, in submitit's names (``timeout_min``,
            ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``, ``slurm_partition``, ``slurm_account``, ...;
            default 1 GPU, 240 min); see configs/slurm/benchmark.yaml.
    """
    if slurm is not None and launcher != "slurm" and not report_only:  # the runs would start on this machine
        raise ValueError("slurm resources are given but the launcher is local: add --launcher slurm")
    base = [base] if isinstance(base, str) else list(base)
    methods = methods or {"conabl": "configs/canvas_mini", "sculpmem": "configs/canvas_mini_sculpmem"}
    rows = MAIN_TABLE_ROWS if rows is None else rows
    # the scheduler is asked for (and submitit needed) only when there is something to run
    cluster = Slurm(slurm, Path(output) / ".submitit", jobs) if launcher == "slurm" and not report_only else None
    try:
        run_benchmark(base, methods, rows, seeds or [0, 1, 2], output, report, tuning, 1 if jobs is None else jobs,
                      report_only, fit=lambda args: run_cuig_cli(args=args), simultaneous_n=simultaneous_n,
                      gradproj_ablation=gradproj_ablation, curve_seeds=curve_seeds, launcher=cluster)
    except RuntimeError as err:  # failed runs: the report of the finished ones is written; say which failed
        print(f"cuig: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def fidelity(job: Path = Path("configs/paper/fidelity.yaml"), jobs: int = 1, report_only: bool = False) -> None:
    """Issue 33's fidelity table: each row of the job with cuig's earlier behaviour and with the paper's code.

    Args:
        job: the job file (base configs, seed, rows with their overlays and variants; see
            :mod:`cuig_lightning.benchmark.fidelity`).
        jobs: ``cuig fit`` processes at once (1: one after another, in this process).
        report_only: rebuild ``fidelity.md`` from the finished runs without training.
    """
    try:
        path = run_fidelity(job, jobs, report_only, fit=lambda args: run_cuig_cli(args=args))
    except RuntimeError as err:  # failed runs: the report of the finished ones is written; say which failed
        print(f"cuig: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {path}")


def robustness(job: Path = Path("configs/paper/robustness.yaml"), jobs: int = 1, report_only: bool = False) -> None:
    """Issue 36's robustness table: attack success and UA after relearning, row by row, after requests 1/4/8/12.

    Args:
        job: the job file (base configs with the probes, seed, rows with their overlays; see
            :mod:`cuig_lightning.benchmark.robustness`).
        jobs: ``cuig fit`` processes at once (1: one after another, in this process).
        report_only: rebuild ``robustness.md`` from the finished runs without training.
    """
    try:
        path = run_robustness(job, jobs, report_only, fit=lambda args: run_cuig_cli(args=args))
    except RuntimeError as err:  # failed runs: the report of the finished ones is written; say which failed
        print(f"cuig: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {path}")


def evaluate_base(model_folder: Path | None = None, seeds: list[int] = [188, 288], steps: int = 20,
                  guidance: float = 1.5, device: str = "cpu") -> None:  # fmt: skip
    """Style / object / neutral accuracy of a Canvas-mini model over every style class x every object.

    Args:
        model_folder: a pretraining output (``unet/`` + ``scheduler/``) or a full model folder; default: the shipped model.
        seeds: sampling seeds (one image per caption and seed).
        steps: DDIM steps.
        guidance: classifier-free guidance.
        device: torch device.
    """
    res = canvas_pretrain.evaluate_base(model_folder, seeds=seeds, steps=steps, guidance=guidance, device=device)
    print(json.dumps(res, indent=2))
    print(f"style {res['style_accuracy']:.1f}  object {res['object_accuracy']:.1f}  neutral {res['neutral_accuracy']:.1f}"
          f"  ({res['n_images']} images, DDIM {steps}, guidance {guidance})")  # fmt: skip


def train_classifier(kind: Literal["style", "object", "both"] = "both", steps: int = 500, seed: int = 0,
                     out: Path | None = None) -> None:  # fmt: skip
    """Train the Canvas-mini style and/or object classifier used by the evaluation.

    Args:
        kind: ``style``, ``object`` or ``both``.
        steps: optimizer steps (batch 128 of fresh, augmented drawings).
        seed: random seed.
        out: output folder (default: the shipped classifiers' folder).
    """
    for k in ["style", "object"] if kind == "both" else [kind]:
        _, result = classifiers.train_classifier(k, steps=steps, seed=seed, out_dir=out or classifiers.DEFAULT_DIR)
        print(json.dumps({"kind": k, **result}, indent=2))


COMMANDS = {"benchmark": benchmark, "pretrain": canvas_pretrain.pretrain, "evaluate-base": evaluate_base,
            "train-classifier": train_classifier, "instrument": instrument, "speed": speed,
            "evaluation-speed": evaluation_speed, "fidelity": fidelity, "robustness": robustness, "smoke": smoke}
