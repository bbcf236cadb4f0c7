"""`minqr candidates`: tools/candidates.py as a subcommand (minqr/synthetic/candidates.py does the work)."""
import click

from minqr.synthetic.candidates import CandidatesConfig, make_candidate_sets
from minqr_cli.options import config_command


@config_command(CandidatesConfig)
def candidates(options, given):
    """Write candidate sets of the synthetic task into --out: prompts with K candidate replies each
    (the input of best-of-n) and each candidate's true reward distribution, for scoring a choice."""
    config = CandidatesConfig(**options)
    folder = make_candidate_sets(config.out, config.variant, config.num_prompts, config.num_candidates, config.seed,
                                 config.overwrite)
    click.echo(f"wrote {config.num_prompts} prompts of {config.num_candidates} candidates of the {config.variant} "
               f"task into {folder}")
