"""Score preference pairs with a reward model: every pair's N outputs into one scores file.

    python tools/score.py --model runs/quantile --data hh-rlhf:harmless-base --out scores.npz
    python tools/score.py --model runs/quantile --data DIR --subset helpful-base --split test --out s.npz
    python tools/score.py --model runs/demo/quantile --data runs/demo/demo-data/test.jsonl --out s.npz

Prints the pair accuracy (ranking by the mean of the outputs) and, for a quantile head, the
accuracy of ranking by each quantile alone. The work is minqr.study.scoring's; tools/analyze.py reads the file.
"""
import click

from minqr.device import DTYPES
from minqr.errors import MinqrError
from minqr.study.scoring import DEFAULT_BATCH_SIZE, DEFAULT_SPLIT, score_to_file


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--model", required=True, help="Reward model folder (tools/train.py's --out), or a hub name.")
@click.option("--data", required=True,
              help="Pairs: a .jsonl(.gz) file, a folder laid out like hh-rlhf (with --subset), or hh-rlhf:SUBSET.")
@click.option("--subset", help="Subset of a folder given as --data, e.g. harmless-base.")
@click.option("--split", help=f"Split of a folder or hh-rlhf:SUBSET [default: {DEFAULT_SPLIT}].")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Scores file to write: .npz (numpy) or .jsonl; replaced atomically.")
@click.option("--max-length", type=click.IntRange(min=1),
              help="Tokens kept of each text, cut from the left [default: the --max-length the model was "
                   "trained with (its training_args.json), else its number of positions].")
@click.option("--batch-size", default=DEFAULT_BATCH_SIZE, show_default=True, type=click.IntRange(min=1),
              help="Pairs a batch.")
@click.option("--shared-prefix/--no-shared-prefix", default=True, show_default=True,
              help="Run the common prefix of a pair's two texts once (same numbers, fewer tokens).")
@click.option("--device", default="auto", show_default=True,
              help="cpu, cuda, cuda:1, ...; auto: cuda when there is a GPU.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(tuple(DTYPES)),
              help="Compute precision; auto: bfloat16 autocast on GPU, float32 on CPU.")
@click.option("--skip-bad", is_flag=True, help="Skip malformed data lines and count them instead of stopping.")
@click.option("--anchor-reply", help="Also score this text as the reply to each pair's prompt; the analysis then "
                                     "reads every response's quantiles relative to it (a mixture head's kinds each "
                                     "have a free constant that only such a reference pins down).")
@click.option("--workload", help="Row label of the analysis table [default: FOLDER SPLIT of the data file, "
                                 "e.g. 'harmless-base test'].")
@click.option("--label", help="Column label of the analysis table [default: 'scalar', or the objective and N, e.g. 'mixture N=10'].")
def main(model, data, subset, split, out, max_length, batch_size, shared_prefix, device, dtype, skip_bad,
         anchor_reply, workload, label):
    """Score every preference pair of --data with the reward model --model into --out."""
    try:
        summary = score_to_file(model, data, out, split=split, subset=subset, workload=workload, label=label,
                                max_length=max_length, batch_size=batch_size, shared_prefix=shared_prefix,
                                device=device, dtype=dtype, skip_bad=skip_bad, anchor_reply=anchor_reply)
    except MinqrError as error:
        raise click.ClickException(str(error)) from None
    click.echo(str(summary))


if __name__ == "__main__":
    main()
