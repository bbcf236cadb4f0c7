"""The `minqr` command: one subcommand a job, each a thin shell over the library.

    minqr train --head quantile --demo
    minqr score --model runs/demo/quantile --data runs/demo/demo-data/test.jsonl --out q.npz
    minqr analyze q.npz --out report
    minqr export --model runs/demo/quantile --scalar --out runs/demo/quantile-scalar
    minqr personalize --model runs/m --data labels.jsonl
    minqr synthetic --out runs/tasks/shifted --variant shifted
    minqr candidates --variant shifted --out runs/tasks/shifted-candidates
    minqr best-of-n --model runs/demo/quantile --data runs/tasks/shifted-candidates/candidates.jsonl --out c.jsonl
    minqr objectives-table runs/objectives/*/report/summaries.json --out table.md
    minqr serve --model runs/demo/mixture --statistic cvar:0.25 --group --port 5000

Each subcommand's options are its config dataclass's fields (minqr_cli/options.py); every one
also takes --config FILE. A subcommand parses, calls one library function, and prints its summary.
"""
import sys

import click

from minqr import __version__
from minqr.adapters.server import ServeConfig
from minqr.adapters.server import serve as serve_rewards
from minqr.adapters.best_of_n import BestOfNConfig, best_of_n_to_file
from minqr.errors import MinqrError
from minqr.study.personalize import PersonalizeConfig, personalize as personalize_model
from minqr.models.export import ExportConfig, export_scalar
from minqr.study.report import AnalyzeConfig, TableConfig, analyze, write_objectives_table
from minqr.study.scoring import ScoreConfig, score_to_file
from minqr.synthetic.candidates import CandidatesConfig, make_candidate_sets
from minqr.synthetic.folder import SyntheticConfig, make_synthetic_task
from minqr.training.config import RUN_FACTS, TrainConfig
from minqr.training.interrupt import TrainingInterrupted
from minqr.training.loop import train as train_model
from minqr_cli.exits import INTERRUPTED, MinqrGroup, OptionsError
from minqr_cli.options import CONTEXT, config_command


@config_command(TrainConfig, ignored_keys=RUN_FACTS)
def train(options, given):
    """Train a scalar or quantile (distributional) reward model on preference pairs."""
    try:
        # only the options the user gave: --demo fills the others with its own defaults
        config = TrainConfig.from_options(**given)
    except MinqrError as error:  # the same in every process: under torchrun, process 0 says it
        raise OptionsError(str(error)) from None
    try:
        summary = train_model(config)
    except TrainingInterrupted as error:  # Ctrl-C: the shell's convention for SIGINT, 128 + 2
        click.echo(f"Stopped: {error}", err=True)
        sys.exit(INTERRUPTED)
    if summary.rank == 0:  # under torchrun, once
        click.echo(str(summary))


@config_command(ScoreConfig)
def score(options, given):
    """Score every preference pair of --data with the reward model --model into the scores file
    --out: each response's N outputs, for analyze. Prints the pair accuracy (ranking by the mean of
    the outputs) and, for a quantile head, the accuracy of ranking by each quantile alone (a mixture's
    quantiles relative to --anchor-reply, without which they mean nothing and are not printed)."""
    click.echo(str(score_to_file(**options)))


@config_command(AnalyzeConfig, name="analyze")
def analyze_scores(options, given):
    """Measure how far apart reward models put chosen and rejected responses (SCORES: .npz or .jsonl
    files written by score) and write a report with tables and figures into --out: the paper's
    Table 1, more measures, and, against a synthetic task's truth, quantile coverage. Prints the
    path of report.md."""
    scores, out = options.pop("scores"), options.pop("out")
    click.echo(str(analyze(scores, out, **options)))


@config_command(ExportConfig)
def export(options, given):
    """Export the quantile reward model --model into --out in the form asked for. --scalar: a
    one-output model (GPT2ForSequenceClassification, LlamaForSequenceClassification, ...) whose
    reward is exactly the mean of the N quantiles, which transformers'
    AutoModelForSequenceClassification loads as it is."""
    config = ExportConfig(**options)
    folder = export_scalar(config.model, config.out, normalize=config.normalize)
    normalized = ", normalised by the reward statistics of its training" if config.normalize else ""
    click.echo(f"wrote {folder}: a one-output model whose reward is the mean of {config.model}'s outputs{normalized}")


@config_command(PersonalizeConfig)
def personalize(options, given):
    """Compute the posterior over a mixture model's kinds of every annotator of --data (their
    labelled pairs; a file that names no annotators is one person's, --annotator) and save them with
    the model (annotators.json), so that score gives those annotators' rows their personal
    probability and rewards."""
    click.echo(str(personalize_model(**options)))


@config_command(SyntheticConfig)
def synthetic(options, given):
    """Write a synthetic preference task with known reward distributions into --out: the data, the
    truth that score and analyze find, a tokenizer and a tiny random GPT-2 to train from."""
    config = SyntheticConfig(**options)
    folder = make_synthetic_task(config.out, num_train=config.num_train, num_test=config.num_test,
                                 seed=config.seed, variant=config.variant,
                                 labels_per_annotator=config.labels_per_annotator)
    click.echo(f"wrote the {config.variant} task into {folder}")


@config_command(CandidatesConfig)
def candidates(options, given):
    """Write candidate sets of the synthetic task into --out: prompts with K candidate replies each
    (the input of best-of-n) and each candidate's true reward distribution, for scoring a choice."""
    config = CandidatesConfig(**options)
    folder = make_candidate_sets(config.out, config.variant, config.num_prompts, config.num_candidates, config.seed)
    click.echo(f"wrote {config.num_prompts} prompts of {config.num_candidates} candidates of the {config.variant} "
               f"task into {folder}")


@config_command(BestOfNConfig, name="best-of-n")
def best_of_n(options, given):
    """Choose among each prompt's candidates in --data (JSON lines or Parquet records {prompt, candidates,
    reference}) by each --statistics of the reward distribution that --model gives them, relative to the
    group of candidates or a reference reply, and write the choices and every candidate's statistics to --out.
    Run again after a crash, the same command resumes."""
    click.echo(str(best_of_n_to_file(**options)))


@config_command(TableConfig)
def objectives_table(options, given):
    """Write the objectives table of the analyzed SUMMARIES (summaries.json files written by analyze)
    into --out: a row per workload and objective, each measure averaged over seeds."""
    click.echo(f"wrote {write_objectives_table(options['summaries'], options['out'])}")


@config_command(ServeConfig)
def serve(options, given):
    """Serve the reward model --model over HTTP: POST /get_reward with OpenRLHF's remote reward JSON
    ({"query": [...], "prompts": [...]}) answers {"rewards": [...]}, each query's --statistic of its
    reward distribution (relative to --reference-reply or to its --group for all but the mean);
    GET /health. Requests that arrive together are scored in one forward pass. Runs until SIGTERM
    or Ctrl-C, then answers the requests it has received and exits 0."""
    serve_rewards(ServeConfig(**options), ready=click.echo)
    click.echo("stopped")


@click.group("minqr", cls=MinqrGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", "-V", prog_name="minqr")
def main():
    """minqr: train and study reward models whose N outputs are the distribution of a response's
    reward over the people who judge it. `minqr COMMAND --help` explains each command."""


for command in (train, score, analyze_scores, export, personalize, synthetic, candidates, best_of_n,
                objectives_table, serve):
    main.add_command(command)
