"""Personal rewards of a trained model: whose labels, which posterior, where it is kept.

    minqr personalize --model runs/m --data labels.jsonl            # every annotator in the file
    minqr personalize --model runs/m --data alice.jsonl --annotator alice   # one person's labels
    minqr score --model runs/m --data test.jsonl --out s.npz         # rows of known annotators
    minqr score ... --annotator alice                                 # every row as alice
    minqr score ... --context bob.jsonl --annotator bob               # a new person, from their labels

One scoring pass over labelled pairs gives every annotator's posterior over the mixture's kinds
(minqr/distribution/personal.py). `personalize` keeps them with the model, in annotators.json
beside its config.json, which training also writes for the annotators of its training data.
`score` reads them: a row whose annotator is known (saved with the model, or labelled in
--context) gets the personal probability P_a(chosen ≻ rejected) and the personal posterior; other
rows get NaN. Without --annotator each row is its own annotator's, as the data names it; with it,
every row is that person's. A --context file that names no annotators is one person's labels,
named by --annotator.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from minqr.data.batching import TokenizedPairs, tokenize_pairs
from minqr.data.pairs import load_pairs
from minqr.device import DTYPES
from minqr.distribution.personal import ANNOTATORS_FILE, Annotators, check_personal, labelled_annotators, labellers
from minqr.distribution.scale import ScaleFit, fit_scale
from minqr.errors import MinqrError
from minqr.lock import holds_output
from minqr.models.reward import RewardModel, load_reward_model
from minqr.options import check_options, option
from minqr.study.scoring import DEFAULT_BATCH_SIZE, score_tokenized, text_length_limit


def annotators_of(model: RewardModel, tokenized: TokenizedPairs, annotator: str | None = None,
                  source: str = "the pairs", log_prior: torch.Tensor | None = None, fit_prior: bool = True,
                  **scoring) -> tuple[Annotators, ScaleFit | None]:
    """(posteriors, scale): the posteriors of the annotators of labelled pairs, from one scoring pass
    of `model` (`scoring`: score_tokenized's options), `annotator`, `log_prior` and `fit_prior` as
    labelled_annotators takes them; and where the labels put the kinds' scale
    (minqr/distribution/scale.py) when they name their annotators, else None."""
    head = model.head_config
    check_personal(head.objective, head.num_quantiles)
    chosen, rejected = score_tokenized(model, tokenized, **scoring)  # [P, N] each
    annotators = labelled_annotators(chosen, rejected, tokenized, annotator, source, log_prior, fit_prior)
    if tokenized.annotators is None:
        return annotators, None
    margins = None if tokenized.pair_margins is None else torch.tensor(tokenized.pair_margins)
    differences = torch.from_numpy(chosen).double() - torch.from_numpy(rejected).double()  # [P, N]
    return annotators, fit_scale(differences, torch.tensor(tokenized.annotators, dtype=torch.long),
                                 len(tokenized.annotator_ids), margins)


def save_annotators(model: RewardModel, pairs: TokenizedPairs, folder: Path, say,
                    annotators: Annotators | None, scale: ScaleFit | None) -> None:
    """After training: the posteriors of the annotators the training pairs name (`annotators`, from
    the run's pass over them; None for a head without kinds), saved beside the model in `folder`,
    and a line of where their labels put the scale.
    Pairs that name none, or a head without kinds, leave no annotators.json (one of the model the
    run replaced goes with it), and `say` tells which."""
    stale = folder / ANNOTATORS_FILE
    if pairs.annotators is None:
        if stale.exists():
            stale.unlink()
            say(f"removed {stale}: the annotators of the model this run replaced")
        return
    head = model.head_config
    try:
        check_personal(head.objective, head.num_quantiles)
    except MinqrError as error:  # only a mixture has kinds
        stale.unlink(missing_ok=True)
        say(f"note: the training data names {len(pairs.annotator_ids):,} annotators, but no posteriors are "
            f"saved: {error}")
        return
    annotators.save(folder)
    say(f"saved the posteriors of {len(annotators.ids):,} annotators of the training data in {stale}")
    say(annotators.describe_prior())
    say(scale.describe("the training pairs"))


@dataclass
class PersonalizeConfig:
    """The options of `minqr personalize`."""

    model: str = option(help="trained reward model folder (train's --out) with a mixture head; annotators.json is "
                        "written into it")
    data: str = option(help="labelled pairs: a .jsonl(.gz), Parquet or Arrow file, a folder laid out like hh-rlhf "
                       "(with --subset), or hf:NAME[:SPLIT]; each pair's annotator in its 'annotator' field")
    annotator: str | None = option(None, "the person whose labels --data holds, when it names no annotators")
    annotator_field: str | None = option(None, "the field of the annotators' ids [default: annotator]")
    subset: str | None = option(None, "subset of a folder given as --data")
    split: str = option("train", "split of a folder, hh-rlhf:SUBSET or hf:NAME")
    max_length: int | None = option(None, "tokens kept of each text, cut from the left [default: the model's "
                                    "training --max-length, else its number of positions]", low=1)
    batch_size: int = option(DEFAULT_BATCH_SIZE, "pairs a batch", low=1)
    device: str = option("auto", "cpu, cuda, cuda:1, ...; auto: cuda when there is a GPU")
    dtype: str = option("auto", "compute precision; auto: bfloat16 autocast on GPU, float32 on CPU", DTYPES)
    skip_bad: bool = option(False, "skip malformed data lines and count them instead of stopping")
    overwrite: bool = option(False, "replace the saved posteriors of annotators the model already knows", in_file=False)

    def __post_init__(self):
        check_options(self)  # every range and choice the fields declare


@dataclass
class PersonalizeSummary:
    folder: Path
    data_line: str
    added: int
    replaced: int
    known: int
    pairs: int = 0  # labelled pairs read
    scale: ScaleFit | None = None  # where the data's labels put the kinds' scale; None for one person's
    prior: str = ""  # Annotators.describe_prior of what was saved

    def __str__(self) -> str:
        text = (f"{self.data_line}\nposteriors of {self.added:,} new and {self.replaced:,} known annotators; the model "
                f"knows {self.known:,}: wrote {self.folder / 'annotators.json'}\n{self.prior}")
        return text if self.scale is None else text + "\n" + self.scale.describe(f"the {self.pairs:,} pairs",
                                                                                 trained_on=False)


@holds_output("model", "--model")  # nobody else writes the model folder meanwhile (a training run holds it)
def personalize(model, data, progress: bool = True, **options) -> PersonalizeSummary:
    """Compute the posteriors of the annotators of `data` with the model in folder `model` and save
    them with it (PersonalizeConfig's options). Annotators it knows already are refused unless
    `overwrite`."""
    config = PersonalizeConfig(model=model, data=data, **options)
    folder = Path(model).expanduser()
    if not folder.is_dir():
        state = "is a file" if folder.exists() else "does not exist"
        raise MinqrError(f"model {model} {state}: personalize writes annotators.json into the model's folder, so it "
                         "takes a local folder (train's --out)")
    reward_model, tokenizer, folder = load_reward_model(folder)
    head = reward_model.head_config
    check_personal(head.objective, head.num_quantiles)
    pairs, stats = load_pairs(data, config.split, config.subset, config.skip_bad, config.annotator_field)
    tokenized = tokenize_pairs(pairs, tokenizer, text_length_limit(reward_model, folder, config.max_length))
    known = Annotators.load(folder, head.num_quantiles)
    annotator = config.annotator  # a command line's "7" is the known integer id 7, as in score --annotator
    if annotator is not None and known is not None and known.resolve(annotator) is not None:
        annotator = known.resolve(annotator)
    # what the scoring pass would be refused for is said before it (it takes minutes on a large model)
    labelled = labellers(tokenized, annotator, str(data))
    replaced = [annotator for annotator in labelled if known is not None and annotator in set(known.ids)]
    if replaced and not config.overwrite:
        them = "annotator" if len(replaced) == 1 else "annotators"
        raise MinqrError(f"{folder} already holds the posteriors of {len(replaced):,} {them} of {data} (the first: "
                         f"{replaced[0]!r}): pass --overwrite to replace them with these")
    # the model's prior (its known annotators', uniform or fitted) is where these labels start, unless
    # they replace every annotator the model knows: then they are its population, and a prior is
    # fitted to them when they are many (Annotators.from_sums)
    fresh = known is None or set(known.ids) <= set(labelled)
    new, scale = annotators_of(reward_model, tokenized, annotator, str(data),
                               None if fresh else known.log_prior, fit_prior=fresh, batch_size=config.batch_size,
                               device=config.device, dtype=config.dtype, progress=progress,
                               model_name=f"the reward model {folder}")
    merged = new if known is None else known.merged(new)
    merged.save(folder)
    return PersonalizeSummary(folder, stats.summary(), len(new.ids) - len(replaced), len(replaced), len(merged.ids),
                              len(tokenized), scale, merged.describe_prior(kept=not fresh))
