"""A training run's inputs: the model folder and the data files the options name (hub names
fetched), and the data read and tokenised, with what was dropped and what was cut said.

Every input that cannot be had is named at once, so that a run with a wrong --model and a wrong
--data fails once, not twice.
"""
from pathlib import Path

from minqr import hub
from minqr.data.batching import TokenizedPairs, tokenize_pairs
from minqr.data.chat import rendering_note
from minqr.data.pairs import names_one_split, read_pairs, resolve_source
from minqr.errors import MinqrError
from minqr.training.config import TrainConfig

TRUNCATION_WARNING = (". Warning: most texts lose their beginning, and what a response answers may be cut away; "
                      "raise --max-length if the model's positions allow")


def resolve_inputs(config: TrainConfig, say) -> tuple:
    """(model folder, training data file, held-out data file or None): local paths, hub names
    fetched. Every input that cannot be had is named, all in one message."""

    def data_file(source, split):
        subset = None if Path(source).expanduser().is_file() else config.subset
        return resolve_source(source, split, subset)

    # a file, or hf:NAME:SPLIT, has no test split beside it to evaluate on unless --eval-data names one
    eval_source = config.eval_data or (None if names_one_split(config.data) else config.data)
    eval_option = "--eval-data" if config.eval_data else "--data (its test split)"
    wanted = [("--model", lambda: hub.fetch_model(config.model)),
              ("--data", lambda: data_file(config.data, "train")),
              (eval_option, (lambda: data_file(eval_source, "test")) if eval_source else lambda: None)]
    found, problems = [], []
    for option, fetch in wanted:
        try:
            found.append(fetch())
        except MinqrError as error:
            problems.append(f"{option}: {error}")
    if len(problems) == 1:
        raise MinqrError(problems[0])
    if problems:
        raise MinqrError(f"{len(problems)} inputs cannot be had:\n  " + "\n  ".join(problems))
    if eval_source is None:
        say("no held-out data (--eval-data): no evaluation, and no reward mean/std for the saved config")
    return tuple(found)


def load_pairs(source, split: str, tokenizer, config: TrainConfig, say) -> TokenizedPairs:
    """Read and tokenise one data source (a file or an hf: split); say what was dropped and what was cut."""
    pairs, stats = read_pairs(source, skip_bad=config.skip_bad, annotator_field=config.annotator_field)
    if split == "train" and config.annotator_field is not None and pairs[0].annotator is None:
        raise MinqrError(f"--annotator-field {config.annotator_field}: no pair of --data has that field, the "
                         "annotators' ids; drop the option, or name the field the data has")
    say(f"{split}: {stats.summary()}")
    tokenized = tokenize_pairs(pairs, tokenizer, config.max_length)
    note = rendering_note(pairs, tokenizer.chat_template)
    if note:  # once they are: a template that refuses a conversation has stopped the run by now
        say(f"{split}: {note}")
    ending = tokenized.ending_in_pad()
    if ending:
        say(f"{split}: note: {ending:,} texts end in the pad token (id {tokenized.pad_id}; without a pad token of its "
            "own the tokenizer pads with EOS, which the chat template writes at each turn's end): minqr reads their "
            "reward there, transformers' sequence classifiers one token earlier (they skip pad ids), so the saved "
            "model would score them otherwise there; give the tokenizer a pad token of its own (tokenizer_config.json "
            "pad_token) to make both agree")
    if tokenized.num_truncated:
        share = tokenized.num_truncated / len(tokenized)
        say(f"{split}: {tokenized.num_truncated:,} pairs ({share:.0%}) cut from the left to --max-length "
            f"{config.max_length}" + (TRUNCATION_WARNING if share > 0.5 else ""))
    return tokenized
