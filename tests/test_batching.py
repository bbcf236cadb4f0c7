"""Tokenising, batching, the two layouts of PairBatch and the packed single texts of TextBatch,
checked against masks, positions and labels built here with plain loops from the rules in
docs/design.md, and against each text run alone, on fresh random token lists; and
the padding and shared-prefix savings measured on the real HH-RLHF pairs."""
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import GPT2_TOKENIZER_DIR, HH_HARMLESS_TEST, _require
from factories import random_gpt2, tiny_config

from minqr.data.batching import (IGNORE_INDEX, MAX_TEXTS_A_ROW, TokenizedPairs, collate_pairs, collate_texts,
                                 evaluation_batches, group_width, length_grouped_batches, pack_rows,
                                 padding_efficiency, prefix_groups, process_micro_batches, random_batches,
                                 scoring_batches, shared_prefix_length, text_batches, tokenize_pairs,
                                 training_batches)
from minqr.data.pairs import Pair, load_pairs
from minqr.errors import MinqrError
from minqr.models.gpt2 import attention_mask_4d
from minqr.models.head import HeadConfig
from minqr.models.llama import Llama, LlamaConfig
from minqr.models.reward import RewardModel
from minqr.models.tokenizer import load_tokenizer

PAD_ID = 999


def random_pairs(rng: random.Random, num_pairs: int, max_len: int = 12):
    """Token-list pairs with shared prefixes of every kind: none, partial, one list a prefix of the
    other, identical lists (texts that differ only in what left truncation cut away)."""
    chosen, rejected = [], []
    for _ in range(num_pairs):
        common = [rng.randrange(50) for _ in range(rng.randint(0, max_len))]
        kind = rng.choice(["free", "free", "prefix-of-other", "identical"])
        c = common + [rng.randrange(50) for _ in range(rng.randint(0 if common else 1, max_len))]
        if kind == "free":
            r = common + [rng.randrange(50) for _ in range(rng.randint(0 if common else 1, max_len))]
        elif kind == "prefix-of-other":
            c, r = (c, c[: rng.randint(1, len(c))]) if rng.random() < 0.5 else (c[: rng.randint(1, len(c))], c)
        else:
            r = list(c)
        chosen.append(c)
        rejected.append(r)
    return chosen, rejected


def loop_prefix(c, r):
    p = 0
    while p < min(len(c), len(r)) - 1 and c[p] == r[p]:
        p += 1
    return p


def test_shared_prefix_length_matches_a_loop():
    rng = random.Random(0)
    chosen, rejected = random_pairs(rng, 300)
    for c, r in zip(chosen + [[1], [1, 2]], rejected + [[1], [1, 2]]):
        assert shared_prefix_length(c, r) == loop_prefix(c, r)
        assert shared_prefix_length(c, r) < min(len(c), len(r))  # each side keeps a token


# ------------------------------------------------------------ layouts, checked with loops


@pytest.mark.parametrize("num_pairs", [1, 2, 7])
def test_separate_layout(num_pairs):
    rng = random.Random(num_pairs)
    chosen, rejected = random_pairs(rng, num_pairs)
    batch = collate_pairs(chosen, rejected, PAD_ID, shared_prefix=False)
    rows = chosen + rejected
    width = max(map(len, rows))
    assert batch.input_ids.shape == batch.attention_mask.shape == (2 * num_pairs, width)
    for r, tokens in enumerate(rows):
        n = len(tokens)
        assert batch.input_ids[r].tolist() == tokens + [PAD_ID] * (width - n)
        assert batch.attention_mask[r].tolist() == [1] * n + [0] * (width - n)
        assert batch.position_ids[r, :n].tolist() == list(range(n))
    for i in range(num_pairs):
        assert (batch.chosen_rows[i], batch.chosen_cols[i]) == (i, len(chosen[i]) - 1)
        assert (batch.rejected_rows[i], batch.rejected_cols[i]) == (num_pairs + i, len(rejected[i]) - 1)
    assert batch.num_pairs == num_pairs and not batch.shared_prefix
    assert batch.num_real_tokens == sum(map(len, rows))
    assert batch.num_padded_tokens == 2 * num_pairs * width


def loop_shared_mask(lc: int, lr: int, p: int, width: int):
    """The shared-prefix attention rules, one (query, key) at a time."""
    end = lc + lr - p
    mask = [[False] * width for _ in range(width)]
    for q in range(width):
        for k in range(width):
            if q >= end:  # a pad attends to nothing here (the model adds every query's own key)
                mask[q][k] = False
            elif q < p:  # prefix: causal within the prefix
                mask[q][k] = k <= q
            elif q < lc:  # chosen suffix: the prefix, then itself causally
                mask[q][k] = k < p or p <= k <= q
            else:  # rejected suffix: the prefix, then itself causally, never the chosen suffix
                mask[q][k] = k < p or lc <= k <= q
    return mask


@pytest.mark.parametrize("num_pairs", [1, 3, 8])
def test_shared_prefix_layout(num_pairs):
    rng = random.Random(100 + num_pairs)
    chosen, rejected = random_pairs(rng, num_pairs)
    batch = collate_pairs(chosen, rejected, PAD_ID, shared_prefix=True)
    prefixes = [loop_prefix(c, r) for c, r in zip(chosen, rejected)]
    width = max(len(c) + len(r) - p for c, r, p in zip(chosen, rejected, prefixes))
    assert batch.input_ids.shape == (num_pairs, width)
    assert batch.attention_mask.shape == (num_pairs, 1, width, width) and batch.attention_mask.dtype == torch.bool
    for i, (c, r, p) in enumerate(zip(chosen, rejected, prefixes)):
        row = c + r[p:]
        assert batch.input_ids[i].tolist() == row + [PAD_ID] * (width - len(row))
        assert batch.position_ids[i, : len(row)].tolist() == list(range(len(c))) + list(range(p, len(r)))
        assert batch.attention_mask[i, 0].tolist() == loop_shared_mask(len(c), len(r), p, width)
        # the gather points hold the last token of each response, at the position it has alone
        assert (batch.chosen_rows[i], batch.rejected_rows[i]) == (i, i)
        cc, rc = int(batch.chosen_cols[i]), int(batch.rejected_cols[i])
        assert (batch.input_ids[i, cc], batch.position_ids[i, cc]) == (c[-1], len(c) - 1)
        assert (batch.input_ids[i, rc], batch.position_ids[i, rc]) == (r[-1], len(r) - 1)
        assert rc == len(row) - 1
    # the model leaves no query without a key (SDPA would give NaN)
    assert attention_mask_4d(batch.attention_mask, width).any(dim=-1).all()
    assert batch.num_real_tokens == sum(len(c) + len(r) - p for c, r, p in zip(chosen, rejected, prefixes))
    assert batch.num_padded_tokens == num_pairs * width and batch.shared_prefix


def visible_context(batch, row: int, col: int):
    """(token, position) of every key that the query at (row, col) attends to, by position."""
    if batch.shared_prefix:
        keys = batch.attention_mask[row, 0, col].nonzero().flatten().tolist()
    else:
        keys = [k for k in range(col + 1) if batch.attention_mask[row, k]]
    return sorted((int(batch.position_ids[row, k]), int(batch.input_ids[row, k])) for k in keys)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_every_token_sees_exactly_its_own_sequence(shared_prefix):
    # What makes the layouts interchangeable: in both, the t-th token of a response attends to the
    # t+1 first tokens of that response's own text, each at its own position, and to nothing else.
    rng = random.Random(7)
    chosen, rejected = random_pairs(rng, 6)
    batch = collate_pairs(chosen, rejected, PAD_ID, shared_prefix)
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        for tokens, row, last_col in ((c, batch.chosen_rows[i], batch.chosen_cols[i]),
                                      (r, batch.rejected_rows[i], batch.rejected_cols[i])):
            for t in range(len(tokens)):
                col = int(last_col) - (len(tokens) - 1 - t)
                if shared_prefix and t < shared_prefix_length(c, r):
                    col = t  # the prefix is computed once, at the start of the row
                assert visible_context(batch, int(row), col) == [(s, tokens[s]) for s in range(t + 1)]


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_chosen_lm_labels(shared_prefix):
    rng = random.Random(8)
    chosen, rejected = random_pairs(rng, 9)
    batch = collate_pairs(chosen, rejected, PAD_ID, shared_prefix)
    expected = torch.full_like(batch.input_ids, IGNORE_INDEX)
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        for t in range(1, len(c)):
            if t >= loop_prefix(c, r):  # a chosen-response token, predicted from the column before it
                expected[i, t - 1] = c[t]
    assert torch.equal(batch.chosen_lm_labels, expected)
    # where the response starts is known (training's pairs): its tokens are the targets, those the two
    # responses share included, and no prompt token when the texts part inside the prompt
    starts = [rng.randrange(0, len(c)) for c in chosen]
    batch = collate_pairs(chosen, rejected, PAD_ID, shared_prefix, response_starts=(starts, [0] * len(rejected)))
    expected = torch.full_like(batch.input_ids, IGNORE_INDEX)
    for i, c in enumerate(chosen):
        for t in range(max(starts[i], 1), len(c)):
            expected[i, t - 1] = c[t]
    assert torch.equal(batch.chosen_lm_labels, expected)
    batch = collate_pairs([[1, 2, 3, 7, 8, 9]], [[1, 2, 3, 7, 5]], PAD_ID, shared_prefix, response_starts=([3], [3]))
    assert batch.chosen_lm_labels[0][batch.chosen_lm_labels[0] != IGNORE_INDEX].tolist() == [7, 8, 9]


def test_to_moves_every_tensor():
    chosen, rejected = random_pairs(random.Random(9), 3)
    for shared_prefix in (True, False):
        batch = collate_pairs(chosen, rejected, PAD_ID, shared_prefix)
        moved = batch.to("meta")
        tensors = [name for name, value in vars(batch).items() if isinstance(value, torch.Tensor)]
        assert len(tensors) == 9 and all(getattr(moved, name).is_meta for name in tensors)
        assert (moved.num_pairs, moved.num_real_tokens) == (batch.num_pairs, batch.num_real_tokens)


def test_collate_errors():
    with pytest.raises(MinqrError, match="empty token list"):
        collate_pairs([[1, 2]], [[]], PAD_ID)
    with pytest.raises(MinqrError, match="as many chosen as rejected"):
        collate_pairs([[1], [2]], [[3]], PAD_ID)
    with pytest.raises(MinqrError, match="at least one"):
        collate_pairs([], [], PAD_ID)


# ------------------------------------------------------------ tokenising


# Module-scoped (tokenising the real pairs takes seconds), hence conftest's paths rather than its
# function-scoped fixtures.
@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return load_tokenizer(_require(GPT2_TOKENIZER_DIR))


def make_pairs(texts):
    return [Pair(c, r, f"test:{n}") for n, (c, r) in enumerate(texts, 1)]


def test_truncation_keeps_the_end(gpt2_tokenizer):
    rng = random.Random(10)
    words = ["alpha", "beta", " gamma", "\n\nHuman:", "\n\nAssistant:", "é", "🙂", "12"]
    texts = [(" ".join(rng.choices(words, k=rng.randint(1, 200))), " ".join(rng.choices(words, k=rng.randint(1, 200))))
             for _ in range(20)]
    max_length = 64
    tokenized = tokenize_pairs(make_pairs(texts), gpt2_tokenizer, max_length)
    truncated = 0
    for (c, r), c_ids, r_ids in zip(texts, tokenized.chosen, tokenized.rejected):
        full_c, full_r = gpt2_tokenizer.encode(c), gpt2_tokenizer.encode(r)  # the one-text path
        assert (c_ids, r_ids) == (full_c[-max_length:], full_r[-max_length:])
        truncated += len(full_c) > max_length or len(full_r) > max_length
    assert tokenized.num_truncated == truncated > 0
    assert gpt2_tokenizer.decode(tokenized.chosen[0]) in texts[0][0]  # the end of the text, not the start
    assert texts[0][0].endswith(gpt2_tokenizer.decode(tokenized.chosen[0][-5:]))
    assert tokenized.pad_id == gpt2_tokenizer.eos_id and tokenized.max_length == max_length


class SkipSpaces:
    """A tokenizer that drops white space, so a non-empty text can tokenise to nothing."""

    eos_id = 0
    chat_template = None  # the texts as they are

    def encode_batch_marked(self, texts, marks):
        return [[ord(ch) for ch in text if not ch.isspace()] for text in texts], [0] * len(texts)


def test_text_with_no_tokens_is_an_error():
    pairs = make_pairs([("a b", "c"), ("d", "  ")])
    with pytest.raises(MinqrError, match="test:2: the rejected text tokenises to no tokens"):
        tokenize_pairs(pairs, SkipSpaces(), 8)
    with pytest.raises(MinqrError, match="max_length must be at least 1"):
        tokenize_pairs(pairs, SkipSpaces(), 0)


def test_response_spans_are_the_final_responses(gpt2_tokenizer):
    """The tokens from each text's response start are its final response: after the last
    "\\n\\nAssistant:" of a dialogue, after the prompt when the data gave one, and what survives of it
    when the text was cut from the left."""
    rng = random.Random(11)
    words = ["alpha", "beta", " gamma", "é", "🙂", "12", "Assistant", ":"]

    def words_text(k):
        return " ".join(rng.choices(words, k=k))

    dialogues = [(f"\n\nHuman: {words_text(8)}\n\nAssistant: {words_text(5)}\n\nHuman: {words_text(3)}"
                  f"\n\nAssistant:", words_text(rng.randint(1, 30))) for _ in range(12)]
    pairs = [Pair(prompt + " " + reply, prompt + " " + reply[::-1], f"test:{n}") for n, (prompt, reply) in enumerate(dialogues)]
    pairs += [Pair("prompt" + reply, "prompt" + "other", "p", prompt_length=len("prompt")) for _, reply in dialogues[:3]]
    pairs.append(Pair("no turns at all", "none here", "x"))  # no assistant turn: the whole text
    for max_length in (512, 12):
        tokenized = tokenize_pairs(pairs, gpt2_tokenizer, max_length)
        for pair, ids, start, side in [(p, tokenized.chosen[i], tokenized.chosen_response[i], "chosen")
                                       for i, p in enumerate(pairs)] + [
                                      (p, tokenized.rejected[i], tokenized.rejected_response[i], "rejected")
                                      for i, p in enumerate(pairs)]:
            text = getattr(pair, side)
            response = text[pair.response_start(side):]
            full = gpt2_tokenizer.encode(text)
            kept = gpt2_tokenizer.decode(ids[start:])
            assert response.endswith(kept) and len(kept) > 0
            if len(full) <= max_length:  # nothing cut: the whole response, no more
                assert kept == response
    assert Pair("\n\nHuman: a\n\nAssistant: b", "c", "o").response_start("chosen") == len("\n\nHuman: a\n\nAssistant:")


def test_response_ids_hold_each_response_of_the_batch():
    chosen, rejected = [[1, 2, 3, 4], [5, 6]], [[1, 2, 9], [5, 7, 8, 9, 10]]
    for shared_prefix in (True, False):
        batch = collate_pairs(chosen, rejected, PAD_ID, shared_prefix, response_starts=([2, 0], [2, 1]))
        assert batch.response_ids.tolist() == [[3, 4, IGNORE_INDEX, IGNORE_INDEX], [5, 6, IGNORE_INDEX, IGNORE_INDEX],
                                               [9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX], [7, 8, 9, 10]]
    whole = collate_pairs(chosen, rejected, PAD_ID)  # no starts: every text is all response
    assert whole.response_ids[0].tolist() == [1, 2, 3, 4, IGNORE_INDEX]


# ------------------------------------------------------------ batches


def test_random_batches_are_a_seeded_permutation():
    batches = random_batches(103, 10, seed=3, epoch=1)
    assert sorted(sum(batches, [])) == list(range(103)) and [len(b) for b in batches] == [10] * 10 + [3]
    assert batches == random_batches(103, 10, seed=3, epoch=1)
    assert batches != random_batches(103, 10, seed=3, epoch=2) != random_batches(103, 10, seed=4, epoch=1)


@pytest.mark.parametrize("num_pairs, batch_size, window", [(1, 4, 64), (1000, 16, 8), (1000, 7, 3), (50, 1, 64)])
def test_length_grouped_batches(num_pairs, batch_size, window):
    rng = np.random.default_rng(num_pairs)
    widths = rng.integers(1, 500, num_pairs)
    batches = length_grouped_batches(widths, batch_size, seed=5, epoch=0, window=window)
    assert sorted(sum(batches, [])) == list(range(num_pairs))
    assert sum(len(b) < batch_size for b in batches) <= 1
    assert max(widths[batches[0]]) == widths.max()  # the widest batch first
    assert batches == length_grouped_batches(widths, batch_size, seed=5, epoch=0, window=window)
    if num_pairs > batch_size:
        assert batches != length_grouped_batches(widths, batch_size, seed=5, epoch=1, window=window)
    if num_pairs > batch_size > 1:
        # within a window, a batch spans a narrow range of widths: compare with random batches
        spread = np.mean([np.ptp(widths[b]) for b in batches])
        random_spread = np.mean([np.ptp(widths[b]) for b in random_batches(num_pairs, batch_size, 5, 0)])
        assert spread < random_spread / 2


def test_padding_efficiency_equals_the_collated_counts():
    chosen, rejected = random_pairs(random.Random(11), 40, max_len=30)
    tokenized = TokenizedPairs(chosen, rejected, pad_id=PAD_ID, max_length=60, num_truncated=0)
    for shared_prefix in (True, False):
        batches = length_grouped_batches(tokenized.row_widths(shared_prefix), 6, seed=0, epoch=0, window=2)
        collated = [tokenized.batch(b, shared_prefix) for b in batches]
        real = sum(b.num_real_tokens for b in collated)
        assert padding_efficiency(tokenized, batches, shared_prefix) == pytest.approx(
            real / sum(b.num_padded_tokens for b in collated), rel=1e-12)
        assert collated[0].padding_efficiency == collated[0].num_real_tokens / collated[0].num_padded_tokens
        assert real == tokenized.real_tokens(shared_prefix).sum()


# ------------------------------------------------------------ the real HH-RLHF pairs


@pytest.fixture(scope="module")
def hh(gpt2_tokenizer):
    pairs, _ = load_pairs(_require(HH_HARMLESS_TEST))
    full = gpt2_tokenizer.encode_batch([p.chosen for p in pairs] + [p.rejected for p in pairs])
    return SimpleNamespace(pairs=pairs, tokenized=tokenize_pairs(pairs, gpt2_tokenizer, 512),
                           full_chosen=full[: len(pairs)], full_rejected=full[len(pairs):])


def test_real_pairs_are_cut_from_the_left(hh):
    assert hh.tokenized.chosen == [ids[-512:] for ids in hh.full_chosen]
    assert hh.tokenized.rejected == [ids[-512:] for ids in hh.full_rejected]
    assert hh.tokenized.num_truncated == sum(len(c) > 512 or len(r) > 512
                                             for c, r in zip(hh.full_chosen, hh.full_rejected))


@pytest.mark.parametrize("batch_size", [8, 16])
def test_length_groups_keep_nine_tenths_of_a_batch_real(hh, batch_size):
    efficiency = {}
    for shared_prefix in (True, False):
        grouped = length_grouped_batches(hh.tokenized.row_widths(shared_prefix), batch_size, seed=0, epoch=0)
        efficiency[shared_prefix] = padding_efficiency(hh.tokenized, grouped, shared_prefix)
    baseline = padding_efficiency(hh.tokenized, random_batches(len(hh.tokenized), batch_size, 0, 0), False)
    print(f"\npadding efficiency, batch {batch_size}, max_length 512: length groups {efficiency[True]:.3f} "
          f"(shared prefix), {efficiency[False]:.3f} (separate); random batches {baseline:.3f} (separate)")
    assert efficiency[True] >= 0.9
    assert efficiency[False] > 2 * baseline


def independent_prefix(c, r):
    return len(os.path.commonprefix([c, r]))  # on lists, element by element


def test_shared_prefix_token_saving(hh):
    for label, chosen, rejected, tokenized in (
            ("max_length 512", hh.tokenized.chosen, hh.tokenized.rejected, hh.tokenized),
            ("untruncated", hh.full_chosen, hh.full_rejected, None)):
        separate = sum(len(c) + len(r) for c, r in zip(chosen, rejected))
        prefix = sum(min(independent_prefix(c, r), min(len(c), len(r)) - 1) for c, r in zip(chosen, rejected))
        if tokenized is not None:
            assert tokenized.real_tokens(shared_prefix=False).sum() == separate
            assert tokenized.real_tokens(shared_prefix=True).sum() == separate - prefix
        print(f"\nshared prefix, {label}: {prefix / separate:.1%} of separate tokens are shared prefix, "
              f"{separate / (separate - prefix):.3f}x fewer tokens")
        assert separate / (separate - prefix) > 1.3


# ------------------------------------------------------------ through a tiny GPT-2


def test_layouts_give_the_same_hidden_states():
    model = random_gpt2(tiny_config(n_positions=64))
    chosen, rejected = random_pairs(random.Random(12), 6, max_len=20)
    outputs = {}
    for shared_prefix in (True, False):
        batch = collate_pairs(chosen, rejected, pad_id=7, shared_prefix=shared_prefix)
        with torch.no_grad():
            hidden = model(batch.input_ids, batch.attention_mask, batch.position_ids)  # [R, T, n_embd]
            logits = model.lm_logits(hidden)
        labelled = batch.chosen_lm_labels != IGNORE_INDEX
        outputs[shared_prefix] = (hidden[batch.chosen_rows, batch.chosen_cols],
                                  hidden[batch.rejected_rows, batch.rejected_cols],
                                  logits[labelled], batch.chosen_lm_labels[labelled])
        assert torch.isfinite(hidden).all()  # pad rows included
    for shared, separate in zip(outputs[True], outputs[False]):
        torch.testing.assert_close(shared, separate, rtol=1e-5, atol=1e-5)


def test_a_hand_made_pair_the_tokenizer_cannot_take_is_named(gpt2_tokenizer):
    pairs = [Pair("fine", "also fine", "mine:1"), Pair("ok", "half an emoji \ud83d", "mine:2")]
    with pytest.raises(MinqrError) as refused:
        tokenize_pairs(pairs, gpt2_tokenizer, 16)
    assert str(refused.value) == ("mine:2: the rejected text holds a lone surrogate '\\ud83d' at character 14: half of "
                                  "a UTF-16 pair (an emoji cut in two?), no character, and no tokenizer takes it")


# ---- who computes which pairs: training, processes, evaluation, scoring ----------------------------

def test_training_batches_are_the_full_length_grouped_ones():
    widths = np.random.default_rng(0).integers(1, 100, 103)
    full = training_batches(widths, 10, seed=2, epoch=1)
    assert full == [b for b in length_grouped_batches(widths, 10, 2, 1) if len(b) == 10]
    assert len(full) == 10 and all(len(b) == 10 for b in full)


@pytest.mark.parametrize("world_size, grad_accum", [(1, 1), (1, 3), (2, 1), (2, 2), (4, 3)])
def test_the_processes_micro_batches_split_a_global_batch_exactly_once(world_size, grad_accum):
    micro = 5
    global_batch = list(np.random.default_rng(world_size).permutation(1000)[: micro * grad_accum * world_size])
    pieces = [process_micro_batches(global_batch, rank, micro, grad_accum) for rank in range(world_size)]
    assert all(len(p) == grad_accum and all(len(b) == micro for b in p) for p in pieces)
    # in rank order then micro-batch order, the pieces are the global batch itself
    assert [i for p in pieces for b in p for i in b] == global_batch


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_batches_are_fixed_and_shared_out_over_the_processes(world_size):
    widths = np.random.default_rng(1).integers(1, 50, 77)
    every = length_grouped_batches(widths, 8, seed=0, epoch=0)
    shares = [evaluation_batches(widths, 8, rank, world_size) for rank in range(world_size)]
    assert sorted(map(tuple, (b for s in shares for b in s))) == sorted(map(tuple, every))
    assert shares[0] == every[::world_size]


def test_scoring_batches_go_widest_first_and_keep_the_data_order_on_ties():
    widths = [3, 9, 9, 1, 9, 3, 7]
    batches = scoring_batches(widths, 2)
    assert [b.tolist() for b in batches] == [[1, 2], [4, 6], [0, 5], [3]]
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(widths)))


# ------------------------------------------------------------ single texts sharing prefixes

def random_texts(rng: random.Random, num_prompts: int) -> list:
    """Token lists as an RL trainer sends them: a few samples of each prompt (long prompt, short
    replies), with duplicates, a sample that is a prefix of another, texts sharing only a short
    start, and one-token texts."""
    texts = []
    for _ in range(num_prompts):
        prompt = [rng.randrange(50) for _ in range(rng.randint(1, 14))]
        for _ in range(rng.randint(1, 11)):
            kind = rng.choice(["reply", "reply", "reply", "duplicate", "cut", "stranger"])
            if kind == "duplicate" and texts:
                texts.append(list(texts[-1]))
            elif kind == "cut" and texts:
                texts.append(texts[-1][: rng.randint(1, len(texts[-1]))])
            elif kind == "stranger":
                texts.append(prompt[:2] + [rng.randrange(50) for _ in range(rng.randint(0, 20))])
            else:
                texts.append(prompt + [rng.randrange(50) for _ in range(rng.randint(0, 6))])
    rng.shuffle(texts)
    return texts


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_texts", [1, 3, MAX_TEXTS_A_ROW])
def test_prefix_groups_keep_the_rules(seed, max_texts):
    texts = random_texts(random.Random(seed), 12)
    groups = prefix_groups(texts, max_texts)
    assert sorted(i for members, _ in groups for i in members) == list(range(len(texts)))  # each text once
    for members, prefix in groups:
        assert 1 <= len(members) <= max_texts
        if len(members) == 1:
            assert prefix == 0
            continue
        # the prefix is the members' common one, capped so that each keeps a token of its own
        common = min(len(texts[i]) for i in members)
        for i in members:
            common = min(common, loop_common(texts[members[0]], texts[i]))
        assert prefix == min(common, min(len(texts[i]) for i in members) - 1) >= 1
        assert all(2 * prefix >= len(texts[i]) for i in members)  # at least half of every member


def loop_common(a, b) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def test_prefix_groups_put_a_prompts_samples_together():
    prompt = list(range(30))
    samples = [prompt + [100 + k, 200 + k] for k in range(2 * MAX_TEXTS_A_ROW)]
    alone = [[7, 8, 9], [300] + prompt]  # shares nothing with them
    groups = prefix_groups(samples + alone)
    sizes = sorted(len(members) for members, _ in groups)
    assert sizes == [1, 1, MAX_TEXTS_A_ROW, MAX_TEXTS_A_ROW]
    assert all(prefix == 30 for members, prefix in groups if len(members) > 1)


def text_context(batch, row: int, col: int):
    """(position, token) of every key the query at (row, col) attends to, by position."""
    keys = batch.attention_mask[row, 0, col].nonzero().flatten().tolist()
    return sorted((int(batch.position_ids[row, k]), int(batch.input_ids[row, k])) for k in keys), keys


@pytest.mark.parametrize("seed", [0, 1])
def test_every_packed_text_sees_exactly_its_own_tokens(seed):
    # what makes a TextBatch exact: each token of text i attends to the tokens before it in text i,
    # at their own positions, and to nothing else (not the other samples, not the other groups)
    texts = random_texts(random.Random(seed), 8)
    groups = prefix_groups(texts)
    batch = collate_texts(texts, groups, pad_id=PAD_ID)
    assert sorted(batch.indices) == list(range(len(texts)))
    widest = max(group_width(texts, group) for group in groups)
    assert widest <= batch.input_ids.shape[1] <= 2 * widest
    assert batch.input_ids.shape[0] <= len(groups)  # groups share rows where they fit
    for k, i in enumerate(batch.indices):
        tokens, row = texts[i], int(batch.rows[k])
        seen, keys = text_context(batch, row, int(batch.cols[k]))
        assert seen == [(s, tokens[s]) for s in range(len(tokens))]  # the last token sees the whole text
        for key in keys:  # and every token of it sees its own start
            position = int(batch.position_ids[row, key])
            assert text_context(batch, row, key)[0] == [(s, tokens[s]) for s in range(position + 1)]
    real = sum(group_width(texts, group) for group in groups)
    assert int((batch.input_ids != PAD_ID).sum()) <= real  # pads are pads (a token may equal PAD_ID: none here)
    # the model leaves no query without a key (SDPA would give NaN)
    assert attention_mask_4d(batch.attention_mask, batch.input_ids.shape[1]).any(dim=-1).all()


@pytest.mark.parametrize("batch_size", [1, 4, 32])
def test_text_batches_hold_each_group_once_and_at_most_batch_size_texts(batch_size):
    texts = random_texts(random.Random(3), 10)
    groups = prefix_groups(texts, max_texts=min(MAX_TEXTS_A_ROW, batch_size))
    batches = text_batches(texts, groups, batch_size)
    assert sorted(sorted(m) for b in batches for m, _ in b) == sorted(sorted(m) for m, _ in groups)
    assert all(0 < sum(len(m) for m, _ in b) <= batch_size for b in batches)
    widths = [max(group_width(texts, g) for g in b) for b in batches]
    assert widths == sorted(widths, reverse=True)  # widest first


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_texts_give_each_text_alone(family):
    torch.manual_seed(0)
    if family == "gpt2":
        backbone = random_gpt2(tiny_config(n_positions=64))
    else:
        backbone = Llama(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, eos_token_id=60))
    model = RewardModel(backbone, HeadConfig.make("quantile", 3, "mixture")).eval()
    texts = random_texts(random.Random(5), 6)
    batch = collate_texts(texts, prefix_groups(texts))
    with torch.no_grad():
        packed = model.forward_texts(batch)  # [M, 3], in batch.indices' order
        states = model.forward_texts(batch, pooled=True)  # [M, n_embd]
        for k, i in enumerate(batch.indices):
            ids = torch.tensor([texts[i]])  # [1, L]: the text by itself
            torch.testing.assert_close(packed[k], model(ids)[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(states[k], model.pooled(ids)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_pack_rows_places_every_group_once_apart_and_computes_no_more_than_the_widest_width(seed):
    rng = random.Random(seed)
    widths = [rng.randint(1, 40) for _ in range(rng.randint(1, 30))]
    width, placed, num_rows = pack_rows(widths)
    assert sorted(g for g, _, _ in placed) == list(range(len(widths)))
    taken = [[False] * width for _ in range(num_rows)]
    for g, row, start in placed:  # inside its row, overlapping no other group
        assert 0 <= start and start + widths[g] <= width and 0 <= row < num_rows
        assert not any(taken[row][start: start + widths[g]])
        taken[row][start: start + widths[g]] = [True] * widths[g]
    assert all(any(row) for row in taken)  # no empty row
    # never more columns than first fit into rows of the widest group's width, written out here
    free = []
    for w in sorted(widths, reverse=True):
        row = next((r for r, room in enumerate(free) if room >= w), None)
        if row is None:
            free.append(max(widths))
            row = len(free) - 1
        free[row] -= w
    assert num_rows * width <= len(free) * max(widths)

def test_pack_rows_widens_the_rows_when_groups_a_bit_over_half_the_widest_would_fill_one_each():
    width, _, num_rows = pack_rows([26, 26, 26, 26, 50])
    assert (width, num_rows) == (52, 3)  # [50], [26, 26], [26, 26]: 156 columns, not 5 x 50 = 250
    # a row of W columns costs W (6 d + W): short texts share a row, long ones keep it narrow, where
    # attention over a doubled row would cost more than the padding it saves
    assert pack_rows([30, 50], model_width=64)[:2] == (80, [(1, 0, 0), (0, 0, 50)])
    assert pack_rows([3000, 5000], model_width=64)[0] == 5000
    assert pack_rows([3000, 5000], model_width=768)[0] == 5000
