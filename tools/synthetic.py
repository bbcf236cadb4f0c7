"""Write a synthetic preference task with known reward distributions (minqr/data/synthetic.py) into a folder.

    python tools/synthetic.py --out runs/tasks/shifted --variant shifted
    python tools/train.py --model runs/tasks/shifted/model --data runs/tasks/shifted/train.jsonl \
        --eval-data runs/tasks/shifted/test.jsonl --out runs/shifted-mixture ...

`tools/train.py --demo` makes the "demo" variant by itself; this is for the other variants, other
sizes and other seeds. The folder holds the data, the truth that score.py and analyze.py find, a
tokenizer and a tiny random GPT-2 to train from.
"""
import click

from minqr.data.synthetic import TASK_VARIANTS, make_synthetic_task
from minqr.errors import MinqrError


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (replaced as a whole).")
@click.option("--variant", default="demo", show_default=True, type=click.Choice(tuple(TASK_VARIANTS)),
              help="demo: the offline demo's task; shifted: other group shares (75/25), wider personal "
                   "deviations and more controversial tags.")
@click.option("--num-train", default=40_000, show_default=True, type=click.IntRange(min=1), help="Training pairs.")
@click.option("--num-test", default=1000, show_default=True, type=click.IntRange(min=1), help="Held-out pairs.")
@click.option("--seed", default=0, show_default=True, help="Seed of the data, the truth samples and the tiny model.")
def main(out, variant, num_train, num_test, seed):
    """Write a synthetic preference task (data, truth, tokenizer, tiny GPT-2) into --out."""
    try:
        folder = make_synthetic_task(out, num_train=num_train, num_test=num_test, seed=seed, variant=variant)
    except MinqrError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote the {variant} task into {folder}")


if __name__ == "__main__":
    main()
