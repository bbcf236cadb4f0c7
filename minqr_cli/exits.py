"""How a minqr command ends: its exit status, and which process says why.

click's own `main` ends a Ctrl-C with "Aborted!" and status 1, wherever it lands. minqr's commands
(`MinqrCommand`, and the `minqr` group, `MinqrGroup`) end it with status 130, the shell's 128 +
SIGINT, whether it lands while the command starts (reading data, loading a model) or while it
trains (minqr/training/interrupt.py finishes the step first).

Under torchrun every process parses the same options and builds the same config, so a mistake in
them would be printed once per process. Those errors (click's usage errors, config files included,
and `OptionsError`, a config's own checks) are printed by process 0 only; every process still
exits with the error's status. Other errors may differ between processes and each prints its own.
torchrun itself then reports the failed processes, with a traceback of its own (ChildFailedError)
that no child can prevent while it exits non-zero.
"""
import os
import sys

import click

INTERRUPTED = 130


class OptionsError(click.ClickException):
    """The options, taken together, are refused by the config's checks (exit status 1)."""


class _Ending:
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            status = super().main(args, prog_name, complete_var, False, **extra)
        except (click.Abort, KeyboardInterrupt) as stop:
            if isinstance(stop, click.Abort) and not isinstance(stop.__cause__, KeyboardInterrupt):
                click.echo("Aborted!", err=True)  # click's end of an aborted prompt (EOF)
                sys.exit(1)
            click.echo("Stopped: interrupted (Ctrl-C)", err=True)
            sys.exit(INTERRUPTED)
        except click.ClickException as error:
            if process_0() or not isinstance(error, (click.UsageError, OptionsError)):
                error.show()
            sys.exit(error.exit_code)
        sys.exit(status if isinstance(status, int) else 0)


def process_0() -> bool:
    """Whether this is process 0 of a torchrun job, or no torchrun job (torchrun sets RANK)."""
    return os.environ.get("RANK", "0") == "0"


class MinqrCommand(_Ending, click.Command):
    pass


class MinqrGroup(_Ending, click.Group):
    pass
