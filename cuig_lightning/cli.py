"""``cuig``: one command line. ``fit`` / ``evaluate`` / ``export`` are LightningCLI subcommands
(:mod:`cuig_lightning.lightning_cli`); ``benchmark``, ``pretrain``, ``evaluate-base``, ``train-classifier``
and ``instrument`` are typed functions (:mod:`cuig_lightning.commands`). ``cuig --help`` lists them all;
``cuig CMD --help`` shows each one's arguments.

``cuig evaluate|export --run_dir DIR ...`` needs no config: the run's saved config (``job.json``) is used,
and further ``--trainer.evaluation.*`` (or other non-identity) options override it.

Failures a user can cause and fix (bad config or requests, foreign or busy run folder, corrupt checkpoint,
missing model, non-finite loss, full disk, a cluster refusing the benchmark's jobs) end with one
``cuig: error: ...`` line and exit status 2; ``CUIG_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

import yaml
from jsonargparse import ArgumentError, CLI
from lightning.fabric.utilities.exceptions import MisconfigurationException

from cuig_lightning.benchmark.slurm import SlurmError
from cuig_lightning.checkpoints import CheckpointError
from cuig_lightning.commands import COMMANDS
from cuig_lightning.lightning_cli import run_cuig_cli
from cuig_lightning.models.diffusion import ModelLoadError
from cuig_lightning.module import NonFiniteLossError
from cuig_lightning.requests import RequestError
from cuig_lightning.run_folder import RunFolderError, saved_config

# Failures a user can cause and fix; anything else keeps its traceback.
KNOWN_ERRORS = (RequestError, RunFolderError, CheckpointError, ModelLoadError, NonFiniteLossError, ArgumentError,
                MisconfigurationException, OSError, ValueError, SlurmError)
_MAX_MESSAGE = 600


def one_line(err: BaseException) -> str:
    """The whole reason of an error on one line (jsonargparse puts it on the lines after 'Parser key "...":')."""
    parts = [line.strip().lstrip("-").strip() for line in str(err).splitlines() if line.strip()]
    if not parts:
        return type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in parts[0]:
        parts[0] = f"{parts[0]} ({err.filename})"
    head, rest = parts[0], "; ".join(parts[1:])
    message = f"{head} {rest}" if head.endswith(":") and rest else "; ".join(parts)
    return message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 1] + "…"


def _option(argv: list[str], name: str) -> tuple[str | None, list[str]]:
    """The value of ``--name VALUE`` / ``--name=VALUE`` in ``argv`` and ``argv`` without it."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


class ConfigFileError(ValueError):
    """A ``--config`` file that is not a YAML mapping of keys (empty, binary, unparsable, a list)."""


def check_config_files(argv: list[str]) -> None:
    """Every existing file given as ``--config FILE`` / ``--config=FILE`` must be UTF-8 YAML holding a mapping
    of keys; otherwise :class:`ConfigFileError` names the file and what is wrong with it (jsonargparse says
    "Unexpected config:" for an empty file, and nothing about which file for a binary one). Missing files
    are left to the parser, which names them."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--config="):
            name = arg.split("=", 1)[1]
        else:
            continue
        if not os.path.isfile(name):
            continue
        with open(name, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigFileError(f"config file {name} is not a UTF-8 text file (byte {data[err.start]:#04x} at "
                                  f"position {err.start}); give a YAML file") from None
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigFileError(f"config file {name} is not valid YAML: "
                                  f"{getattr(err, 'problem', None) or one_line(err)}{where}") from None
        if parsed is None:
            raise ConfigFileError(f"config file {name} is empty (no config keys in it)")
        if not isinstance(parsed, dict):
            raise ConfigFileError(f"config file {name} holds a {type(parsed).__name__}, not a mapping of config keys")


def from_run_folder(argv: list[str], scratch: str) -> list[str]:
    """``evaluate|export --run_dir DIR REST`` -> ``evaluate|export --config <DIR's saved config>
    --trainer.run_dir DIR REST``; other command lines unchanged."""
    if not argv or argv[0] not in ("evaluate", "export"):
        return argv
    run_dir, rest = _option(argv[1:], "--run_dir")
    if run_dir is None:
        return argv
    config_file = os.path.join(scratch, "job.yaml")
    with open(config_file, "w") as f:
        yaml.safe_dump(saved_config(run_dir), f, sort_keys=False)
    return [argv[0], "--config", config_file, "--trainer.run_dir", run_dir, *rest]


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    argv = sys.argv[1:] if args is None else list(args)
    try:
        check_config_files(argv)
        uses_run_dir = bool(argv) and argv[0] in ("evaluate", "export") and _option(argv, "--run_dir")[0] is not None
        with tempfile.TemporaryDirectory(prefix="cuig-") if uses_run_dir else contextlib.nullcontext() as scratch:
            if argv and argv[0] in COMMANDS:
                CLI(COMMANDS[argv[0]], args=argv[1:], as_positional=False, prog=f"cuig {argv[0]}", exit_on_error=False)
            else:
                cli_args = from_run_folder(argv, scratch)
                # LightningCLI reads sys.argv itself unless the command line was given or rewritten
                run_cuig_cli(args=None if args is None and cli_args is argv else cli_args, commands=COMMANDS)
    except KNOWN_ERRORS as err:
        if os.environ.get("CUIG_DEBUG"):
            raise
        print(f"cuig: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
