"""RewardModel against transformers' GPT2ForSequenceClassification, against itself run on separate
sequences (the shared-prefix equality), and the band and scalar export against independent maths."""
import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from factories import (SENTENCES, TINY_EOS_ID, random_gpt2, tiny_config, transformers_twin, write_tiny_checkpoint,
                       write_tiny_tokenizer)
from safetensors.torch import load_file, save_file

from minqr import MinqrError, load_tokenizer, save_gpt2
from minqr.data.batching import collate_pairs
from minqr.models.head import HeadConfig
from minqr.models.reward import RewardModel, quantile_band
from minqr.ranking import ranking_credit
from minqr.study.accuracy import pair_accuracy

HEADS = [("scalar", 1), ("quantile", 10), ("quantile", 7)]
CONFIG = tiny_config(n_positions=160)  # room for the long text of text_batch


def random_reward_model(kind="quantile", n=10, seed=0, config=None, objective=None):
    """A tiny RewardModel whose every tensor is random, the head's rows included (distinct rows:
    a swapped or averaged row cannot hide), scaled so that rewards are of order 1."""
    model = RewardModel(random_gpt2(config or CONFIG, seed), HeadConfig.make(kind, n, objective))
    rows = torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.score.weight.copy_(rows / model.score.in_features ** 0.5)
    return model.eval()


def right_padded(token_lists, pad_id):
    width = max(map(len, token_lists))
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(token_lists):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return ids, mask


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), layout="tokenizer.json"))


def text_batch(tokenizer):
    """Real texts of very different lengths, one a single token, right padded with EOS."""
    texts = SENTENCES + ["A", SENTENCES[0] * 3]
    tokens = tokenizer.encode_batch(texts)
    assert len(tokens[-2]) == 1 and tokenizer.eos_id not in sum(tokens, [])
    return right_padded(tokens, tokenizer.eos_id)


# ---- parity with transformers and the saved folder ----

@pytest.mark.parametrize("kind,n", HEADS)
def test_saved_folder_loads_in_transformers_with_equal_outputs(tmp_path, tokenizer, kind, n):
    model = random_reward_model(kind, n, seed=n)
    model.save_pretrained(tmp_path, tokenizer=tokenizer)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "GPT2ForSequenceClassification"
    ids, mask = text_batch(tokenizer)
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = hf(ids, attention_mask=mask).logits
    # N > 1: the expected reward first (what readers of logits[:, 0] take), then the N outputs
    expected = ours if n == 1 else torch.cat([ours.mean(-1, keepdim=True), ours], dim=1)
    assert theirs.shape == expected.shape == (len(ids), n + (n > 1))
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-5)
    # and the tokenizer saved beside it is the same tokenizer
    assert load_tokenizer(tmp_path).encode_batch(SENTENCES) == tokenizer.encode_batch(SENTENCES)


@pytest.mark.parametrize("kind,n", HEADS)
def test_save_then_load_gives_identical_outputs(tmp_path, tokenizer, kind, n):
    model = random_reward_model(kind, n, seed=3)
    model.save_pretrained(tmp_path, reward_stats={"mean": 0.25, "std": 1.5})
    loaded = RewardModel.from_pretrained(tmp_path)
    ids, mask = text_batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(model(ids, mask), loaded(ids, mask))
    assert loaded.head_config == model.head_config
    assert loaded.reward_stats == {"mean": 0.25, "std": 1.5}
    assert not loaded.training
    double = RewardModel.from_pretrained(tmp_path, dtype=torch.float64)
    assert {p.dtype for p in double.parameters()} == {torch.float64}


@pytest.mark.parametrize("kind,n", HEADS)
def test_config_and_tensors_in_the_saved_folder(tmp_path, tokenizer, kind, n):
    model = random_reward_model(kind, n)  # quantile: the default objective, mixture
    args = {"lr": 1e-3, "data": "train.jsonl"}
    model.save_pretrained(tmp_path, tokenizer=tokenizer, training_args=args, reward_stats={"mean": -1.0, "std": 3.0})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    assert config["model_type"] == "gpt2"
    assert config["num_labels"] == n + (n > 1) == len(config["id2label"])  # the mean row's label too
    assert {int(i): label for i, label in config["id2label"].items()} == {i: label for label, i in config["label2id"].items()}
    assert config["pad_token_id"] == TINY_EOS_ID == tokenizer.eos_id
    minqr = config["minqr"]
    assert (minqr["head"], minqr["num_quantiles"]) == (kind, n)
    assert minqr["quantile_levels"] == pytest.approx([(2 * i + 1) / (2 * n) for i in range(n)], abs=1e-15)
    assert (minqr["objective"], minqr["readout"]) == (("bradley_terry", "raw") if kind == "scalar" else ("mixture", "sorted"))
    assert not {"kappa", "lam", "margin"} & set(minqr)  # the paper objective's alone
    kinds = [] if kind == "scalar" else [f"kind{i}" for i in range(n)]
    assert list(config["label2id"]) == ["reward", *kinds]
    assert minqr.get("mean_row", False) == (kind != "scalar")
    assert (minqr["reward_mean"], minqr["reward_std"]) == (-1.0, 3.0)
    tensors = load_file(tmp_path / "model.safetensors")
    rows = tensors["score.weight"]
    assert rows.shape == (n + (n > 1), tiny_config().n_embd)
    assert torch.equal(rows[-n:], model.score.weight)
    if n > 1:
        torch.testing.assert_close(rows[0], model.score.weight.mean(0))
    assert "score.bias" not in tensors
    assert all(name.startswith("transformer.") for name in tensors if name != "score.weight")
    assert json.loads((tmp_path / "training_args.json").read_text()) == args
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}


def test_the_paper_objective_records_its_hyperparameters_and_raw_quantiles(tmp_path):
    model = RewardModel(random_gpt2(CONFIG), HeadConfig.make("quantile", 3, "paper", kappa=0.5, margin=2.0))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    minqr = config["minqr"]
    assert (minqr["objective"], minqr["readout"]) == ("paper", "raw")
    assert (minqr["kappa"], minqr["lam"], minqr["margin"]) == (0.5, 1.0, 2.0)
    assert list(config["label2id"]) == ["reward", "q0", "q1", "q2"]
    assert RewardModel.from_pretrained(tmp_path).head_config == model.head_config


def without_the_mean_row(folder) -> dict:
    """Make a saved folder as minqr wrote it before the mean row (N labels, N rows); its config."""
    config = json.loads((folder / "config.json").read_text())
    if config["minqr"].pop("mean_row", False):
        tensors = load_file(folder / "model.safetensors")
        tensors["score.weight"] = tensors["score.weight"][1:].contiguous()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        labels = list(config["label2id"])[1:]
        config["id2label"] = {str(i): label for i, label in enumerate(labels)}
        config["label2id"] = {label: i for i, label in enumerate(labels)}
        config["num_labels"] = len(labels)
    (folder / "config.json").write_text(json.dumps(config))
    return config


def test_a_folder_without_the_mean_row_is_refused(tmp_path, tokenizer):
    """A head of N > 1 outputs is saved with the expected reward as its first row; a folder without it
    (e.g. edited to drop it) would give transformers' readers one kind's output, so it is refused."""
    model = random_reward_model("quantile", 5, seed=9)
    model.save_pretrained(tmp_path)
    without_the_mean_row(tmp_path)
    with pytest.raises(MinqrError) as error:
        RewardModel.from_pretrained(tmp_path)
    assert str(error.value) == (f"{tmp_path / 'config.json'}: the minqr section's mean_row is False, but a head of "
                                "5 outputs is saved with the mean row first; re-save the model with minqr")


@pytest.mark.parametrize("change, message", [
    (lambda c: c["minqr"].update(objective=["mixture"]), "the minqr section's objective must be a name, got ['mixture']"),
    (lambda c: c.update(minqr="mixture"), "the minqr section must be an object of the head's settings, got str"),
    (lambda c: c.update(id2label=7), "id2label must map output indices to labels, got 7"),
    (lambda c: c["minqr"].update(reward_mean="abc", reward_std=1.0),
     "the minqr section's reward_mean and reward_std must be finite numbers (what training measured), got 'abc' "
     "and 1.0"),
])
def test_a_damaged_minqr_section_is_named(tmp_path, change, message):
    saved(tmp_path, n=4)
    config = json.loads((tmp_path / "config.json").read_text())
    change(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MinqrError) as error:
        RewardModel.from_pretrained(tmp_path)
    assert str(error.value).startswith(f"{tmp_path / 'config.json'}: {message}")


def test_a_head_that_is_not_finite_is_named(tmp_path):
    saved(tmp_path, n=4)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["score.weight"][2, 0] = float("nan")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MinqrError) as error:
        RewardModel.from_pretrained(tmp_path)
    assert str(error.value) == (f"{tmp_path}: score.weight holds values that are not finite (NaN or infinity): the "
                                "file is damaged or was saved from a run that diverged; use an earlier checkpoint")


def test_an_edited_mean_row_is_named(tmp_path):
    saved(tmp_path, n=4)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["score.weight"][0] += 1.0
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MinqrError, match="first row of score.weight is not the mean of the others"):
        RewardModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("kind,objective", [("quantile", "paper"), ("scalar", "bradley_terry")])
def test_models_saved_before_objectives_are_refused(tmp_path, kind, objective):
    """Before objectives, the minqr section had head, num_quantiles, kappa, lam, margin and the levels.
    Such a model is no longer read as paper (quantile) or bradley_terry (scalar): the error names the
    missing key and says what to do (CHANGELOG.md)."""
    n = 1 if kind == "scalar" else 4
    model = RewardModel(random_gpt2(CONFIG), HeadConfig.make(kind, n, objective))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["minqr"] = {"head": kind, "num_quantiles": n, "kappa": 1.0, "lam": 0.0 if kind == "scalar" else 0.5,
                       "margin": 1.0, "quantile_levels": model.head_config.levels}
    if n > 1:
        config["minqr"]["mean_row"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MinqrError) as error:
        RewardModel.from_pretrained(tmp_path)
    assert str(error.value) == (f"{tmp_path / 'config.json'}: the minqr section lacks objective; re-save the model "
                                "with minqr")
    config["minqr"]["objective"] = objective  # the same section with its objective loads
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = RewardModel.from_pretrained(tmp_path)
    head = loaded.head_config
    assert torch.equal(loaded.score.weight, model.score.weight)
    assert (head.head, head.num_quantiles, head.objective) == (kind, n, objective)


def test_save_keeps_other_files_and_replaces_the_model(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "checkpoint").mkdir()
    random_reward_model("quantile", 10, seed=1).save_pretrained(tmp_path)
    second = random_reward_model("quantile", 4, seed=2)
    second.save_pretrained(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n' and (tmp_path / "checkpoint").is_dir()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    loaded = RewardModel.from_pretrained(tmp_path)
    assert loaded.num_quantiles == 4 and torch.equal(loaded.score.weight, second.score.weight)


# A save in a process that SIGKILLs itself (no `finally` runs, nothing is cleaned up) at one of two
# moments: while the staging folder is being written, or once it is complete and its files are
# being renamed into place (after the staging folder's own rename and the first file's).
KILLED_SAVE = """
import os, signal, sys
import minqr.models.hf_folder
from minqr.models.reward import RewardModel

source, out, moment = sys.argv[1:]
if moment == "writing":
    def save_file(tensors, path, metadata=None):
        open(path, "wb").write(b"half a safetensors file")
        os.kill(os.getpid(), signal.SIGKILL)
    minqr.models.hf_folder.save_file = save_file
else:
    real_replace, calls = os.replace, []
    def replace(src, dst):
        calls.append(src)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    os.replace = replace
RewardModel.from_pretrained(source).save_pretrained(out)
"""


@pytest.mark.slow  # a real process killed while it saves: about 2.3 s of CPU each
@pytest.mark.parametrize("moment", ["writing", "moving"])
def test_the_next_save_removes_what_a_killed_save_left(tmp_path, moment):
    model = random_reward_model("quantile", 4, seed=1)
    model.save_pretrained(tmp_path / "source")
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "source"), str(out), moment],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [p.name for p in out.iterdir() if p.name.startswith(".")]  # a real kill leaves its staging
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(RewardModel.from_pretrained(out).score.weight, model.score.weight)


def test_ranking_credit_counts_a_tie_half_on_tensors_and_arrays():
    chosen, rejected = [1.0, 2.0, 3.0, -1.0], [0.0, 2.0, 4.0, -1.0]
    expected = [1.0, 0.5, 0.0, 0.5]
    assert ranking_credit(torch.tensor(chosen), torch.tensor(rejected)).tolist() == expected
    assert ranking_credit(np.array(chosen), np.array(rejected)).tolist() == expected
    assert pair_accuracy(chosen, rejected) == np.mean(expected)  # the analysis' accuracy agrees


# ---- pooling ----

def test_reward_is_read_at_the_last_real_token_with_either_padding():
    model = random_reward_model("quantile", 5, seed=4)
    generator = torch.Generator().manual_seed(5)
    lengths, width = [6, 1, 9], 9
    texts = [torch.randint(0, 300, (n,), generator=generator) for n in lengths]
    with torch.no_grad():
        alone = torch.cat([model(t[None]) for t in texts])  # no mask: the last position
        right_ids, right_mask = right_padded([t.tolist() for t in texts], TINY_EOS_ID)
        left_ids = torch.full((3, width), TINY_EOS_ID)
        left_mask = torch.zeros_like(left_ids)
        for row, t in enumerate(texts):
            left_ids[row, width - len(t):], left_mask[row, width - len(t):] = t, 1
        torch.testing.assert_close(model(right_ids, right_mask), alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(left_ids, left_mask), alone, atol=1e-5, rtol=1e-5)
        # by hand: the head applied to the backbone's hidden state at the last real token
        hidden = model.transformer(right_ids, right_mask)
        by_hand = torch.stack([hidden[row, n - 1] @ model.score.weight.T for row, n in enumerate(lengths)])
        torch.testing.assert_close(model(right_ids, right_mask), by_hand, atol=1e-5, rtol=1e-5)


# ---- shared-prefix pairs: THE equality of the issue ----

def random_pairs(seed):
    """Token-list pairs sharing prefixes of various lengths, with edge cases: no common prefix, one
    response a prefix of the other, single-token responses, identical prefixes of different length."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(0, 300, (n,), generator=g).tolist()

    pairs = []
    for prefix_length, chosen_length, rejected_length in [(12, 5, 9), (0, 7, 3), (20, 1, 1), (3, 14, 6), (30, 2, 11)]:
        prefix = tokens(prefix_length)
        pairs.append((prefix + tokens(chosen_length), prefix + tokens(rejected_length)))
    chosen = tokens(10)
    pairs.append((chosen, chosen[:6]))  # the rejected response is a prefix of the chosen one
    pairs.append((chosen[:4], chosen))  # and the other way round
    return pairs


def rewards_and_grads(model, run):
    """Rewards of `run(model)` and the gradient of a fixed random functional of them (averaged
    over the outputs, as a loss is)."""
    model.zero_grad()
    r_chosen, r_rejected = run(model)
    weights = torch.randn((2, *r_chosen.shape), generator=torch.Generator().manual_seed(7)) / r_chosen.numel()
    ((weights[0] * r_chosen).sum() + (weights[1] * r_rejected).sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return r_chosen.detach(), r_rejected.detach(), grads


@pytest.mark.parametrize("shared_prefix", [True, False])
@pytest.mark.parametrize("num_pairs", [1, 7])
@pytest.mark.parametrize("n", [1, 10])
def test_forward_pairs_equals_separate_sequences_rewards_and_gradients(shared_prefix, num_pairs, n):
    model = random_reward_model("scalar" if n == 1 else "quantile", n, seed=11)
    pairs = random_pairs(seed=num_pairs)[-num_pairs:]
    chosen, rejected = [c for c, _ in pairs], [r for _, r in pairs]
    batch = collate_pairs(chosen, rejected, pad_id=TINY_EOS_ID, shared_prefix=shared_prefix)
    assert batch.shared_prefix == shared_prefix

    def separately(m):
        return (torch.cat([m(torch.tensor([c])) for c in chosen]),
                torch.cat([m(torch.tensor([r])) for r in rejected]))

    want_c, want_r, want_grads = rewards_and_grads(model, separately)
    got_c, got_r, got_grads = rewards_and_grads(model, lambda m: m.forward_pairs(batch))
    assert got_c.shape == got_r.shape == (num_pairs, n)
    torch.testing.assert_close(got_c, want_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_r, want_r, atol=1e-5, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_forward_pairs_hidden_states_are_those_of_the_chosen_text_alone():
    model = random_reward_model("quantile", 3, seed=12)
    pairs = random_pairs(seed=13)
    batch = collate_pairs([c for c, _ in pairs], [r for _, r in pairs], pad_id=TINY_EOS_ID)
    with torch.no_grad():
        r_chosen, _, hidden = model.forward_pairs(batch, return_hidden=True)
        assert torch.equal(r_chosen, model.forward_pairs(batch)[0])
        for row, (chosen, _) in enumerate(pairs):
            alone = model.transformer(torch.tensor([chosen]))[0]  # [len, n_embd]
            torch.testing.assert_close(hidden[row, : len(chosen)], alone, atol=1e-5, rtol=1e-5)


# ---- the uncertainty band ----

@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_band_equals_an_independent_interpolation(n):
    quantiles = torch.randn(64, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    levels = np.array([(2 * i + 1) / (2 * n) for i in range(n)])
    for level in [0.0, 0.3, 0.8, 0.9, 1.0]:
        reward, lower, upper = quantile_band(quantiles, level)
        ordered = np.sort(quantiles.numpy(), axis=1)
        # np.interp is piecewise linear through the points and flat beyond the end points
        want_lower = [np.interp((1 - level) / 2, levels, row) for row in ordered]
        want_upper = [np.interp((1 + level) / 2, levels, row) for row in ordered]
        np.testing.assert_allclose(lower.numpy(), want_lower, rtol=0, atol=1e-12)
        np.testing.assert_allclose(upper.numpy(), want_upper, rtol=0, atol=1e-12)
        np.testing.assert_allclose(reward.numpy(), quantiles.numpy().mean(1), rtol=0, atol=1e-12)
        assert (lower <= upper).all()
        if level >= 1 - 1 / n:  # the band then spans all quantiles, so it holds their mean
            assert ((lower <= reward) & (reward <= upper)).all()
        if n == 1:
            assert torch.equal(lower, reward) and torch.equal(upper, reward)


def test_band_is_exact_at_the_quantile_levels():
    n = 10
    quantiles = torch.randn(5, n, dtype=torch.float64).sort(-1).values
    for i in range(n // 2, n):
        level = 2 * (2 * i + 1) / (2 * n) - 1  # (1 + level)/2 = tau_i and (1 - level)/2 = tau_{N-1-i}
        _, lower, upper = quantile_band(quantiles, level)
        torch.testing.assert_close(upper, quantiles[:, i], atol=1e-12, rtol=0)
        torch.testing.assert_close(lower, quantiles[:, n - 1 - i], atol=1e-12, rtol=0)


@pytest.mark.parametrize("objective", ["mixture", "independent", "paper"])
def test_reward_band_and_quantiles_are_relative_to_a_reference(tokenizer, objective):
    model = random_reward_model("quantile", 10, seed=5, objective=objective)
    ids, mask = text_batch(tokenizer)
    reference_ids, reference_mask = ids.flip(0), mask.flip(0)  # another reply per row
    with torch.no_grad():
        outputs, reference = model(ids, mask).double(), model(reference_ids, reference_mask).double()
        got = model.quantiles(ids, mask, reference=model(reference_ids, reference_mask))
        reward, lower, upper = model.reward_band(ids, mask, level=0.8, reference=model(reference_ids, reference_mask))
        by_group = model.quantiles(ids, mask, group=torch.zeros(len(ids), dtype=torch.long))
        raw = model.quantiles(ids, mask, raw=True)
        raw_band = model.reward_band(ids, mask, level=0.8, raw=True)
    # written out: kind by kind for the mixture, sorted minus the reference's mean for the others
    if objective == "mixture":
        want = (outputs - reference).sort(-1).values
        want_group = (outputs - outputs.mean(0)).sort(-1).values
    else:
        want = outputs.sort(-1).values - reference.mean(-1, keepdim=True)
        want_group = outputs.sort(-1).values - outputs.sort(-1).values.mean(0).mean()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_group.double(), want_group, atol=1e-5, rtol=0)
    for value, expected in zip((reward, lower, upper), quantile_band(want, 0.8)):
        torch.testing.assert_close(value.double(), expected, atol=1e-5, rtol=0)
    assert torch.equal(raw, model.head_config.quantiles(model(ids, mask).detach()))
    for value, expected in zip(raw_band, quantile_band(model(ids, mask).detach(), 0.8)):
        torch.testing.assert_close(value, expected)  # the mean of sorted outputs: summed in another order
    with pytest.raises(MinqrError, match="quantiles of 10 outputs needs a reference.*raw=True"):
        model.quantiles(ids, mask)
    with pytest.raises(MinqrError, match="reward_band.*needs a reference|quantiles of 10 outputs needs a reference"):
        model.reward_band(ids, mask)
    with pytest.raises(MinqrError, match="raw=True reads the raw outputs, so it takes no reference"):
        model.quantiles(ids, mask, reference=reference, raw=True)
    for level in (-0.1, 1.5, float("nan")):
        with pytest.raises(MinqrError, match="level"):
            quantile_band(torch.zeros(2, 3), level)


def test_scalar_band_needs_no_reference(tokenizer):
    model = random_reward_model("scalar", 1, seed=7)
    ids, mask = text_batch(tokenizer)
    with torch.no_grad():
        reward, lower, upper = model.reward_band(ids, mask)
        r = model(ids, mask)[:, 0]
        relative = model.reward_band(ids, mask, reference=model(ids.flip(0), mask.flip(0)))[0]
        want = r - model(ids.flip(0), mask.flip(0))[:, 0]
    assert torch.equal(reward, r) and torch.equal(lower, r) and torch.equal(upper, r)
    torch.testing.assert_close(relative, want)


# ---- the scalar export ----

def test_to_scalar_is_exactly_the_mean_of_the_quantiles(tmp_path, tokenizer):
    model = random_reward_model("quantile", 10, seed=6).double()
    model.reward_stats = {"mean": 0.5, "std": 2.0}
    scalar = model.to_scalar()
    assert scalar.head_config == HeadConfig.make("scalar") and scalar.score.weight.shape == (1, 32)
    ids, mask = text_batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(scalar(ids, mask)[:, 0], model(ids, mask).mean(-1), atol=1e-12, rtol=0)
        model.transformer.wte.weight.add_(1.0)  # the export has its own backbone
        assert not torch.equal(scalar.transformer.wte.weight, model.transformer.wte.weight)
    scalar.float().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_labels"] == 1 and config["minqr"]["head"] == "scalar"
    assert config["minqr"]["reward_mean"] == 0.5
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, attention_mask=mask).logits, scalar(ids, mask), atol=1e-5, rtol=1e-5)


# ---- construction and initialisation ----

def test_from_backbone_loads_the_weights_and_the_paper_quantiles_start_equal_and_small(tmp_path):
    written = write_tiny_checkpoint(tmp_path, seed=8)
    torch.manual_seed(0)
    model = RewardModel.from_backbone(tmp_path, head="quantile", num_quantiles=5, objective="paper", kappa=0.5,
                                      margin=2.0)
    for name, tensor in written.state_dict().items():
        assert torch.equal(model.transformer.state_dict()[name], tensor), name
    assert model.head_config == HeadConfig("quantile", 5, "paper", {"kappa": 0.5, "lam": 1.0, "margin": 2.0})
    rows = model.score.weight
    assert rows.shape == (5, 32) and torch.equal(rows, rows[:1].expand(5, -1)) and rows.abs().sum() > 0
    ids = torch.randint(0, 300, (16, 10), generator=torch.Generator().manual_seed(9))
    fresh = RewardModel.from_config(tiny_config(), num_quantiles=4, objective="paper")  # unit-scale ln_f
    with torch.no_grad():
        rewards = fresh.eval()(ids)
    assert torch.equal(rewards, rewards[:, :1].expand(-1, 4))  # no spread, no crossing at the start
    assert 0 < rewards.std() < 0.5
    assert RewardModel.from_backbone(tmp_path, head="scalar").num_quantiles == 1


def test_the_mixture_kinds_start_apart():
    """Identical rows are a saddle of the mixture (every kind gets the same gradient for ever): its N
    rows start independent, entries of std 1/sqrt(n_embd)."""
    torch.manual_seed(0)
    rows = RewardModel.from_config(tiny_config(n_embd=256), num_quantiles=64, objective="mixture").score.weight
    assert rows.shape == (64, 256)
    assert abs(rows.std().item() * 256 ** 0.5 - 1) < 0.05
    correlations = torch.corrcoef(rows.detach())[~torch.eye(64, dtype=torch.bool)]
    assert correlations.abs().max() < 0.35  # independent rows of 256 entries: |r| ~ 0.06


@pytest.mark.parametrize("kwargs,words", [
    (dict(head="scalar", num_quantiles=10), "scalar head"),
    (dict(head="scalar", objective="mixture"), "scalar head"),
    (dict(head="scalar", lam=1.0), "objective 'bradley_terry' has no hyper-parameter lam"),
    (dict(head="distributional"), "head must be one of"),
    (dict(num_quantiles=0), "num_quantiles"),
    (dict(objective="bradley_terry"), "quantile head cannot be trained by bradley_terry"),
    (dict(objective="median"), "objective must be one of bradley_terry, mixture, independent, paper"),
    (dict(kappa=1.0), "objective 'mixture' has no hyper-parameter kappa"),
    (dict(objective="paper", kappa=0.0), "kappa"),
    (dict(objective="paper", lam=-1.0), "lam"),
    (dict(objective="paper", margin=float("nan")), "margin"),
])
def test_bad_head_options(kwargs, words):
    with pytest.raises(MinqrError, match=words):
        HeadConfig.make(**kwargs)


def test_forward_rejects_masks_it_cannot_read():
    model = random_reward_model("quantile", 3)
    ids = torch.randint(0, 300, (2, 5))
    with pytest.raises(MinqrError, match="no real token"):
        model(ids, torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]))
    with pytest.raises(MinqrError, match="forward_pairs"):
        model(ids, torch.ones(2, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(MinqrError, match="T >= 1"):
        model(torch.zeros(2, 0, dtype=torch.long))


# ---- loading errors ----

def saved(tmp_path, n=4):
    model = random_reward_model("quantile", n, objective="paper")
    model.save_pretrained(tmp_path)
    return model


def test_missing_score_is_named(tmp_path):
    saved(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["score.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MinqrError, match=r"no score\.weight.*from_backbone"):
        RewardModel.from_pretrained(tmp_path)


def test_misshaped_score_is_named(tmp_path):
    saved(tmp_path, n=4)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["score.weight"] = torch.zeros(4, 32)  # the 4 rows without the mean row
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MinqrError, match=r"score\.weight is \[4, 32\].*\[5, 32\] \(the mean row and 4 outputs"):
        RewardModel.from_pretrained(tmp_path)


def test_inconsistent_config_is_named(tmp_path):
    saved(tmp_path, n=4)
    config = json.loads((tmp_path / "config.json").read_text())
    config["minqr"]["num_quantiles"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MinqrError, match="num_quantiles=3 and the mean row but the config has 5 labels"):
        RewardModel.from_pretrained(tmp_path)
    del config["minqr"]["kappa"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MinqrError, match="lacks kappa, a hyper-parameter of its objective paper"):
        RewardModel.from_pretrained(tmp_path)


def test_plain_gpt2_folder_is_not_a_reward_model(tmp_path):
    save_gpt2(random_gpt2(), tmp_path)
    with pytest.raises(MinqrError, match="no minqr section.*from_backbone"):
        RewardModel.from_pretrained(tmp_path)


def test_one_label_classifier_of_another_tool_loads_as_a_scalar_head(tmp_path, tokenizer):
    hf = transformers_twin(random_gpt2(CONFIG, seed=14), "GPT2ForSequenceClassification", num_labels=1,
                           pad_token_id=TINY_EOS_ID)
    with torch.no_grad():
        hf.score.weight.normal_()
    hf.save_pretrained(tmp_path)
    model = RewardModel.from_pretrained(tmp_path)
    assert model.head_config.head == "scalar"
    ids, mask = text_batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), hf(ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
