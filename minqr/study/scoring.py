"""Scoring: a trained reward model's outputs on every pair of a data set, into a scores file.

    chosen, rejected = score_pairs(model, tokenizer, pairs)      # [P, N] float32 each
    summary = score_to_file("runs/quantile", "hh-rlhf:harmless-base", "scores.npz")

Scoring reads each response's N outputs (N = 1 for a scalar head, the N quantiles of its reward
for a quantile head) and keeps them all: the analysis (minqr/study/analysis.py) needs the whole
distribution, not only the expected reward. Row p of both arrays is pair p of the data, in the
data's order, so that a truth file or a second model's scores line up pair by pair.

Speed: pairs are batched by width, widest first, so that little of a batch is padding (and a
batch too big for memory fails at once, not at the end); a pair's two dialogues share their
prefix, which is run once (minqr/data/batching.py); so do single texts (`score_texts`, what the server,
the adapters and best-of-N call) that share most of their tokens, a prompt's samples; no autograd
graph is kept (`torch.inference_mode`).
One thing is an approximation, and only by default on a GPU: the matrix products run in bfloat16
(autocast; the weights stay float32), which rounds the outputs to about three significant digits;
pass dtype="float32" for full precision.

"""
import time
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minqr.atomic import check_output_file
from minqr.data.batching import (MAX_TEXTS_A_ROW, TokenizedPairs, collate_texts, prefix_groups,
                                 scoring_batches, text_batches, tokenize_pairs)
from minqr.data.chat import rendering_note, reply_text
from minqr.data.pairs import check_encodable, load_pairs, names_one_split, read_pairs, resolve_source
from minqr.data.tables import HubSplit
from minqr.device import DTYPES, autocast, autocast_dtype, resolve_device
from minqr.distribution.personal import Annotators, check_personal, has_kinds, labelled_annotators, personal_scores
from minqr.errors import MinqrError
from minqr.lock import hold_output
from minqr.models.backbone import check_max_length
from minqr.models.reward import RewardModel, load_reward_model, reward_normalization, training_args
from minqr.objectives.pair_models import KINDS
from minqr.options import check_options, option
from minqr.progress import progress_bar
from minqr.study.accuracy import pair_accuracy, quantile_accuracy
from minqr.study.scores_file import file_sha256, save_scores
from minqr.synthetic.anchors import score_anchors
from minqr.synthetic.probe import backbone_probe
from minqr.synthetic.truth import truth_beside

DEFAULT_BATCH_SIZE = 16  # pairs a batch
DEFAULT_SPLIT = "test"


# ---- scoring -------------------------------------------------------------------------------

def score_tokenized(model: RewardModel, tokenized: TokenizedPairs, batch_size: int = DEFAULT_BATCH_SIZE,
                    shared_prefix: bool = True, device=None, dtype: str = "auto", progress: bool = True,
                    model_name: str = "the reward model") -> tuple[np.ndarray, np.ndarray]:
    """The model's outputs on tokenised pairs: (chosen [P, N], rejected [P, N]), float32, row p for
    pair p. `device` None keeps the model where it is; otherwise the model is moved there. The
    model runs in eval mode (no dropout) and is returned to its previous mode afterwards. A NaN or
    infinite output stops it at that batch: a MinqrError that calls `model_name` broken."""
    if batch_size < 1:
        raise MinqrError(f"batch_size must be at least 1 (got {batch_size})")
    longest = int(tokenized.row_widths(shared_prefix=False).max(initial=0))
    positions = model.transformer.config.max_positions
    if longest > positions:
        raise MinqrError(f"a text of {longest} tokens is longer than the model's {positions} positions: "
                         f"tokenise with max_length at most {positions}")
    device = next(model.parameters()).device if device is None else resolve_device(device)
    compute_dtype = autocast_dtype(dtype, device)
    chosen = np.empty((len(tokenized), model.num_quantiles), dtype=np.float32)
    rejected = np.empty_like(chosen)
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.inference_mode(), progress_bar(total=len(tokenized), unit="pair", desc="scoring",
                                                  disable=not progress) as bar:
            for indices in scoring_batches(tokenized.row_widths(shared_prefix), batch_size):
                batch = tokenized.batch(indices, shared_prefix).to(device)
                with autocast(device, compute_dtype):
                    r_chosen, r_rejected = model.forward_pairs(batch)  # [B, N] each
                # back to the data's order: batch row b is pair indices[b]
                chosen[indices] = r_chosen.float().cpu().numpy()
                rejected[indices] = r_rejected.float().cpu().numpy()
                _check_finite(chosen[indices], rejected[indices], indices, model_name)
                bar.update(len(indices))
    finally:
        model.train(was_training)
    return chosen, rejected


def _check_finite(chosen: np.ndarray, rejected: np.ndarray, indices, model_name: str) -> None:
    """A batch's outputs ([B, N] each, batch row b is pair indices[b]) must be numbers: a model that
    gives NaN gives it for every batch, so there is no use scoring on."""
    bad = ~(np.isfinite(chosen).all(axis=1) & np.isfinite(rejected).all(axis=1))
    if bad.any():
        what = "NaN" if np.isnan(chosen[bad]).any() or np.isnan(rejected[bad]).any() else "infinite"
        raise MinqrError(f"{model_name} is broken: it gives {what} rewards (first for pair {int(np.min(indices[bad]))} "
                         "of the data; scoring stopped at that batch, nothing was written). Its weights hold NaN or "
                         "inf: train it again (with a lower --lr?), or score another model")


def distinct_texts(token_lists) -> tuple[list, list]:
    """The distinct texts among `token_lists` and the row of each text among them: `where[i]` is the
    i-th text's."""
    unique = {}
    where = [unique.setdefault(tuple(tokens), len(unique)) for tokens in token_lists]
    return list(unique), where


@torch.inference_mode()
def score_texts(model: RewardModel, token_lists, batch_size: int = DEFAULT_BATCH_SIZE, device=None,
                dtype: str = "auto", pooled: bool = False, shared_prefix: bool = True,
                check_finite: bool = True) -> np.ndarray:
    """The model's raw outputs [M, N] for M single texts given as token lists (each at least one
    token), in their order; with `pooled`, the states its head reads instead, [M, n_embd]. At most
    `batch_size` texts a forward; texts that share a long prefix (a prompt's samples, a prompt and
    its reference reply) run it once (minqr/data/batching.py, TextBatch), unless `shared_prefix` is
    False; rows of similar width share a batch; eval mode, as score_tokenized. Identical texts are
    run once, so that they get identical outputs (where a text lands in a packed row can move the
    last bits, and best-of-N's ties go to the earliest of identical candidates). Outputs that are not
    finite are a MinqrError, unless `check_finite` is False (the server checks each request's own
    rows of a forward that several requests share)."""
    unique, where = distinct_texts(token_lists)
    out = _forward_texts(model, unique, batch_size, device, dtype, pooled, shared_prefix)[where]  # [M, width]
    broken = ~np.isfinite(out).all(axis=1) if check_finite else np.zeros(len(out), dtype=bool)
    if broken.any():  # every caller (the adapters, best-of-n, the anchors) stops here
        raise MinqrError(f"the reward model gives NaN or infinite outputs for {int(broken.sum())} of {len(out)} texts "
                         f"(the first: text {int(np.argmax(broken))}): its weights are broken, or the precision "
                         "overflows (try dtype float32)")
    return out


def _forward_texts(model: RewardModel, token_lists, batch_size: int, device, dtype: str, pooled: bool,
                   shared_prefix: bool) -> np.ndarray:
    """score_texts' forwards: the outputs [M, width] of distinct texts, in their order."""
    device = next(model.parameters()).device if device is None else resolve_device(device)
    compute_dtype = autocast_dtype(dtype, device)
    model_width = model.transformer.config.hidden_size
    width = model_width if pooled else model.num_quantiles
    out = np.empty((len(token_lists), width), dtype=np.float32)
    # a server calls this for every batch: moving the model or switching its mode only when needed
    # saves milliseconds a call (Module.to and .eval walk every submodule)
    was_training = model.training
    switch = any(module.training for module in model.modules())
    if next(model.parameters()).device != device:
        model.to(device)
    if switch:
        model.eval()
    if shared_prefix:
        groups = prefix_groups(token_lists, max_texts=min(MAX_TEXTS_A_ROW, batch_size))
    else:
        groups = [([i], 0) for i in range(len(token_lists))]
    try:
        for groups_of_batch in text_batches(token_lists, groups, batch_size):
            batch = collate_texts(token_lists, groups_of_batch, model_width=model_width).to(device)
            with autocast(device, compute_dtype):
                values = model.forward_texts(batch, pooled=pooled)  # [M', N] or [M', n_embd]
            out[batch.indices] = values.float().cpu().numpy()
    finally:
        if switch:
            model.train(was_training)
    return out


def score_pairs(model: RewardModel, tokenizer, pairs, max_length: int = 512, batch_size: int = DEFAULT_BATCH_SIZE,
                shared_prefix: bool = True, device=None, dtype: str = "auto",
                progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise `pairs` (minqr.data.pairs.Pair: texts cut from the left to `max_length` tokens) and score
    them: (chosen [P, N], rejected [P, N]), float32, in the order of `pairs`."""
    return score_tokenized(model, tokenize_pairs(pairs, tokenizer, max_length), batch_size, shared_prefix,
                           device, dtype, progress)


# ---- the whole job, for tools/score.py -------------------------------------------------------

@dataclass
class ScoreSummary:
    """What a scoring run found; str() is what tools/score.py prints."""

    out: Path
    data_line: str  # where the pairs came from and what was dropped (LoadStats.summary)
    num_pairs: int
    num_truncated: int
    max_length: int
    taus: list | None  # the quantile levels, None for a scalar head
    num_outputs: int
    accuracy: float  # ranking by the mean of the outputs; a tie counts half
    # [N] ranking by quantile k alone (per_quantile_accuracy); None where the quantiles mean nothing
    quantile_accuracy: list | None
    seconds: float
    device: str
    dtype: str
    notes: list = field(default_factory=list)

    def __str__(self) -> str:
        n = self.num_outputs
        lines = [
            self.data_line,
            f"scored {self.num_pairs:,} pairs in {self.seconds:.1f} s ({self.num_pairs / self.seconds:,.1f} pairs/s) "
            f"on {self.device}, {self.dtype}; {self.num_truncated:,} pairs cut from the left to "
            f"{self.max_length} tokens",
            f"pair accuracy (on the mean of the {n} outputs): {self.accuracy:.4f}" if n > 1
            else f"pair accuracy: {self.accuracy:.4f}",
        ]
        if self.taus is not None and self.quantile_accuracy is not None:
            lines.append("per-quantile accuracy (ranking by quantile k alone):")
            lines += [f"  q{k:<3} tau={tau:.3f}  {acc:.4f}"
                      for k, (tau, acc) in enumerate(zip(self.taus, self.quantile_accuracy))]
        return "\n".join(lines + self.notes + [f"wrote {self.out}"])


@dataclass
class ScoreConfig:
    """The options of a scoring job (`minqr score`, `score_to_file`)."""

    model: str = option(help="reward model folder (train's --out), or a hub name")
    data: str = option(help="pairs: a .jsonl(.gz), Parquet or Arrow file, a folder laid out like hh-rlhf (with "
                       "--subset), hh-rlhf:SUBSET, or a datasets hub name hf:NAME[:SPLIT] (the minqr[data] extra)")
    out: str = option(help="scores file to write: .npz (numpy) or .jsonl; replaced atomically")
    subset: str | None = option(None, "subset of a folder given as --data, e.g. harmless-base")
    split: str | None = option(None, f"split of a folder, hh-rlhf:SUBSET or hf:NAME [default: {DEFAULT_SPLIT}]")
    max_length: int | None = option(None, "tokens kept of each text, cut from the left [default: the --max-length "
                                    "the model was trained with (its training_args.json), else its number of "
                                    "positions]", low=1)
    batch_size: int = option(DEFAULT_BATCH_SIZE, "pairs a batch", low=1)
    shared_prefix: bool = option(True, "run the common prefix of a pair's two texts once (same numbers, fewer "
                                 "tokens)")
    device: str = option("auto", "cpu, cuda, cuda:1, ...; auto: cuda when there is a GPU")
    dtype: str = option("auto", "compute precision; auto: bfloat16 autocast on GPU, float32 on CPU", DTYPES)
    skip_bad: bool = option(False, "skip malformed data lines and count them instead of stopping")
    anchor_reply: str | None = option(None, "also score this text as the reply to each pair's prompt; the "
                                      "analysis then reads every response's quantiles relative to it (a mixture "
                                      "head's kinds each have a free constant that only such a reference pins "
                                      "down)")
    workload: str | None = option(None, "row label of the analysis table [default: FOLDER SPLIT of the data file, "
                                  "e.g. 'harmless-base test', and whose rows they are with --annotator or "
                                  "--context]")
    label: str | None = option(None, "column label of the analysis table [default: 'scalar', or the objective "
                               "and N, e.g. 'mixture N=10']")
    normalize: bool = option(False, "write (output - mean) / std: the mean and std of the expected reward that "
                             "training measured on its held-out pairs (config.json's reward_mean, reward_std); "
                             "the same map for every output, so quantiles stay quantiles")
    annotator_field: str | None = option(None, "the field of the annotators' ids in --data and --context [default: "
                                         "annotator]; rows of annotators the model knows get personal columns")
    annotator: str | None = option(None, "score every row as this annotator's (one the model knows, or the person "
                                   "whose labels --context holds): personal probability and rewards")
    context: str | None = option(None, "labelled pairs of people the model does not know (a file; its pairs name "
                                 "their annotators, or are all --annotator's): their posteriors, for this scoring")
    overwrite: bool = option(False, "replace --out if it exists", in_file=False)

    def __post_init__(self):
        """The checks that need nothing read, made before the lock beside --out makes any folder."""
        check_options(self)
        if self.anchor_reply is not None and not self.anchor_reply.strip():
            raise MinqrError("anchor_reply (--anchor-reply) is empty: give the text of a reply to align on, "
                             "e.g. ' OK.'")
        if self.anchor_reply is not None:
            check_encodable(self.anchor_reply, "anchor_reply (--anchor-reply)")
        if Path(self.out).suffix not in (".npz", ".jsonl"):
            raise MinqrError(f"out {self.out}: a scores file's name ends in .npz (numpy arrays) or .jsonl")
        if self.split is not None and Path(self.data).expanduser().is_file():
            raise MinqrError(f"split {self.split!r} picks a file in a folder, but {self.data} is a file; drop the "
                             "split")
        if self.split is not None and names_one_split(self.data):
            raise MinqrError(f"split {self.split!r} was given, but {self.data} names its split itself; drop one "
                             "of them")


def text_length_limit(model: RewardModel, folder, max_length: int | None) -> int:
    """The tokens kept of each text (cut from the left): `max_length`, else the --max-length the
    model in `folder` was trained with (its training_args.json; no folder: none), else its number
    of positions."""
    positions = model.transformer.config.max_positions
    if max_length is None:
        trained = training_args(folder).get("max_length", positions) if folder is not None else positions
        max_length = min(trained, positions)
    check_max_length(model.transformer, max_length)
    return max_length


def score_to_file(model, data, out, progress: bool = True, **options) -> ScoreSummary:
    """Score the pairs of `data` with the reward model in folder `model` and write them to `out`
    (.npz or .jsonl, atomically) with the metadata that minqr/study/analysis.py reads. `options`
    are ScoreConfig's other fields.

    `data`: a .jsonl(.gz), Parquet or Arrow file, a folder laid out like hh-rlhf (with `subset`;
    `split`, default "test", picks the file), hh-rlhf:SUBSET, or hf:NAME[:SPLIT] (minqr/data/pairs.py).
    `max_length` defaults to the one the model was trained with (its training_args.json), else its
    number of positions. `workload` (the row of the report's table) defaults to "FOLDER SPLIT" of the
    data file, e.g. "harmless-base test" (for hf:NAME, "NAME SPLIT").

    Anchors: with `anchor_reply`, that text is scored as the reply to each pair's prompt, and its
    outputs are saved beside the scores (the analysis reads the quantiles relative to them); without
    it, the synthetic task's anchor replies are, where its truth file lies beside the data.
    """
    options = ScoreConfig(model=model, data=data, out=out, **options)
    with hold_output(out):  # one job at a time writes a scores file (minqr/lock.py)
        return _score_to_file(options, progress)


def _score_to_file(options: ScoreConfig, progress: bool) -> ScoreSummary:
    model, data, out = options.model, options.data, Path(options.out)
    split, subset, batch_size, dtype = options.split, options.subset, options.batch_size, options.dtype
    check_output_file(out, overwrite=options.overwrite, what="a scores file (.npz or .jsonl)",
                      inputs=(("--data", data), ("--context", options.context)))
    source = resolve_source(data, split or DEFAULT_SPLIT, subset)
    if not isinstance(source, HubSplit):  # the file a folder's split names, and the task's truth beside it
        check_output_file(out, overwrite=options.overwrite, what="a scores file (.npz or .jsonl)",
                          inputs=(("the file --data names", source), ("the truth beside --data", truth_beside(source))))
    reward_model, tokenizer, folder = load_reward_model(model)
    if options.normalize:
        mean, std = reward_normalization(reward_model, folder)
    max_length = text_length_limit(reward_model, folder, options.max_length)
    pairs, stats = read_pairs(source, skip_bad=options.skip_bad, annotator_field=options.annotator_field)
    tokenized = tokenize_pairs(pairs, tokenizer, max_length)
    context = None
    if options.context is not None:
        context_pairs, _ = load_pairs(options.context, skip_bad=options.skip_bad,
                                      annotator_field=options.annotator_field)
        context = tokenize_pairs(context_pairs, tokenizer, max_length)

    device = resolve_device(options.device)
    started = time.perf_counter()
    chosen, rejected = score_tokenized(reward_model, tokenized, batch_size, options.shared_prefix, device, dtype,
                                       progress, model_name=f"the reward model {folder}")
    seconds = time.perf_counter() - started

    head_config = reward_model.head_config
    if isinstance(source, HubSplit):
        data_file, split_name, data_set, truth = source.label, source.split, source.name, None
    else:
        # test.jsonl -> "test", test.jsonl.gz -> "test": for a folder this is the split it was read for
        data_file, split_name, data_set = source, source.name.split(".")[0], source.parent.name
        truth = truth_beside(source)
    compute_dtype = str(autocast_dtype(dtype, device)).removeprefix("torch.")
    metadata = {
        "model": str(model), "model_path": str(folder), "head": head_config.head,
        "objective": head_config.objective, "readout": head_config.readout,
        "taus": head_config.levels if head_config.head == "quantile" else None,
        "data": str(data), "data_file": str(data_file), "subset": subset, "split": split_name,
        "workload": options.workload or f"{data_set} {split_name}{_whose(options)}",
        "options": {"max_length": max_length, "shared_prefix": options.shared_prefix, "batch_size": batch_size,
                    "dtype": compute_dtype, "device": str(device), "skip_bad": options.skip_bad},
        "num_truncated": tokenized.num_truncated, "data_summary": stats.summary(),
    }
    if options.label:
        metadata["label"] = options.label
    if options.annotator is not None:
        metadata["annotator"] = options.annotator  # every row as this person's
    if options.context is not None:
        metadata["context"] = str(options.context)  # the labelled pairs of people new to the model
    notes, anchor = [note for note in [rendering_note(pairs, tokenizer.chat_template)] if note], None
    if truth is not None and truth.is_file():
        dropped = stats.identical + stats.malformed_lines + stats.bad_fields
        if options.anchor_reply is not None:  # the truth is relative to the task's anchor reply, worth 0
            notes.append(f"note: {truth} not recorded as the truth: --anchor-reply replaces the task's own anchor "
                         "reply (worth 0 to everyone), which the truth's rewards are relative to; score without "
                         "--anchor-reply to compare with the truth")
        elif dropped:
            notes.append(f"note: {truth} not recorded as the truth: {dropped} lines of {data_file} were dropped, "
                         "so its rows no longer line up with the pairs")
        else:
            metadata["truth"] = str(truth.resolve())
            metadata["truth_sha256"] = file_sha256(truth)  # a task made again in its place is another truth
            run = partial(score_texts, reward_model, batch_size=batch_size, device=device, dtype=dtype)
            anchor = score_anchors(run, tokenizer, truth, len(pairs), max_length)
            responses = tokenized.chosen + tokenized.rejected
            metadata["backbone_probe"] = backbone_probe(partial(run, pooled=True), responses, truth, len(pairs))
    if options.anchor_reply is not None:
        texts = [reply_text(pair, options.anchor_reply, tokenizer.chat_template) for pair in pairs]
        anchor = score_texts(reward_model, tokenizer.encode_batch(texts, max_length), batch_size, device, dtype)
        metadata["anchor_reply"] = options.anchor_reply
    known = saved = None
    if context is not None:
        check_personal(head_config.objective, head_config.num_quantiles)
    if has_kinds(head_config.objective, head_config.num_quantiles) and (
            context is not None or options.annotator is not None or tokenized.annotators is not None):
        saved = Annotators.load(folder, head_config.num_quantiles)  # read once: the prior and the posteriors agree
    if context is not None:  # the posteriors of the people it labels, from one more scoring pass
        outputs = score_tokenized(reward_model, context, batch_size, options.shared_prefix, device, dtype, progress,
                                  model_name=f"the reward model {folder}")
        named = options.annotator if context.annotators is None else None  # the one person of a file without ids
        known = labelled_annotators(*outputs, context, named, f"--context {options.context}",
                                    None if saved is None else saved.log_prior, fit_prior=False)
        if saved is not None and saved.log_prior is not None:
            notes.append(f"note: the posteriors of --context's people start from the prior {folder} keeps "
                         "(fitted to its annotators; docs/personal.md)")
    personal = personal_scores(head_config, folder, saved, tokenized, chosen, rejected, anchor, options.annotator,
                               known)
    if options.annotator_field is not None and tokenized.annotators is None:
        notes.append(f"note: --annotator-field {options.annotator_field}: no pair of {data} has that field")
    if personal is not None:
        notes += personal.notes
        if personal.probability is not None:
            metadata["personal_reference"] = personal.reference
    if options.normalize:
        chosen, rejected = (chosen - mean) / std, (rejected - mean) / std
        anchor = None if anchor is None else (anchor - mean) / std
        if personal is not None and personal.reward is not None:  # differences of rewards: no shift
            personal.reward = personal.reward / std
        metadata["normalized"] = {"mean": mean, "std": std}
    save_scores(out, chosen, rejected, metadata, anchor=anchor, personal=personal.arrays() if personal else None)

    mean_chosen, mean_rejected = chosen.mean(axis=1, dtype=np.float64), rejected.mean(axis=1, dtype=np.float64)
    per_quantile = per_quantile_accuracy(head_config, chosen, rejected, anchor)
    if per_quantile is None:
        notes.append(f"note: no per-quantile accuracy: the {head_config.objective} head's "
                     f"{head_config.num_quantiles} outputs are its kinds' rewards, each with its own free "
                     "constant, so its quantiles mean something only relative to a reference reply: score with "
                     "--anchor-reply TEXT for them")
    return ScoreSummary(
        out=out, data_line=stats.summary(), num_pairs=len(pairs), num_truncated=tokenized.num_truncated,
        max_length=max_length, taus=metadata["taus"], num_outputs=head_config.num_quantiles,
        accuracy=pair_accuracy(mean_chosen, mean_rejected), quantile_accuracy=per_quantile,
        seconds=seconds, device=str(device), dtype=compute_dtype, notes=notes)


def _whose(options: ScoreConfig) -> str:
    """What --annotator and --context add to the default workload label: whose personal columns
    these are, so that two people's scores of the same pairs are two rows of the analysis."""
    parts = ([] if options.annotator is None else [f"as {options.annotator}"]) + \
        ([] if options.context is None else [f"context {Path(options.context).name}"])
    return f" ({', '.join(parts)})" if parts else ""


def per_quantile_accuracy(head_config, chosen, rejected, anchor) -> list | None:
    """[N] pair accuracy ranking by quantile k alone, from outputs [P, N], of quantiles that mean
    something. A head whose outputs are its kinds' rewards (pair model "kinds", N > 1) has a free
    constant per kind, so sorting its raw outputs mixes those constants into every quantile: its
    quantiles are read relative to the pair's anchor reply [P, N], kind by kind, and without an
    anchor there are none (None). Other heads' outputs share one constant, which cancels within a pair."""
    if head_config.num_quantiles > 1 and head_config.spec.pair_model == KINDS:
        if anchor is None:
            return None
        chosen, rejected = chosen - anchor, rejected - anchor
    return quantile_accuracy(head_config.quantiles(chosen), head_config.quantiles(rejected)).tolist()
