"""``cuig``: one command line. ``fit`` / ``evaluate`` / ``export`` are LightningCLI subcommands
(:mod:`cuig_lightning.lightning_cli`); ``benchmark``, ``pretrain``, ``evaluate-base`` and ``train-classifier``
are typed functions (:mod:`cuig_lightning.commands`). ``cuig --help`` lists them all; ``cuig CMD --help``
shows each one's arguments. Known failures (bad requests, foreign run folder, corrupt checkpoint, missing
model, NaN loss) end with one ``cuig: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import os
import sys

from jsonargparse import ArgumentError, CLI

from cuig_lightning.checkpoints import CheckpointError
from cuig_lightning.commands import COMMANDS
from cuig_lightning.lightning_cli import CuigCLI
from cuig_lightning.models.diffusion import ModelLoadError
from cuig_lightning.module import NonFiniteLossError
from cuig_lightning.requests import RequestError
from cuig_lightning.run_folder import RunFolderError

# Failures a user can cause and fix; anything else keeps its traceback. CUIG_DEBUG=1 shows tracebacks for all.
KNOWN_ERRORS = (RequestError, RunFolderError, CheckpointError, ModelLoadError, NonFiniteLossError, ArgumentError,
                FileExistsError, ValueError)


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv and argv[0] in COMMANDS:
            CLI(COMMANDS[argv[0]], args=argv[1:], as_positional=False, prog=f"cuig {argv[0]}")
        else:
            CuigCLI(args=args, commands=COMMANDS)
    except KNOWN_ERRORS as err:
        if os.environ.get("CUIG_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"cuig: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
