"""`minqr objectives-table`: tools/objectives_table.py as a subcommand (minqr/study/report.py does the work)."""
import click

from minqr.study.report import TableConfig, write_objectives_table
from minqr_cli.options import config_command


@config_command(TableConfig)
def objectives_table(options, given):
    """Write the objectives table of the analyzed SUMMARIES (summaries.json files written by analyze)
    into --out: a row per workload and objective, each measure averaged over seeds."""
    click.echo(f"wrote {write_objectives_table(options['summaries'], options['out'], options['overwrite'])}")
