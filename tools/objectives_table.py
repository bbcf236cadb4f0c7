"""The objectives table: one row per workload and objective, each measure averaged over seeds.

    python tools/objectives_table.py runs/objectives/*/report/summaries.json --out docs/objectives/table.md

Reads the summaries.json that tools/analyze.py writes (one or several reports) and writes the table
of minqr.study.report.objectives_table: accuracy and held-out NLL against the Bayes-optimal model,
coverage error and spread ρ against the known truth, ECE, spread AUROC and the paper's histogram KL.
`make objectives` runs the whole study that fills it.
"""
import json
from pathlib import Path

import click

from minqr.atomic import atomic_file
from minqr.study.report import objectives_table


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("summaries", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Markdown file to write.")
def main(summaries, out):
    """Write the objectives table of the analyzed SUMMARIES (summaries.json files) into --out."""
    rows = []
    for path in summaries:
        try:
            rows += json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise click.ClickException(f"{path} is not a summaries.json written by tools/analyze.py ({error})")
    with atomic_file(Path(out)) as tmp:
        tmp.write_text(objectives_table(rows) + "\n")
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
