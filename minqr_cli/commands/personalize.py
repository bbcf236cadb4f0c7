"""`minqr personalize` (minqr/study/personalize.py does the work)."""
import click

from minqr.study.personalize import PersonalizeConfig, personalize as personalize_model
from minqr_cli.options import config_command


@config_command(PersonalizeConfig)
def personalize(options, given):
    """Compute the posterior over a mixture model's kinds of every annotator of --data (their
    labelled pairs; a file that names no annotators is one person's, --annotator) and save them with
    the model (annotators.json), so that score gives those annotators' rows their personal
    probability and rewards."""
    click.echo(str(personalize_model(**options)))
