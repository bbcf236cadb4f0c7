"""`minqr analyze`: tools/analyze.py as a subcommand (minqr/study/report.py does the work)."""
import click

from minqr.study.report import AnalyzeConfig, analyze
from minqr_cli.options import config_command


@config_command(AnalyzeConfig, name="analyze")
def analyze_scores(options, given):
    """Measure how far apart reward models put chosen and rejected responses (SCORES: .npz or .jsonl
    files written by score) and write a report with tables and figures into --out: the paper's
    Table 1, more measures, and, against a synthetic task's truth, quantile coverage. Prints the
    path of report.md."""
    scores, out = options.pop("scores"), options.pop("out")
    click.echo(str(analyze(scores, out, **options)))
