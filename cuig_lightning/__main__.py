"""``python -m cuig_lightning`` (what torchrun / srun call) is the ``cuig`` command."""

from cuig_lightning.cli import main

main()
