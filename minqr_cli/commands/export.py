"""`minqr export`: tools/export.py as a subcommand (minqr/models/export.py does the work)."""
import click

from minqr.models.export import ExportConfig, export_scalar
from minqr_cli.options import config_command


@config_command(ExportConfig)
def export(options, given):
    """Export the quantile reward model --model into --out in the form asked for. --scalar: a
    one-output model (GPT2ForSequenceClassification, LlamaForSequenceClassification, ...) whose
    reward is exactly the mean of the N quantiles, which transformers'
    AutoModelForSequenceClassification loads as it is."""
    config = ExportConfig(**options)
    folder = export_scalar(config.model, config.out, normalize=config.normalize, overwrite=config.overwrite)
    normalized = ", normalised by the reward statistics of its training" if config.normalize else ""
    click.echo(f"wrote {folder}: a one-output model whose reward is the mean of {config.model}'s outputs{normalized}")
