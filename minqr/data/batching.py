"""From text pairs to model inputs: tokenising, length-grouped batches, the two layouts of a
batch of preference pairs, and the layout of single texts that share prefixes.

A reward is read at the last real token of a text (docs/design.md#training-step), so a text is tokenised
as it is (no EOS appended) and, when too long, cut from the LEFT: the final responses, the part
that differs between chosen and rejected, survive.

One batch type, `PairBatch`, serves both layouts so that the model has one code path:

- separate sequences: rows 0..B-1 hold the chosen texts, rows B..2B-1 the rejected ones, right
  padded with the pad id (GPT-2's EOS); `attention_mask` is the usual [R, T] padding mask.
- shared prefix (the default for training and scoring): in HH-RLHF the two dialogues of a pair
  share everything but the last assistant turn, so a pair becomes ONE row
  `[prefix, chosen suffix, rejected suffix]`. The chosen suffix attends to the prefix and to
  itself; the rejected suffix attends to the prefix and to itself but not to the chosen suffix,
  and its positions restart where the prefix ends. Every real token then sees exactly what it
  would see in its own separate sequence, at the same position, so the hidden states, rewards and
  gradients are those of the separate layout, and the prefix is computed once instead of twice.
  `attention_mask` is a bool [R, 1, T, T] (True = attend) block mask.

In both layouts the reward of pair i is read at `(chosen_rows[i], chosen_cols[i])` and
`(rejected_rows[i], rejected_cols[i])`. When the data gives pair margins (minqr/data/pairs.py), a
batch carries them to the objective (`pair_margins`); when it says who labelled each pair, a batch
carries each pair's annotator as an index into the data's distinct ids (`annotators`,
`TokenizedPairs.annotator_ids`), for what learns or reads personal rewards.

Single texts (scoring a list of texts, serving an RL trainer's samples) use the same trick through
`TextBatch`: texts that share a long token prefix (the G samples of one prompt, a candidate set, a
prompt and its reference reply) form a group `[prefix, suffix 1, suffix 2, ...]`, each suffix
attending to the prefix and to itself, its positions restarting where the prefix ends; a text with
no such neighbour is a group of its own. Groups are packed side by side into rows (a group sees
only itself; `pack_rows` picks the row width), so that a batch is nearly all real tokens. Text i is read
at `(rows[i], cols[i])`.
"""
from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch

from minqr.data.chat import render_pair
from minqr.data.pairs import check_annotators, check_encodable, check_margins, index_annotators
from minqr.errors import MinqrError

# Cross-entropy's conventional "no target" label (torch.nn.functional.cross_entropy ignore_index).
IGNORE_INDEX = -100

# Segment of each column of a shared-prefix row; pads form a segment of their own. A row of single
# texts (TextBatch) numbers its texts' segments 1, 2, 3, ... after the prefix.
PAD, PREFIX, CHOSEN, REJECTED = -1, 0, 1, 2
# Texts a TextBatch row holds at most: each one more saves its prefix again, but widens the row,
# and attention grows with the square of a row's width.
MAX_TEXTS_A_ROW = 8


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """The number of leading tokens two texts have in common."""
    width = min(len(a), len(b))
    differs = np.flatnonzero(np.asarray(a[:width]) != np.asarray(b[:width]))
    return int(differs[0]) if differs.size else width


def shared_prefix_length(chosen: Sequence[int], rejected: Sequence[int]) -> int:
    """Length of the common token prefix, capped so that each side keeps at least one token of its
    own (a reward needs a last token, and one response may be a prefix of the other)."""
    return max(min(common_prefix_length(chosen, rejected), len(chosen) - 1, len(rejected) - 1), 0)


@dataclass
class PairBatch:
    """Model inputs for B preference pairs in R rows of T columns (R = 2B or B, see module doc)."""

    input_ids: torch.Tensor  # [R, T] int64
    position_ids: torch.Tensor  # [R, T] int64 (pads: 0)
    attention_mask: torch.Tensor  # [R, T] int64 1/0, or bool [R, 1, T, T] with True = attend
    chosen_rows: torch.Tensor  # [B] int64: where pair i's chosen reward is read ...
    chosen_cols: torch.Tensor  # [B]        ... its last real chosen token
    rejected_rows: torch.Tensor  # [B]
    rejected_cols: torch.Tensor  # [B]
    # [R, T] int64, already shifted: the token that the logits at [r, t] should predict, on the
    # chosen response (the chosen tokens after the shared prefix); IGNORE_INDEX elsewhere.
    chosen_lm_labels: torch.Tensor
    # [2B, L] int64: the token ids of each response (rows 0..B-1 the chosen ones, B..2B-1 the
    # rejected ones; the final response of the text, without its prompt), padded with
    # IGNORE_INDEX: the targets of the response bag-of-words auxiliary (minqr/models/reward.py)
    response_ids: torch.Tensor
    num_pairs: int
    num_real_tokens: int
    num_padded_tokens: int  # R * T: what the model computes
    # [B] float32: pair i's margin, what the pairwise term subtracts (-log sigma(r_c - r_r - m));
    # None when the data gives none
    pair_margins: torch.Tensor | None = None
    # [B] int64: pair i's annotator, an index into the data's distinct ids
    # (TokenizedPairs.annotator_ids); None when the data names no annotators
    annotators: torch.Tensor | None = None

    @property
    def shared_prefix(self) -> bool:
        return self.attention_mask.dim() == 4

    @property
    def padding_efficiency(self) -> float:
        return self.num_real_tokens / self.num_padded_tokens

    def to(self, device, non_blocking: bool = False) -> "PairBatch":
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


def collate_pairs(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]], pad_id: int,
                  shared_prefix: bool = True, response_starts: tuple | None = None,
                  pair_margins: Sequence[float] | None = None, annotators: Sequence[int] | None = None) -> PairBatch:
    """Lay out B pairs of token lists (each at least one token long) as one PairBatch.

    response_starts: ([B] chosen, [B] rejected) the index of each text's first response token: the
    LM term's targets are the chosen response's tokens, the response bag reads both responses'
    (default: for the LM term, the first token after the two texts' shared prefix, the prompt; for
    the bag, the whole text). pair_margins: [B] the pairs' margins, or None. annotators: [B] each
    pair's annotator index, or None."""
    if len(chosen) != len(rejected) or not chosen:
        raise MinqrError(f"collate_pairs needs as many chosen as rejected lists, at least one "
                         f"(got {len(chosen)} and {len(rejected)})")
    if min(map(len, chosen)) == 0 or min(map(len, rejected)) == 0:
        raise MinqrError("collate_pairs got an empty token list: every text needs a last token")
    num_pairs = len(chosen)
    prefixes = [shared_prefix_length(c, r) for c, r in zip(chosen, rejected)]
    if shared_prefix:
        rows = [list(c) + list(r[p:]) for c, r, p in zip(chosen, rejected, prefixes)]
    else:
        rows = [list(c) for c in chosen] + [list(r) for r in rejected]
    num_rows, width = len(rows), max(map(len, rows))

    input_ids = torch.full((num_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((num_rows, width), dtype=torch.long)
    segments = torch.full((num_rows, width), PAD, dtype=torch.long)
    labels = torch.full((num_rows, width), IGNORE_INDEX, dtype=torch.long)
    for row, tokens in enumerate(rows):
        input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    for i, (c, r, p) in enumerate(zip(chosen, rejected, prefixes)):
        # In both layouts the chosen tokens are columns 0..len(c)-1 of row i.
        position_ids[i, : len(c)] = torch.arange(len(c))
        segments[i, :p] = PREFIX
        segments[i, p : len(c)] = CHOSEN
        # The LM targets are the chosen response's tokens (where the texts part, if nothing says
        # where it starts); the first token of a row has no predecessor to predict it, hence max(., 1).
        first_target = max(response_starts[0][i] if response_starts else p, 1)
        labels[i, first_target - 1 : len(c) - 1] = torch.tensor(c[first_target:], dtype=torch.long)
        if shared_prefix:
            position_ids[i, len(c) : len(c) + len(r) - p] = torch.arange(p, len(r))
            segments[i, len(c) : len(c) + len(r) - p] = REJECTED
        else:
            position_ids[num_pairs + i, : len(r)] = torch.arange(len(r))
            segments[num_pairs + i, : len(r)] = REJECTED

    chosen_lengths = torch.tensor([len(c) for c in chosen])
    rejected_lengths = torch.tensor([len(r) for r in rejected])
    pair_index = torch.arange(num_pairs)
    if shared_prefix:
        attention_mask = _shared_prefix_mask(segments)
        rejected_rows = pair_index
        rejected_cols = chosen_lengths + rejected_lengths - torch.tensor(prefixes) - 1
    else:
        attention_mask = (segments != PAD).long()
        rejected_rows = pair_index + num_pairs
        rejected_cols = rejected_lengths - 1
    num_real_tokens = int((segments != PAD).sum())
    starts = response_starts or ([0] * num_pairs, [0] * num_pairs)
    responses = [c[start:] for c, start in zip(chosen, starts[0])] + [r[start:] for r, start in zip(rejected, starts[1])]
    response_ids = torch.full((2 * num_pairs, max(map(len, responses))), IGNORE_INDEX, dtype=torch.long)
    for row, tokens in enumerate(responses):
        response_ids[row, : len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
    return PairBatch(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
        chosen_rows=pair_index, chosen_cols=chosen_lengths - 1,
        rejected_rows=rejected_rows, rejected_cols=rejected_cols,
        chosen_lm_labels=labels, response_ids=response_ids, num_pairs=num_pairs,
        num_real_tokens=num_real_tokens, num_padded_tokens=num_rows * width,
        pair_margins=None if pair_margins is None else torch.tensor(pair_margins, dtype=torch.float32),
        annotators=None if annotators is None else torch.tensor(annotators, dtype=torch.long),
    )


def _shared_prefix_mask(segments: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """bool [R, 1, T, T] from the segment of every column [R, T]: causal, and a key is visible if it
    is in the prefix or in the query's own segment; with `groups` [R, T] (a row packing several
    groups), only within the query's group. A pad's row is all False: the model allows every
    query its own key (attention_mask_4d), so that no row of the softmax is empty."""
    width = segments.shape[1]
    query = segments[:, :, None]  # [R, T, 1]
    key = segments[:, None, :]  # [R, 1, T]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    visible = causal & (query != PAD) & ((key == PREFIX) | (key == query))  # [R, T, T]
    if groups is not None:
        visible &= groups[:, :, None] == groups[:, None, :]
    return visible[:, None]  # [R, 1, T, T]


@dataclass
class TokenizedPairs:
    """Token lists of a data set's pairs, ready to be batched."""

    chosen: list  # list[list[int]], each at least one token, at most max_length
    rejected: list
    pad_id: int
    max_length: int
    num_truncated: int  # pairs where at least one side lost tokens on the left
    # [P] each: the index of the first token of each text's final response (after truncation);
    # None: every text is all response
    chosen_response: list | None = None
    rejected_response: list | None = None
    pair_margins: list | None = None  # [P] floats, each pair's margin; None: the data gives none
    annotators: list | None = None  # [P] ints, each pair's index into annotator_ids; None: no ids
    annotator_ids: tuple = ()  # the data's distinct annotator ids (str or int), in order of first appearance

    def __len__(self) -> int:
        return len(self.chosen)

    def ending_in_pad(self) -> int:
        """How many texts end in the pad id (a template that closes every turn with EOS, where EOS
        pads): minqr reads their reward at that token, transformers' sequence classifiers, which
        skip pad ids, one token earlier."""
        return sum(tokens[-1] == self.pad_id for side in (self.chosen, self.rejected) for tokens in side)

    def prefix_lengths(self) -> np.ndarray:
        """[P] the shared token prefix of every pair (capped as in shared_prefix_length)."""
        return np.array([shared_prefix_length(c, r) for c, r in zip(self.chosen, self.rejected)])

    def real_tokens(self, shared_prefix: bool) -> np.ndarray:
        """[P] tokens the model computes for each pair, padding aside."""
        total = np.array([len(c) + len(r) for c, r in zip(self.chosen, self.rejected)])
        return total - self.prefix_lengths() if shared_prefix else total

    def row_widths(self, shared_prefix: bool) -> np.ndarray:
        """[P] the width of the widest row of each pair: what a batch is padded to."""
        if shared_prefix:
            return self.real_tokens(shared_prefix=True)
        return np.array([max(len(c), len(r)) for c, r in zip(self.chosen, self.rejected)])

    def batch(self, indices: Sequence[int], shared_prefix: bool = True) -> PairBatch:
        starts = None
        if self.chosen_response is not None:
            starts = ([self.chosen_response[i] for i in indices], [self.rejected_response[i] for i in indices])
        margins = None if self.pair_margins is None else [self.pair_margins[i] for i in indices]
        annotators = None if self.annotators is None else [self.annotators[i] for i in indices]
        return collate_pairs([self.chosen[i] for i in indices], [self.rejected[i] for i in indices],
                             self.pad_id, shared_prefix, starts, margins, annotators)


def tokenize_pairs(pairs, tokenizer, max_length: int) -> TokenizedPairs:
    """Tokenise `pairs` (Pairs: `chosen`, `rejected`, `origin`, `response_start`, `pair_margin`,
    `annotator`) with the model's tokenizer (one `encode_batch` call, the fast parallel path),
    keeping the last `max_length` tokens, and their margins and annotators when they have them
    (every pair or none: check_margins, check_annotators).

    A text that tokenises to nothing is an error naming its pair: a reward is read at a last
    token, and dropping such pairs silently would change the data set behind the user's back.
    """
    if max_length < 1:
        raise MinqrError(f"max_length must be at least 1 (got {max_length})")
    check_margins(pairs, "the pairs to tokenise")
    check_annotators(pairs, "the pairs to tokenise")
    rendered = [render_pair(pair, tokenizer.chat_template) for pair in pairs]  # [(chosen, rejected)]
    texts = [text for side in (0, 1) for (text, _) in (sides[side] for sides in rendered)]
    marks = [start for side in (0, 1) for (_, start) in (sides[side] for sides in rendered)]
    for k, text in enumerate(texts):  # the readers check this; pairs made by hand may not be
        pair = pairs[k % len(pairs)]
        check_encodable(text, f"{pair.origin}: the {'chosen' if k < len(pairs) else 'rejected'} text")
    ids, starts = tokenizer.encode_batch_marked(texts, marks)
    num_truncated = 0
    for i, pair in enumerate(pairs):
        for side, k in (("chosen", i), ("rejected", len(pairs) + i)):
            if not ids[k]:
                raise MinqrError(f"{pair.origin}: the {side} text tokenises to no tokens; every text "
                                 "needs a last token to read its reward at. Remove or fix that pair.")
        num_truncated += len(ids[i]) > max_length or len(ids[len(pairs) + i]) > max_length
    for k, tokens in enumerate(ids):
        cut = max(len(tokens) - max_length, 0)
        ids[k], starts[k] = tokens[cut:], max(starts[k] - cut, 0)
    num = len(pairs)
    margins = [pair.pair_margin for pair in pairs]
    annotator_ids, annotators = index_annotators([pair.annotator for pair in pairs])
    if not pairs or pairs[0].annotator is None:  # none has one (check_annotators)
        annotator_ids, annotators = (), None
    return TokenizedPairs(ids[:num], ids[num:], tokenizer.pad_id, max_length, num_truncated,
                          starts[:num], starts[num:], None if None in margins else margins, annotators, annotator_ids)


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    # One generator per (seed, epoch): a run resumed mid-epoch rebuilds exactly the same order.
    return np.random.default_rng([seed, epoch])


def random_batches(num_pairs: int, batch_size: int, seed: int, epoch: int) -> list:
    """Batches of pair indices in a seeded random order (the last one may be smaller)."""
    order = _epoch_rng(seed, epoch).permutation(num_pairs)
    return [order[i : i + batch_size].tolist() for i in range(0, num_pairs, batch_size)]


def length_grouped_batches(widths: Sequence[int], batch_size: int, seed: int, epoch: int,
                           window: int = 64) -> list:
    """Batches of pair indices of similar width, so that little of a batch is padding.

    `widths` is what each pair pads its batch to (`TokenizedPairs.row_widths`). The pairs are
    shuffled, cut into windows of `window` batches, sorted by width inside each window and cut
    into batches; the batches are then shuffled, except that the widest goes first, so that a
    batch too big for memory fails at the first step rather than hours into the run. A window
    rather than one global sort keeps some randomness in which pairs meet in a batch from one
    epoch to the next. Deterministic for (seed, epoch).
    """
    if batch_size < 1 or window < 1:
        raise MinqrError(f"batch_size and window must be at least 1 (got {batch_size}, {window})")
    widths = np.asarray(widths)
    rng = _epoch_rng(seed, epoch)
    order = rng.permutation(len(widths))
    span = batch_size * window
    batches = []
    for start in range(0, len(order), span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(widths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    widest = max(range(len(batches)), key=lambda b: widths[batches[b]].max())
    batches.insert(0, batches.pop(widest))
    return batches


# ---- who computes which pairs, in what order: training, evaluation, scoring ----------------------

def training_batches(widths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list:
    """The global batches of one training epoch: length-grouped in the (seed, epoch) order, full ones
    only, so that every step has the same global batch however it is divided up."""
    return [b for b in length_grouped_batches(widths, batch_size, seed, epoch) if len(b) == batch_size]


def process_micro_batches(pair_indices: Sequence[int], rank: int, micro_batch_size: int, grad_accum: int) -> list:
    """Process `rank`'s slice of a global batch, cut into `grad_accum` micro-batches: process r takes
    the r-th run of micro_batch_size x grad_accum consecutive pairs."""
    start = rank * micro_batch_size * grad_accum
    return [pair_indices[start + k * micro_batch_size : start + (k + 1) * micro_batch_size] for k in range(grad_accum)]


def evaluation_batches(widths: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1) -> list:
    """Held-out batches, length-grouped in one fixed order (seed 0, epoch 0), so that every
    evaluation sees the same batches; process `rank` of `world_size` takes every world_size-th."""
    return length_grouped_batches(widths, batch_size, seed=0, epoch=0)[rank::world_size]


def scoring_batches(widths: Sequence[int], batch_size: int) -> list:
    """Scoring: widest first, so that similar widths share a batch (little padding) and a batch too
    big for memory fails at the first step; stable, so that equal widths keep the data's order.
    Index arrays; the caller puts each result back at its pair's place."""
    order = np.argsort(-np.asarray(widths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# ---- single texts ----------------------------------------------------------------------------

def prefix_groups(token_lists: Sequence[Sequence[int]], max_texts: int = MAX_TEXTS_A_ROW) -> list:
    """Texts that share a token prefix: a list of (indices, prefix length), each group laid out
    [prefix, each member's own tokens] in a TextBatch row. A text joins its lexicographic
    neighbour's group while the group's common prefix is at least half of every member (sharing
    less saves little and widens the row), the group holds fewer than `max_texts`, and every member
    keeps at least one token of its own (its reward is read at its last token; a text may be a
    prefix of another, or equal to it). A text alone: prefix 0."""
    # sorted lexicographically, texts with a common prefix are neighbours, and a group's common
    # prefix is the smallest one between neighbours
    order = sorted(range(len(token_lists)), key=lambda i: list(token_lists[i]))
    groups = []
    for i in order:
        tokens = token_lists[i]
        if groups:
            members, prefix = groups[-1]
            last = token_lists[members[-1]]
            shared = min(common_prefix_length(last, tokens), len(last) - 1, len(tokens) - 1)
            if len(members) > 1:
                shared = min(shared, prefix)
            longest = max(len(tokens), max(len(token_lists[m]) for m in members))
            if len(members) < max_texts and shared >= 1 and 2 * shared >= longest:
                groups[-1] = (members + [i], shared)
                continue
        groups.append(([i], 0))
    return groups


def group_width(token_lists: Sequence[Sequence[int]], group: tuple) -> int:
    """The columns a group takes in a row: its prefix once, then every member's own tokens."""
    members, prefix = group
    return prefix + sum(len(token_lists[i]) - prefix for i in members)


def text_batches(token_lists: Sequence[Sequence[int]], groups: list, batch_size: int) -> list:
    """Groups into batches of at most `batch_size` texts (a group is never split; one larger than
    that goes alone), widest row first as scoring_batches orders pairs."""
    order = sorted(groups, key=lambda group: -group_width(token_lists, group))  # stable: ties keep their order
    batches, size = [], 0
    for group in order:
        if not batches or size + len(group[0]) > batch_size:  # the first batch, or this one is full
            batches.append([])
            size = 0
        batches[-1].append(group)
        size += len(group[0])
    return batches


@dataclass
class TextBatch:
    """M single texts in R rows of T columns: groups of texts sharing a prefix, packed (module doc)."""

    input_ids: torch.Tensor  # [R, T] int64
    position_ids: torch.Tensor  # [R, T] int64 (pads: 0)
    attention_mask: torch.Tensor  # bool [R, 1, T, T], True = attend
    rows: torch.Tensor  # [M] int64: text i is read at (rows[i], cols[i]), its last token
    cols: torch.Tensor  # [M]
    indices: list  # [M] the position of text i in the caller's list

    def to(self, device) -> "TextBatch":
        return replace(self, **{name: getattr(self, name).to(device) for name in
                                ("input_ids", "position_ids", "attention_mask", "rows", "cols")})


def pack_rows(widths: Sequence[int], model_width: int = 768) -> tuple:
    """Place groups of these widths side by side in rows: (row width, [(group, row, first column)],
    rows). First fit, widest first, into the row width that costs least among a few: the widest
    group's, or wide enough for two groups to share a row (the widest with another, or two of a
    kind: a group a bit wider than half the widest would otherwise leave a row half empty). A row of
    width W costs, per layer and up to a constant, W x (6 x model_width + W): the linear layers'
    work on each column and attention's over the row (24 d^2 and 4 W d multiply-adds a column), so
    short texts pack tight and long ones keep their rows narrow."""
    widest = max(widths)
    kinds = sorted(set(widths), reverse=True)[:4]  # the widest few: the ones that leave rows half empty
    candidates = sorted({widest} | {widest + w for w in kinds} | {2 * w for w in kinds if 2 * w >= widest})
    order = sorted(range(len(widths)), key=lambda g: -widths[g])
    best = None
    for width in candidates:
        placed, room = [], []  # (group, row, first column); free columns left in each row
        for g in order:
            row = next((r for r, free in enumerate(room) if free >= widths[g]), len(room))
            if row == len(room):
                room.append(width)
            placed.append((g, row, width - room[row]))
            room[row] -= widths[g]
        cost = len(room) * width * (6 * model_width + width)
        if best is None or cost < best[0]:  # a tie keeps the narrower
            best = (cost, width, placed, len(room))
    return best[1:]


def collate_texts(token_lists: Sequence[Sequence[int]], groups: list, pad_id: int = 0,
                  model_width: int = 768) -> TextBatch:
    """Lay out groups of texts (prefix_groups' (indices, prefix length); every text at least one
    token) as one TextBatch: each group [prefix, each member's tokens after it], packed into rows
    (pack_rows; `model_width`, the model's hidden size, weighs attention against the rest)."""
    widths = [group_width(token_lists, group) for group in groups]
    width, placed, num_rows = pack_rows(widths, model_width)
    input_ids = np.full((num_rows, width), pad_id, dtype=np.int64)
    position_ids = np.zeros((num_rows, width), dtype=np.int64)
    segments = np.full((num_rows, width), PAD, dtype=np.int64)
    group_of = np.full((num_rows, width), -1, dtype=np.int64)  # each column's group: groups sharing a row stay apart
    rows, cols, indices = [], [], []
    for g, row, start in placed:
        members, prefix = groups[g]
        group_of[row, start: start + widths[g]] = g
        input_ids[row, start: start + prefix] = token_lists[members[0]][:prefix]
        position_ids[row, start: start + prefix] = np.arange(prefix)
        segments[row, start: start + prefix] = PREFIX
        start += prefix
        for segment, i in enumerate(members, start=1):
            own = token_lists[i][prefix:]
            end = start + len(own)
            input_ids[row, start:end] = own
            position_ids[row, start:end] = np.arange(prefix, len(token_lists[i]))
            segments[row, start:end] = segment
            rows.append(row)
            cols.append(end - 1)
            indices.append(i)
            start = end
    mask = _shared_prefix_mask(torch.from_numpy(segments), torch.from_numpy(group_of))
    return TextBatch(input_ids=torch.from_numpy(input_ids), position_ids=torch.from_numpy(position_ids),
                     attention_mask=mask, rows=torch.tensor(rows), cols=torch.tensor(cols), indices=indices)


def padding_efficiency(tokenized: TokenizedPairs, batches: Sequence[Sequence[int]],
                       shared_prefix: bool = True) -> float:
    """Real tokens / computed tokens over `batches`, from lengths alone (no batch is built); equal
    to the token counts the collated PairBatches carry."""
    real = tokenized.real_tokens(shared_prefix)
    widths = tokenized.row_widths(shared_prefix)
    rows_per_pair = 1 if shared_prefix else 2
    computed = sum(rows_per_pair * len(b) * widths[b].max() for b in batches)
    return float(sum(real[b].sum() for b in batches) / computed)
