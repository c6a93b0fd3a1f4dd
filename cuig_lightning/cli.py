"""``cuig`` command line: LightningCLI over UnlearningModule, UnlearningData and ContinualTrainer.

``cuig fit --config FILE`` runs a whole continual job; other subcommands are methods of
:class:`CuigTrainer`. Known failures (bad requests, foreign run folder, corrupt checkpoint, missing
model, NaN loss) end with one ``cuig: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from cuig_lightning.checkpoints import CheckpointError
from cuig_lightning.continual import ContinualTrainer
from cuig_lightning.data.anchors import UnlearningData
from cuig_lightning.evaluation.protocol import Evaluation
from cuig_lightning.export import evaluate_request, export_request
from cuig_lightning.models.diffusion import ModelLoadError
from cuig_lightning.module import NonFiniteLossError, UnlearningModule
from cuig_lightning.requests import RequestError
from cuig_lightning.run_folder import RunFolderError

DESCRIPTION = (
    "cuig: continual concept unlearning for text-to-image diffusion models. Subcommands below; "
    "also `cuig pretrain` (train the Canvas-mini base model) and `cuig benchmark` (the paper's main table)."
)

# Sections of the config that decide what a run computes; their hash owns the run folder.
_OWNED_SECTIONS = ("seed_everything", "trainer", "model", "data")


class CuigTrainer(ContinualTrainer):
    """The continual trainer plus cuig's extra subcommands."""

    def export(self, model: UnlearningModule, datamodule: UnlearningData | None = None,
               request: int | None = None, output: str = "export") -> None:
        """Write the model after a finished request as a diffusers folder (default: the last one).

        Args:
            request: 1-based request number in ``trainer.run_dir`` (default: the last finished request).
            output: folder to create; it must not exist yet.
        """
        path = export_request(model, self.run_dir, self.config_text or "", request, Path(output))
        print(f"exported to {path}")


    def evaluate(self, model: UnlearningModule, datamodule: UnlearningData | None = None, request: int = -1) -> None:
        """Evaluate a finished request of ``trainer.run_dir`` (UA / RA-I / RA-C), or the base model.

        Args:
            request: 1-based request number; -1 the last finished one; 0 the base model (style and
                object accuracy over the full grid).
        """
        result = evaluate_request(model, self.run_dir, self.config_text or "", self.evaluation or Evaluation(),
                                  request)
        print(json.dumps(result, indent=2))


class CuigCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        super().__init__(
            UnlearningModule,
            UnlearningData,
            trainer_class=CuigTrainer,
            save_config_callback=None,
            seed_everything_default=42,
            parser_kwargs={"exit_on_error": False, "description": DESCRIPTION},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "datamodule", "train_dataloaders", "val_dataloaders"},
                "export": {"model", "datamodule"},
                "evaluate": {"model", "datamodule"}}

    def _owned_config_text(self) -> str:
        config = self.config[self.subcommand] if self.subcommand else self.config
        owned = config.clone()
        for key in list(owned.keys()):
            if key.split(".")[0] not in _OWNED_SECTIONS:
                del owned[key]
        return json.dumps(owned.as_dict(), sort_keys=True, default=str)

    def before_fit(self) -> None:
        self.trainer.config_text = self._owned_config_text()

    before_export = before_evaluate = before_fit


# Failures a user can cause and fix; anything else keeps its traceback. CUIG_DEBUG=1 shows tracebacks for all.
KNOWN_ERRORS = (RequestError, RunFolderError, CheckpointError, ModelLoadError, NonFiniteLossError, ArgumentError,
                FileExistsError, ValueError)


# Commands that are not Trainer stages have their own module and parser.
STANDALONE = {"benchmark": "cuig_lightning.benchmark", "pretrain": "cuig_lightning.pretrain"}


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv and argv[0] in STANDALONE:
            import importlib

            importlib.import_module(STANDALONE[argv[0]]).main(argv[1:])
        else:
            CuigCLI(args=args)
    except KNOWN_ERRORS as err:
        if os.environ.get("CUIG_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"cuig: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
