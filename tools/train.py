"""Train a reward model: `python tools/train.py --head quantile` (GPT-2 on HH-RLHF helpful-base).

    python tools/train.py --head quantile --demo              offline, a few minutes on a laptop CPU
    python tools/train.py --head scalar --out runs/scalar     the Bradley-Terry baseline
    python tools/train.py ... --resume                        continue an interrupted run
    torchrun --nproc_per_node 8 tools/train.py ...            several GPUs (or CPU processes)

The options, their defaults and help texts are minqr.training.loop.TrainConfig's fields; this file only
turns them into a command line.
"""
import sys
import types
import typing
from dataclasses import MISSING, fields

import click

from minqr.errors import MinqrError
from minqr.training.config import TrainConfig
from minqr.training.interrupt import TrainingInterrupted
from minqr.training.loop import train


def _option(f, hints):
    """One click option from one TrainConfig field."""
    name = "--" + f.name.replace("_", "-")
    kind = hints[f.name]
    if isinstance(kind, types.UnionType):  # `int | None`: an option whose default is worked out later
        (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
    help_text = f.metadata["help"]
    if kind is bool:
        # a field that defaults to True is switched off with --no-NAME (e.g. --no-shared-prefix)
        if f.default:
            return click.option(f"{name}/--no-{name[2:]}", f.name, default=True, help=help_text, show_default=True)
        return click.option(name, f.name, is_flag=True, default=False, help=help_text)
    click_type = click.Choice(f.metadata["choices"]) if f.metadata["choices"] else kind
    return click.option(name, f.name, type=click_type, default=f.default, help=help_text,
                        show_default=f.default is not None)


def config_options(command):
    hints = typing.get_type_hints(TrainConfig)
    for f in reversed(fields(TrainConfig)):
        assert f.default is not MISSING, f"TrainConfig.{f.name} needs a default for the command line"
        command = _option(f, hints)(command)
    return command


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@config_options
@click.pass_context
def main(ctx, **options):
    """Train a scalar or quantile (distributional) reward model on preference pairs."""
    # Only the options the user typed: --demo fills the others with its own defaults.
    given = {name: value for name, value in options.items()
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    try:
        summary = train(TrainConfig.from_options(**given))
    except TrainingInterrupted as error:  # Ctrl-C: the shell's convention for SIGINT, 128 + 2
        click.echo(f"Stopped: {error}", err=True)
        sys.exit(130)
    except MinqrError as error:
        raise click.ClickException(str(error)) from None
    if summary.rank == 0:  # under torchrun, once
        click.echo(str(summary))


if __name__ == "__main__":
    main()
