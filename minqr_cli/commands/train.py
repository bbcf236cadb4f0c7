"""`minqr train`: tools/train.py as a subcommand (minqr/training/loop.py does the work)."""
import sys

import click

from minqr.errors import MinqrError
from minqr.training.config import RUN_FACTS, TrainConfig
from minqr.training.interrupt import TrainingInterrupted
from minqr.training.loop import train as train_model
from minqr_cli.exits import OptionsError
from minqr_cli.options import config_command


@config_command(TrainConfig, ignored_keys=RUN_FACTS)
def train(options, given):
    """Train a scalar or quantile (distributional) reward model on preference pairs."""
    try:
        # only the options the user gave: --demo fills the others with its own defaults
        config = TrainConfig.from_options(**given)
    except MinqrError as error:  # the same in every process: under torchrun, process 0 says it
        raise OptionsError(str(error)) from None
    try:
        summary = train_model(config)
    except TrainingInterrupted as error:  # the shell's status for the signal: 128 + 2 (Ctrl-C), 128 + 15 (SIGTERM)
        click.echo(f"Stopped: {error}", err=True)
        sys.exit(error.status)
    if summary.rank == 0:  # under torchrun, once
        click.echo(str(summary))
