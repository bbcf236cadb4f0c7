"""`minqr best-of-n`: tools/best_of_n.py as a subcommand (minqr/adapters/best_of_n.py does the work)."""
import click

from minqr.adapters.best_of_n import BestOfNConfig, best_of_n_to_file
from minqr_cli.options import config_command


@config_command(BestOfNConfig, name="best-of-n")
def best_of_n(options, given):
    """Choose among each prompt's candidates in --data (JSON lines or Parquet records {prompt, candidates,
    reference}) by each --statistics of the reward distribution that --model gives them, relative to the
    group of candidates or a reference reply, and write the choices and every candidate's statistics to --out.
    Run again after a crash, the same command resumes."""
    click.echo(str(best_of_n_to_file(**options)))
