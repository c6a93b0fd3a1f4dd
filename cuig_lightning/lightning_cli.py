"""The Lightning half of the ``cuig`` command line: LightningCLI over UnlearningModule, UnlearningData and
ContinualTrainer (``fit``, ``evaluate``, ``export``, methods of :class:`CuigTrainer`). The other commands
(:mod:`cuig_lightning.commands`) are listed in the same ``cuig --help``; :mod:`cuig_lightning.cli` dispatches.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Callable
from pathlib import Path

from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import Logger

from cuig_lightning.continual import ContinualTrainer
from cuig_lightning.data.anchors import UnlearningData
from cuig_lightning.evaluation.protocol import Evaluation
from cuig_lightning.evaluation.robustness_options import Attack, Relearn
from cuig_lightning.config_checks import check_classes, check_instances
from cuig_lightning.export import evaluate_request, export_request
from cuig_lightning.methods import Method
from cuig_lightning.module import UnlearningModule

DESCRIPTION = "cuig: continual concept unlearning for text-to-image diffusion models."

# The sections of a resolved config stored in job.json (run_folder.run_identity picks the keys that own the folder).
_JOB_SECTIONS = ("seed_everything", "trainer", "model", "data")


class CuigTrainer(ContinualTrainer):
    """The continual trainer plus cuig's extra subcommands."""

    def export(self, model: UnlearningModule, datamodule: UnlearningData | None = None,
               request: int | None = None, output: str = "export") -> None:
        """Write the model after a finished request as a diffusers folder (default: the last one).

        Args:
            request: 1-based request number in ``trainer.run_dir`` (default: the last finished request).
            output: folder to create; it must not exist yet.
        """
        path = export_request(model, self.run_dir, self.job_config or {}, request, Path(output))
        print(f"exported to {path}")


    def evaluate(self, model: UnlearningModule, datamodule: UnlearningData | None = None, request: int = -1,
                 attack: Attack | None = None, relearn: Relearn | None = None) -> None:
        """Evaluate a finished request of ``trainer.run_dir`` (UA / RA-I / RA-C), or the base model.

        Args:
            request: 1-based request number; -1 the last finished one; 0 the base model (style and
                object accuracy over the full grid).
            attack: run the soft-prompt attack and paraphrases on the request's erased concepts (ASR) with
                this budget (default: ``trainer.evaluation.attack``), e.g. ``--attack '{steps: 20}'``.
            relearn: run the relearning probe (relearn_UA) with these options (default:
                ``trainer.evaluation.relearn``).
        """
        evaluation = self.evaluation
        if evaluation is None and (attack is not None or relearn is not None):
            raise ValueError("the attack and the relearning probe need the run's evaluation section "
                             "(trainer.evaluation: retain sets, sampler, classifiers); this run has none")
        if evaluation is not None:
            evaluation.attack = attack or evaluation.attack
            evaluation.relearn = relearn or evaluation.relearn
        if evaluation is None:
            model_path = ((self.job_config or {}).get("model") or {}).get("model_path")
            if model_path != "canvas-mini":  # Canvas-mini's classifiers would score another model's images silently
                raise ValueError(f"trainer.evaluation is null for model {model_path}: give the evaluation section "
                                 "(classifier_kind, classifier files, retain sets)")
            evaluation = Evaluation()
        model.to(self.strategy.root_device)  # sample where training ran (a GPU when there is one)
        result = evaluate_request(model, self.run_dir, self.job_config or {}, evaluation, request)
        print(json.dumps(result, indent=2))


class CuigCLI(LightningCLI):
    """LightningCLI for fit / evaluate / export; ``commands`` (name -> typed function) are listed in the same
    help (they are run by :func:`cuig_lightning.cli.main`, not by this class)."""

    def __init__(self, args=None, run: bool = True, commands: dict[str, Callable] | None = None):
        self.commands = dict(commands or {})
        super().__init__(
            UnlearningModule,
            UnlearningData,
            trainer_class=CuigTrainer,
            save_config_callback=None,
            seed_everything_default=42,
            # no prefix matching: `--trainer.max_step 3` is an error, not max_steps
            parser_kwargs={"exit_on_error": False, "description": DESCRIPTION, "allow_abbrev": False,
                           **{name: {"allow_abbrev": False} for name in self.subcommands()}},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "datamodule", "train_dataloaders", "val_dataloaders"},
                "export": {"model", "datamodule"},
                "evaluate": {"model", "datamodule"}}

    def _add_subcommands(self, parser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        for name, fn in self.commands.items():
            sub = ArgumentParser(description=fn.__doc__)
            sub.add_function_arguments(fn)
            parser._subcommands_action.add_subcommand(name, sub, help=(fn.__doc__ or "").strip().splitlines()[0])

    def before_instantiate_classes(self) -> None:
        # Nothing named by the config is imported into life before it is known to be a callback / logger
        # with arguments it accepts (a typo, or a `class_path: os.system`, is a one-line config error).
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_classes(config.get("trainer.callbacks"), Callback, "trainer.callbacks")
        check_classes(config.get("trainer.logger"), Logger, "trainer.logger")
        check_classes(config.get("model.method"), Method, "model.method")
        # a callback that refuses its own arguments (`k: 0`) is a config error here, not one inside Lightning
        check_instances(config.get("trainer.callbacks"), Callback, "trainer.callbacks")

    def _job_config(self) -> dict:
        config = (self.config[self.subcommand] if self.subcommand else self.config).as_dict()
        return json.loads(json.dumps({k: config.get(k) for k in _JOB_SECTIONS}, default=str))

    def before_fit(self) -> None:
        self.trainer.job_config = self._job_config()

    before_export = before_evaluate = before_fit


def run_cuig_cli(args: list[str] | None = None, commands: dict[str, Callable] | None = None) -> None:
    """Run one ``fit`` / ``evaluate`` / ``export`` command line in a copy of the current context.

    jsonargparse (4.53) sets a context variable to the last parser it used without resetting it
    (``subclass_arg_context``); that parser holds the CLI, so the command's model and trainer stayed alive after it
    returned. A process that runs commands one after another (the benchmark's fits with ``jobs: 1``, ``cuig smoke``)
    then held one more model than it needed: 4-5 GB more at SD-1.5 size, on the GPU too. In a copied context the
    variable is dropped with the context when the command returns."""
    contextvars.copy_context().run(CuigCLI, args=args, commands=commands)
