"""Export a quantile reward model for tools that want one number per response.

    python tools/export.py --model runs/quantile --scalar --out runs/quantile-scalar

--scalar writes a one-output GPT2ForSequenceClassification whose reward is exactly the mean of the
N quantiles (the head's rows averaged: the mean of N linear maps of the same features), with the
tokenizer and training_args.json; transformers' AutoModelForSequenceClassification loads it as it
is. It is the only export for now, so it must be asked for by name; a scalar model is refused (it
is already one). For the quantiles themselves, load the quantile folder: its logits are the N
quantiles, and minqr.models.reward.quantile_band turns them into (reward, lower, upper).
"""
import click

from minqr.errors import MinqrError
from minqr.models.export import export_scalar


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--model", required=True, help="Quantile reward model folder (tools/train.py's --out), or a hub name.")
@click.option("--scalar", is_flag=True, help="Export as a one-output model: the mean of the quantiles.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder to write the exported model into (its model files are replaced).")
def main(model, scalar, out):
    """Export the reward model --model into --out in the form asked for (--scalar)."""
    if not scalar:
        raise click.ClickException("nothing to export: add --scalar (a one-output model whose reward is the "
                                   "mean of the quantiles), the only export for now")
    try:
        folder = export_scalar(model, out)
    except MinqrError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {folder}: a one-output model whose reward is the mean of {model}'s quantiles")


if __name__ == "__main__":
    main()
