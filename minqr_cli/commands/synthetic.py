"""`minqr synthetic`: tools/synthetic.py as a subcommand (minqr/synthetic/folder.py does the work)."""
import click

from minqr.synthetic.folder import SyntheticConfig, make_synthetic_task
from minqr_cli.options import config_command


@config_command(SyntheticConfig)
def synthetic(options, given):
    """Write a synthetic preference task with known reward distributions into --out: the data, the
    truth that score and analyze find, a tokenizer and a tiny random GPT-2 to train from."""
    config = SyntheticConfig(**options)
    folder = make_synthetic_task(config.out, num_train=config.num_train, num_test=config.num_test,
                                 seed=config.seed, variant=config.variant,
                                 labels_per_annotator=config.labels_per_annotator, overwrite=config.overwrite)
    click.echo(f"wrote the {config.variant} task into {folder}")
