"""`minqr score`: tools/score.py as a subcommand (minqr/study/scoring.py does the work)."""
import click

from minqr.study.scoring import ScoreConfig, score_to_file
from minqr_cli.options import config_command


@config_command(ScoreConfig)
def score(options, given):
    """Score every preference pair of --data with the reward model --model into the scores file
    --out: each response's N outputs, for analyze. Prints the pair accuracy (ranking by the mean of
    the outputs) and, for a quantile head, the accuracy of ranking by each quantile alone (a mixture's
    quantiles relative to --anchor-reply, without which they mean nothing and are not printed)."""
    click.echo(str(score_to_file(**options)))
