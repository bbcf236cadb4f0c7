"""Analyse scores files: the paper's Table 1, more measures, and figures, into one report folder.

    python tools/analyze.py runs/scalar/scores.npz runs/quantile/scores.npz --out report
    python tools/analyze.py *.npz --out report --view q0 --bins 100 --bootstrap 2000
    python tools/analyze.py synthetic/*.npz --out report --truth synthetic/test_truth.npz

Prints the path of report.md. The measures are minqr.study.analysis's; the report is minqr.study.report's.
"""
import click

from minqr.errors import MinqrError
from minqr.study.analysis import CONFIDENCE, DEFAULT_BINS, DEFAULT_EPS, DEFAULT_RESAMPLES, VIEWS_HELP
from minqr.study.report import analyze


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("scores", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report folder: created, or replaced if it holds an earlier report.")
@click.option("--view", default="mean", show_default=True,
              help=f"Which reward of a response the divergences compare: {VIEWS_HELP} (the N quantiles pooled).")
@click.option("--bins", default=DEFAULT_BINS, show_default=True, type=click.IntRange(min=1),
              help="Equal-width bins over the pooled range for the histogram KL and JS.")
@click.option("--eps", default=DEFAULT_EPS, show_default=True, type=click.FloatRange(min=0),
              help="Added to every bin's count before normalising (keeps log 0 away).")
@click.option("--bootstrap", "n_resamples", default=DEFAULT_RESAMPLES, show_default=True, type=click.IntRange(min=0),
              help="Bootstrap resamples of the pairs for the bias corrections and intervals (0: plug-in values only).")
@click.option("--confidence", default=CONFIDENCE, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Confidence level of every interval.")
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap resamples.")
@click.option("--truth", type=click.Path(dir_okay=False),
              help="A synthetic task's test_truth.npz for every scores file: adds quantile coverage "
                   "(default: the truth named in each file's metadata, if any).")
@click.option("--no-truth", is_flag=True, help="No coverage, even where a file's metadata names a truth file.")
def main(scores, out, view, bins, eps, n_resamples, confidence, seed, truth, no_truth):
    """Measure how far apart reward models put chosen and rejected responses (SCORES: .npz or .jsonl
    files written by tools/score.py) and write a report with tables and figures into --out."""
    if truth and no_truth:
        raise click.UsageError("--truth and --no-truth contradict each other; give one")
    try:
        report = analyze(list(scores), out, view=view, bins=bins, eps=eps, n_resamples=n_resamples,
                         confidence=confidence, seed=seed, truth=False if no_truth else truth)
    except MinqrError as error:
        raise click.ClickException(str(error)) from None
    click.echo(str(report))


if __name__ == "__main__":
    main()
