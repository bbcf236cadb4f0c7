"""The `minqr` command: one subcommand a job, each a thin shell over the library, in a module of
its own here (train.py, score.py, ...).

    minqr train --head quantile --demo
    minqr score --model runs/demo/quantile --data runs/demo/demo-data/test.jsonl --out q.npz
    minqr analyze q.npz --out report
    minqr export --model runs/demo/quantile --scalar --out runs/demo/quantile-scalar
    minqr personalize --model runs/m --data labels.jsonl
    minqr synthetic --out runs/tasks/shifted --variant shifted
    minqr candidates --variant shifted --out runs/tasks/shifted-candidates
    minqr best-of-n --model runs/demo/quantile --data runs/tasks/shifted-candidates/candidates.jsonl --out c.jsonl
    minqr objectives-table runs/objectives/*/report/summaries.json --out table.md
    minqr serve --model runs/demo/mixture --statistic cvar:0.25 --group --port 5000

Each subcommand's options are its config dataclass's fields (minqr_cli/options.py); every one
also takes --config FILE. A subcommand parses, calls one library function, and prints its summary.

A subcommand's module is imported only when that subcommand runs: the library's modules import
torch, scipy and torch.distributed, seconds of start-up that `minqr --help`, `minqr --version`
and every other subcommand need not pay.
"""
import importlib

import click

from minqr import __version__
from minqr_cli.exits import MinqrGroup
from minqr_cli.options import CONTEXT

# name -> (its module here and the click command in it, the line `minqr --help` shows)
COMMANDS = {
    "train": ("train:train", "Train a reward model, scalar or distributional."),
    "score": ("score:score", "Score preference pairs into a scores file."),
    "analyze": ("analyze:analyze_scores", "Report how far apart models put chosen and rejected."),
    "export": ("export:export", "Export a quantile model's mean as a transformers model."),
    "personalize": ("personalize:personalize", "Save annotators' posteriors over a mixture's kinds."),
    "synthetic": ("synthetic:synthetic", "Write a synthetic task with known reward distributions."),
    "candidates": ("candidates:candidates", "Write the synthetic task's candidate sets and their truth."),
    "best-of-n": ("best_of_n:best_of_n", "Choose each prompt's candidate by its reward's statistics."),
    "objectives-table": ("objectives_table:objectives_table", "Tabulate analyzed summaries, averaged over seeds."),
    "serve": ("serve:serve", "Serve rewards over HTTP (OpenRLHF's remote reward model)."),
}


class LazyGroup(MinqrGroup):
    """The subcommands of COMMANDS, each imported when it is asked for."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, command = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), command)

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except click.exceptions.NoSuchCommand:  # click suggests from the commands loaded: none here
            raise click.exceptions.NoSuchCommand(click.utils.make_str(args[0]), possibilities=COMMANDS,
                                                 ctx=ctx) from None

    def format_commands(self, ctx, formatter):  # the table's lines: no subcommand is imported for --help
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in self.list_commands(ctx)])


@click.group("minqr", cls=LazyGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", "-V", prog_name="minqr")
def main():
    """minqr: train and study reward models whose N outputs are the distribution of a response's
    reward over the people who judge it. `minqr COMMAND --help` explains each command."""
