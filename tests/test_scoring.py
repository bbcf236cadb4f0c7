"""Scoring: the arrays against the model run on each text alone (both layouts, any batch size, the
data's order), the CLI's printed accuracies against the written file, the metadata, and bad input."""
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from factories import SENTENCES, load_tool, random_gpt2, tiny_config, write_tiny_tokenizer
from test_pairs import SURROGATE_LINE, surrogate_error

import minqr
from minqr import MinqrError, load_tokenizer, save_gpt2
from minqr.data.pairs import Pair, load_pairs
from minqr.device import autocast_dtype, resolve_device
from minqr.models.head import HeadConfig
from minqr.models.hf_folder import DAMAGED
from minqr.models.reward import RewardModel
from minqr.objectives.references import quantile_levels
from minqr.study.analysis import summarize
from minqr.study.scores_file import load_scores
from minqr.study.scoring import score_pairs, score_texts, score_to_file
from minqr.synthetic.folder import make_synthetic_task
from minqr.synthetic.task import SyntheticTask
from minqr.synthetic.truth import load_truth

SCORE = load_tool("score")  # tools/score.py's command

ROOT = Path(__file__).resolve().parents[1]
POSITIONS = 200
MAX_LENGTH = 100  # below the longest text (142 tokens): one pair is cut from the left


def random_reward_model(head="quantile", n=10, seed=0, config=None, objective=None):
    """A tiny RewardModel with every tensor random, the head's rows distinct (so outputs differ)."""
    model = RewardModel(random_gpt2(config or tiny_config(n_positions=POSITIONS), seed),
                        HeadConfig.make(head, n, objective))
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def make_pairs(seed=0):
    """Pairs of every shape the batching must handle, in a random order: a shared prompt with
    responses of different lengths, one response a prefix of the other, a one-token text, no
    shared prefix at all, and texts longer than MAX_LENGTH tokens."""
    rng = np.random.default_rng(seed)
    dialogues = [s.split("\n\nAssistant:") for s in SENTENCES if "\n\nAssistant:" in s]
    prompts = [prompt + "\n\nAssistant:" for prompt, _ in dialogues]
    answers = [answer for _, answer in dialogues]
    texts = []
    for _ in range(10):
        prompt = prompts[rng.integers(len(prompts))]
        a, b = rng.choice(len(answers), size=2, replace=False)
        texts.append((prompt + answers[a], prompt + answers[b]))
    texts += [
        (SENTENCES[0], SENTENCES[0][: len(SENTENCES[0]) // 2]),  # rejected is a prefix of chosen
        ("A", SENTENCES[1]),  # a one-token text
        (SENTENCES[2], SENTENCES[3]),  # nothing shared beyond the speaker tag
        (SENTENCES[4], SENTENCES[1]),  # nothing shared at all
        (SENTENCES[0] * 3, SENTENCES[0] * 2 + SENTENCES[1]),  # both cut from the left
    ]
    order = rng.permutation(len(texts))
    return [Pair(texts[i][0], texts[i][1], f"pair {i}") for i in order]


def write_jsonl(path, pairs, gzipped=False):
    lines = "".join(json.dumps({"chosen": p.chosen, "rejected": p.rejected}) + "\n" for p in pairs)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gzipped:
        with gzip.open(path, "wt") as f:
            f.write(lines)
    else:
        path.write_text(lines)
    return path


def alone(model, tokenizer, text, max_length):
    """The model's outputs [N] on one text run by itself: no padding, no batch, no shared prefix."""
    ids = torch.tensor([tokenizer.encode(text)[-max_length:]])
    with torch.no_grad():
        return model(ids)[0].numpy()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), layout="tokenizer.json"))


@pytest.fixture(scope="module")
def quantile_folder(tmp_path_factory, tokenizer):
    """A saved quantile model (N=7) with its tokenizer and training args."""
    folder = tmp_path_factory.mktemp("model")
    random_reward_model("quantile", 7, seed=7).save_pretrained(folder, tokenizer=tokenizer,
                                                               training_args={"max_length": MAX_LENGTH})
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", make_pairs(seed=1))


# ---- the arrays ----

@pytest.mark.parametrize("kind,n", [("scalar", 1), ("quantile", 7)])
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_scores_are_each_text_scored_alone_in_the_data_order(tokenizer, kind, n, shared_prefix):
    model = random_reward_model(kind, n, seed=n)
    pairs = make_pairs(seed=n)
    expected_chosen = np.stack([alone(model, tokenizer, p.chosen, MAX_LENGTH) for p in pairs])  # [P, N]
    expected_rejected = np.stack([alone(model, tokenizer, p.rejected, MAX_LENGTH) for p in pairs])
    model.train()
    for batch_size in (1, 6):  # one pair a batch; several batches, the last one short
        chosen, rejected = score_pairs(model, tokenizer, pairs, max_length=MAX_LENGTH, batch_size=batch_size,
                                       shared_prefix=shared_prefix, progress=False)
        assert chosen.dtype == rejected.dtype == np.float32
        assert chosen.shape == rejected.shape == (len(pairs), n)
        np.testing.assert_allclose(chosen, expected_chosen, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(rejected, expected_rejected, atol=1e-5, rtol=1e-5)
    assert model.training  # scored in eval mode, then given back as it was


def test_batches_are_not_in_the_data_order_so_the_order_test_can_fail(tokenizer):
    from minqr.data.batching import tokenize_pairs

    widths = tokenize_pairs(make_pairs(seed=1), tokenizer, MAX_LENGTH).row_widths(shared_prefix=True)
    assert not np.all(np.diff(widths) <= 0)  # widest-first batching reorders these pairs


def test_both_layouts_give_the_same_numbers_on_real_data(hh_pairs_path, gpt2_tokenizer_dir):
    tokenizer = load_tokenizer(gpt2_tokenizer_dir)
    config = tiny_config(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                         bos_token_id=tokenizer.eos_id, n_positions=96)
    model = random_reward_model("quantile", 10, seed=2, config=config)
    pairs = load_pairs(hh_pairs_path)[0][:48]
    shared = score_pairs(model, tokenizer, pairs, max_length=48, batch_size=16, progress=False)
    separate = score_pairs(model, tokenizer, pairs, max_length=48, batch_size=16, shared_prefix=False, progress=False)
    for a, b in zip(shared, separate):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    # and the first pair against the model run on each text alone
    np.testing.assert_allclose(shared[0][0], alone(model, tokenizer, pairs[0].chosen, 48), atol=1e-5, rtol=1e-5)


def test_bfloat16_scores_are_close_to_float32_but_not_equal(tokenizer):
    model = random_reward_model("quantile", 10, seed=3)
    pairs = make_pairs(seed=3)
    exact = score_pairs(model, tokenizer, pairs, max_length=MAX_LENGTH, progress=False)[0]
    bf16 = score_pairs(model, tokenizer, pairs, max_length=MAX_LENGTH, dtype="bfloat16", progress=False)[0]
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, exact)
    assert np.abs(bf16 - exact).max() < 0.05 * (exact.max() - exact.min())


def test_device_and_precision_rules(monkeypatch):
    """minqr.device, shared by scoring and training: auto is the GPU when there is one (under
    torchrun each process its own), and auto precision is bfloat16 there, float32 on a CPU."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert (autocast_dtype("auto", cpu), autocast_dtype("auto", gpu)) == (torch.float32, torch.bfloat16)
    assert autocast_dtype("bfloat16", cpu) == torch.bfloat16 and autocast_dtype("float32", gpu) == torch.float32
    with pytest.raises(MinqrError, match="--dtype must be one of auto, float32, bfloat16"):
        autocast_dtype("float16", cpu)
    with pytest.raises(MinqrError, match="'gpu' is not a device"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == cpu
    with pytest.raises(MinqrError, match="sees no GPU"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == gpu
    assert resolve_device("auto", local_rank=1) == resolve_device("cuda", local_rank=1) == torch.device("cuda:1")
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda:0")  # a GPU named stays that GPU


def test_scoring_does_not_import_the_training_module():
    code = "import sys, minqr.study.scoring; assert 'minqr.training.loop' not in sys.modules, 'minqr.training.loop imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_texts_longer_than_the_model_are_refused(tokenizer):
    model = random_reward_model("quantile", 4, seed=0, config=tiny_config(n_positions=128))
    with pytest.raises(MinqrError, match="142 tokens is longer than the model's 128 positions"):
        score_pairs(model, tokenizer, make_pairs(), max_length=500, progress=False)


# ---- the CLI and the file ----

def printed_accuracies(output):
    mean = re.search(r"pair accuracy \(on the mean of the (\d+) outputs\): ([0-9.]+)", output)
    per_quantile = re.findall(r"^\s+q(\d+)\s+tau=([0-9.]+)\s+([0-9.]+)$", output, flags=re.M)
    return mean, per_quantile


def test_an_anchor_reply_is_scored_as_the_reply_to_each_prompt(tmp_path, tokenizer, quantile_folder, data_file):
    out = tmp_path / "anchored.npz"
    result = CliRunner().invoke(SCORE, ["--model", str(quantile_folder), "--data", str(data_file), "--out", str(out),
                                             "--anchor-reply", " I see."])
    assert result.exit_code == 0, result.output
    scores = load_scores(out)
    model = RewardModel.from_pretrained(quantile_folder)
    pairs = load_pairs(data_file)[0]
    prompts = [p.chosen[: p.chosen.rindex("\n\nAssistant:") + len("\n\nAssistant:")] if "\n\nAssistant:" in p.chosen
               else "" for p in pairs]
    expected = np.stack([alone(model, tokenizer, prompt + " I see.", MAX_LENGTH) for prompt in prompts])
    np.testing.assert_allclose(scores.anchor, expected, atol=1e-5, rtol=1e-5)
    assert scores.metadata["anchor_reply"] == " I see."
    # the quantiles are read relative to it: each kind minus its output for the anchor, then sorted
    np.testing.assert_allclose(scores.quantiles("chosen"), np.sort(scores.chosen - scores.anchor, axis=1), atol=1e-6)
    # and so is the per-quantile accuracy score prints (recomputed here from the file's raw arrays)
    c, r = (np.sort(getattr(scores, side).astype(np.float64) - scores.anchor, axis=1) for side in ("chosen", "rejected"))
    _, per_quantile = printed_accuracies(result.stdout)
    assert [a for _, _, a in per_quantile] == [f"{a:.4f}" for a in win_share(c, r)]
    raw = win_share(np.sort(scores.chosen, axis=1), np.sort(scores.rejected, axis=1))
    assert [f"{a:.4f}" for a in raw] != [a for _, _, a in per_quantile]  # the anchor changes what is printed
    empty = CliRunner().invoke(SCORE, ["--model", str(quantile_folder), "--data", str(data_file), "--out",
                                            str(tmp_path / "e.npz"), "--anchor-reply", " "])
    assert empty.exit_code == 1 and "anchor_reply (--anchor-reply) is empty" in empty.output
    # a byte the shell's locale cannot decode arrives as a lone surrogate: said before any scoring
    half = CliRunner().invoke(SCORE, ["--model", str(quantile_folder), "--data", str(data_file), "--out",
                                      str(tmp_path / "h.npz"), "--anchor-reply", " ok\udcff"])
    assert half.exit_code == 1 and "anchor_reply (--anchor-reply) holds a lone surrogate '\\udcff' at character 3" \
        in half.output, half.output


def test_cli_prints_the_accuracies_of_the_file_it_writes(tmp_path, tokenizer, quantile_folder, data_file):
    out = tmp_path / "scores.npz"
    result = CliRunner().invoke(SCORE, ["--model", str(quantile_folder), "--data", str(data_file),
                                             "--out", str(out), "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    scores = load_scores(out)
    # the file holds what the model gives each text alone, in the data file's order
    model = RewardModel.from_pretrained(quantile_folder)
    pairs = load_pairs(data_file)[0]
    expected = np.stack([alone(model, tokenizer, p.chosen, MAX_LENGTH) for p in pairs])
    np.testing.assert_allclose(scores.chosen, expected, atol=1e-5, rtol=1e-5)

    # the mean of the outputs, recomputed from the file
    c, r = scores.chosen.astype(np.float64), scores.rejected.astype(np.float64)
    mean, per_quantile = printed_accuracies(result.stdout)
    assert mean and int(mean[1]) == 7 and mean[2] == f"{win_share(c.mean(1), r.mean(1)):.4f}"
    # a mixture's sorted raw outputs mix its kinds' free constants into every quantile: without an
    # anchor reply none is printed, and the note says why and what to do
    assert scores.readout == "sorted" and scores.anchor is None and per_quantile == []
    assert "free constant" in result.stdout and "--anchor-reply" in result.stdout

    # the file is the user's now: a second job replaces it only with --overwrite
    before = out.read_bytes()
    again = ["--model", str(quantile_folder), "--data", str(data_file), "--out", str(out), "--batch-size", "2"]
    result = CliRunner().invoke(SCORE, again)
    assert result.exit_code == 1
    assert result.output == f"Error: out {out} exists: pass --overwrite to replace it, or choose another path\n"
    assert out.read_bytes() == before
    assert CliRunner().invoke(SCORE, [*again, "--overwrite"]).exit_code == 0
    # a symbolic link as --out, dangling or not, with --overwrite or not: refused, the link as it was
    for target in (out, tmp_path / "nowhere.npz"):
        link = tmp_path / "link.npz"
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        result = CliRunner().invoke(SCORE, [*again[:5], str(link), "--overwrite"])
        assert result.exit_code == 1 and result.output.startswith(f"Error: out {link} is a symbolic link (to {target})")
        assert link.is_symlink() and not (tmp_path / "nowhere.npz").exists()
    # the file the job reads, by its name or by a hard link, with --overwrite: refused, the file as it was
    context, hard_link = tmp_path / "context.jsonl", tmp_path / "hard-link.jsonl"
    shutil.copy(data_file, context)
    os.link(data_file, hard_link)
    for option, path in [("--data", data_file), ("--data", hard_link), ("--context", context)]:
        held = path.read_bytes()
        argv = [*again[:5], str(path), "--overwrite", "--context", str(context)]
        result = CliRunner().invoke(SCORE, argv)
        assert result.exit_code == 1 and result.output == (f"Error: out {path} is also {option}, which this job "
                                                           "reads: writing there would replace it; choose another "
                                                           "path\n"), path
        assert path.read_bytes() == held
    # and the file a folder's split names, and the synthetic truth beside it (data a folder, or a file)
    task = make_synthetic_task(tmp_path / "task", num_train=30, num_test=10, num_samples=8)
    for data, split, target, name in [(task, ["--split", "test"], task / "test.jsonl", "the file --data names"),
                                      (task / "test.jsonl", [], task / "test_truth.npz", "the truth beside --data")]:
        held = target.read_bytes()
        result = CliRunner().invoke(SCORE, ["--model", str(quantile_folder), "--data", str(data), *split,
                                            "--out", str(target), "--overwrite"])
        assert result.exit_code == 1 and result.output == (f"Error: out {target} is also {name}, which this job "
                                                           "reads: writing there would replace it; choose another "
                                                           "path\n"), result.output
        assert target.read_bytes() == held


def test_a_paper_head_prints_the_accuracy_of_each_raw_quantile(tmp_path, tokenizer, data_file):
    """paper's outputs share one free constant, which cancels within a pair: its per-quantile
    accuracy ranks output k of the two responses as they are, with no anchor needed."""
    folder = tmp_path / "paper"
    random_reward_model("quantile", 5, seed=3, objective="paper").save_pretrained(
        folder, tokenizer=tokenizer, training_args={"max_length": MAX_LENGTH})
    out = tmp_path / "scores.npz"
    result = CliRunner().invoke(SCORE, ["--model", str(folder), "--data", str(data_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    scores = load_scores(out)
    assert scores.readout == "raw" and scores.anchor is None
    mean, per_quantile = printed_accuracies(result.stdout)
    levels = quantile_levels(5, dtype=torch.float64).numpy()
    assert [int(k) for k, _, _ in per_quantile] == list(range(5))
    assert [t for _, t, _ in per_quantile] == [f"{t:.3f}" for t in levels]
    assert [a for _, _, a in per_quantile] == [f"{a:.4f}" for a in win_share(scores.chosen, scores.rejected)]
    assert len({a for _, _, a in per_quantile}) > 1  # the quantiles rank differently: the check means something


def win_share(c, r):
    """Pair accuracy recomputed from the file: a win is 1, a tie 1/2 (per column for [P, N])."""
    return np.mean(np.where(c > r, 1.0, np.where(c == r, 0.5, 0.0)), axis=0)


def test_scalar_model_prints_one_accuracy(tmp_path, tokenizer, data_file):
    folder = tmp_path / "scalar"
    random_reward_model("scalar", 1, seed=5).save_pretrained(folder, tokenizer=tokenizer)
    out = tmp_path / "scores.jsonl"
    result = CliRunner().invoke(SCORE, ["--model", str(folder), "--data", str(data_file), "--out", str(out),
                                             "--max-length", str(MAX_LENGTH)])
    assert result.exit_code == 0, result.output
    scores = load_scores(out)
    assert scores.chosen.shape == (len(load_pairs(data_file)[0]), 1) and scores.taus is None
    c, r = scores.chosen[:, 0], scores.rejected[:, 0]
    expected = np.mean((c > r) + 0.5 * (c == r))
    assert re.search(r"^pair accuracy: ([0-9.]+)$", result.stdout, flags=re.M)[1] == f"{expected:.4f}"
    assert "per-quantile" not in result.stdout


def test_metadata_of_a_folder_split_and_the_options(tmp_path, quantile_folder):
    pairs = make_pairs(seed=4)
    write_jsonl(tmp_path / "hh" / "harmless-base" / "test.jsonl.gz", pairs, gzipped=True)
    out = tmp_path / "scores.npz"
    argv = ["--model", str(quantile_folder), "--data", str(tmp_path / "hh"), "--subset", "harmless-base",
            "--out", str(out), "--max-length", "32", "--batch-size", "4", "--no-shared-prefix",
            "--device", "cpu", "--dtype", "float32"]
    result = CliRunner().invoke(SCORE, argv)
    assert result.exit_code == 0, result.output
    meta = load_scores(out).metadata
    assert meta["model"] == str(quantile_folder) and meta["head"] == "quantile" and meta["num_quantiles"] == 7
    np.testing.assert_array_equal(meta["taus"], quantile_levels(7, dtype=torch.float64).numpy())
    assert meta["data"] == str(tmp_path / "hh") and meta["subset"] == "harmless-base"
    assert meta["data_file"] == str(tmp_path / "hh" / "harmless-base" / "test.jsonl.gz")
    assert meta["split"] == "test" and meta["workload"] == "harmless-base test"
    assert meta["options"] == {"max_length": 32, "shared_prefix": False, "batch_size": 4, "dtype": "float32",
                               "device": "cpu", "skip_bad": False}
    assert meta["minqr_version"] == minqr.__version__ and "truth" not in meta and "label" not in meta
    tokenizer = load_tokenizer(quantile_folder)
    longest = [max(map(len, tokenizer.encode_batch([p.chosen, p.rejected]))) for p in pairs]
    assert meta["num_truncated"] == sum(length > 32 for length in longest)
    # the defaults: max_length from training_args.json; --workload and --label are written as given
    result = CliRunner().invoke(SCORE, ["--model", str(quantile_folder), "--data", str(tmp_path / "hh"),
                                             "--subset", "harmless-base", "--out", str(out), "--overwrite",
                                             "--workload", "Harmless", "--label", "QR N=7"])
    assert result.exit_code == 0, result.output
    scores = load_scores(out)
    assert scores.metadata["options"]["max_length"] == MAX_LENGTH and scores.metadata["options"]["shared_prefix"]
    assert scores.workload == "Harmless" and scores.label == "QR N=7"


def test_synthetic_task_scores_name_their_truth(tmp_path):
    task = make_synthetic_task(tmp_path / "synthetic", num_train=30, num_test=20, num_samples=8)
    torch.manual_seed(0)
    model = RewardModel.from_backbone(task / "model", num_quantiles=5)
    model.save_pretrained(tmp_path / "model", tokenizer=load_tokenizer(task / "model"))
    summary = score_to_file(tmp_path / "model", task, tmp_path / "scores.npz", progress=False)
    scores = load_scores(tmp_path / "scores.npz")
    assert scores.metadata["truth"] == str((task / "test_truth.npz").resolve())
    assert scores.metadata["truth_sha256"] == hashlib.sha256((task / "test_truth.npz").read_bytes()).hexdigest()
    assert scores.workload == "synthetic test" and summary.num_pairs == scores.num_pairs == 20
    # no training_args.json: texts are kept up to the model's number of positions
    assert scores.metadata["options"]["max_length"] == model.transformer.config.n_positions
    true_chosen, _ = load_truth(scores.truth_path, scores.num_pairs)  # it lines up with the scores
    assert true_chosen.shape == (20, 8)
    # the anchor reply to each pair's question, scored as that text alone
    anchor_texts = np.load(task / "test_truth.npz")["anchor_texts"]
    tokenizer = load_tokenizer(task / "model")
    expected = np.stack([alone(model, tokenizer, str(text), 10_000) for text in anchor_texts])
    np.testing.assert_allclose(scores.anchor, expected, atol=1e-5, rtol=1e-5)
    assert (scores.metadata["objective"], scores.readout) == ("mixture", "sorted")
    # the backbone probe: one accuracy and chance per tag, chance the majority share of the held-out half
    probe = scores.metadata["backbone_probe"]
    assert probe["tags"] == list(SyntheticTask().tags) and probe["controversial"] == SyntheticTask().controversial.tolist()
    assert len(probe["accuracy"]) == len(probe["chance"]) == 15
    assert all(0 <= a <= 1 and 0.5 <= c <= 1 for a, c in zip(probe["accuracy"], probe["chance"]))
    # a dropped line breaks the alignment: the truth is then left out, and the summary says why
    shutil.copytree(task, tmp_path / "edited")
    with open(tmp_path / "edited" / "test.jsonl", "a") as f:
        f.write(json.dumps({"chosen": "same", "rejected": "same"}) + "\n")
    summary = score_to_file(tmp_path / "model", tmp_path / "edited", tmp_path / "edited.npz", progress=False)
    assert "truth" not in load_scores(tmp_path / "edited.npz").metadata
    assert "not recorded as the truth" in str(summary) and "1 lines" in str(summary)
    # an anchor reply of the user's replaces the task's (worth 0), which the truth is relative to
    summary = score_to_file(tmp_path / "model", task, tmp_path / "own_anchor.npz", progress=False, anchor_reply=" OK.")
    own = load_scores(tmp_path / "own_anchor.npz")
    assert "truth" not in own.metadata and own.metadata["anchor_reply"] == " OK." and own.anchor is not None
    assert "--anchor-reply replaces the task's own anchor reply" in str(summary)
    # a truth file given by hand that is not the one recorded (another task's of as many pairs): refused too
    other = make_synthetic_task(tmp_path / "other-task", num_train=30, num_test=20, num_samples=8, seed=2)
    with pytest.raises(MinqrError) as refused:
        summarize(load_scores(tmp_path / "scores.npz"), n_resamples=0, truth=other / "test_truth.npz")
    assert str(refused.value) == (f"{tmp_path / 'scores.npz'}: the truth file {other / 'test_truth.npz'} is not the "
                                  f"one these scores were made against (they record {task / 'test_truth.npz'}, "
                                  "whose contents differ), so its rows are other pairs' truths: pass that task's "
                                  "truth file, or leave out the truth")
    assert summarize(load_scores(tmp_path / "scores.npz"), n_resamples=0,
                     truth=task / "test_truth.npz")["coverage"] is not None  # the recorded one, by hand: taken
    # the task made again in its place (another seed): the scores no longer line up with its truth
    make_synthetic_task(task, num_train=30, num_test=20, num_samples=8, seed=1, overwrite=True)
    with pytest.raises(MinqrError, match="the truth file .*test_truth.npz has changed since these scores were made"):
        summarize(load_scores(tmp_path / "scores.npz"), n_resamples=0)
    assert summarize(load_scores(tmp_path / "scores.npz"), n_resamples=0, truth=False)["coverage"] is None


# ---- bad input: one clear line, exit 1, no file ----

def broken_folder(tmp_path, tokenizer, quantile_folder, what):
    folder = tmp_path / "model"
    if what == "plain GPT-2":
        save_gpt2(random_gpt2(tiny_config()), folder)
        tokenizer.save(folder)
        return folder
    shutil.copytree(quantile_folder, folder)
    removed = {"config": ["config.json"], "weights": ["model.safetensors"],
               "tokenizer": ["tokenizer.json", "tokenizer_config.json"]}[what]
    for name in removed:
        (folder / name).unlink()
    return folder


@pytest.mark.parametrize("what,words", [
    ("config", ["config.json not found"]),
    ("weights", ["no weights in", "model.safetensors"]),
    ("tokenizer", ["no tokenizer in", "copy the tokenizer"]),
    ("plain GPT-2", ["not a minqr reward model", "from_backbone"]),
])
def test_bad_model_folder_is_a_clear_error(tmp_path, tokenizer, quantile_folder, data_file, what, words):
    folder = broken_folder(tmp_path, tokenizer, quantile_folder, what)
    out = tmp_path / "scores.npz"
    result = CliRunner().invoke(SCORE, ["--model", str(folder), "--data", str(data_file), "--out", str(out)])
    assert result.exit_code == 1 and result.output.startswith("Error: ")
    for word in words:
        assert word in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize("damaged", ["model.safetensors", "tokenizer.json"])
def test_a_damaged_model_file_is_one_line_that_names_it(tmp_path, quantile_folder, data_file, damaged):
    folder = tmp_path / "model"
    shutil.copytree(quantile_folder, folder)
    path = folder / damaged
    path.write_bytes(path.read_bytes()[:1000])  # a copy cut short
    problem = {"model.safetensors": ": not a safetensors file, or cut short: its 1,000 bytes do not hold the header "
                                    "it announces;",
               "tokenizer.json": " cannot be read as a tokenizer (EOF while parsing a string at line 1 column 1000):"}
    result = CliRunner().invoke(SCORE, ["--model", str(folder), "--data", str(data_file),
                                             "--out", str(tmp_path / "scores.npz")])
    assert result.exit_code == 1
    tokenizer_hint = (". A reward model folder carries its tokenizer (tools/train.py saves it there); copy the tokenizer's "
                      "files into it") if damaged == "tokenizer.json" else ""
    assert result.output == f"Error: {path}{problem[damaged]} {DAMAGED}{tokenizer_hint}\n"


def test_damaged_training_args_are_one_line_that_names_them(tmp_path, quantile_folder, data_file):
    folder = tmp_path / "model"
    shutil.copytree(quantile_folder, folder)
    (folder / "training_args.json").write_bytes(b"\x80 not text")
    result = CliRunner().invoke(SCORE, ["--model", str(folder), "--data", str(data_file),
                                             "--out", str(tmp_path / "scores.npz")])
    assert result.exit_code == 1
    assert result.output == (f"Error: {folder / 'training_args.json'} is not valid JSON ('utf-8' codec can't decode "
                             "byte 0x80 in position 0: invalid start byte): fix or delete it\n")


def test_bad_data_and_options_are_clear_errors(tmp_path, quantile_folder, data_file):
    bad = tmp_path / "bad.jsonl"
    lines = data_file.read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    out = tmp_path / "scores.npz"
    cases = [
        (["--data", str(tmp_path / "absent.jsonl")], ["no such data file", "absent.jsonl"]),
        (["--data", str(bad)], [f"{bad}:3", "malformed JSON", "--skip-bad"]),
        (["--data", str(data_file), "--split", "train"], ["split 'train'", "is a file"]),
        (["--data", str(data_file), "--out", str(tmp_path / "scores.txt")], [".npz", ".jsonl"]),
        (["--data", str(data_file), "--max-length", "201"], ["max_length 201", "200 positions"]),
        (["--data", str(tmp_path), "--subset", "helpful-base"], ["no test.jsonl.gz or test.jsonl"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["--data", str(data_file), "--device", "cuda"], ["sees no GPU"]))
    for argv, words in cases:
        if "--out" not in argv:
            argv = argv + ["--out", str(out)]
        result = CliRunner().invoke(SCORE, ["--model", str(quantile_folder)] + argv)
        assert result.exit_code == 1 and result.output.startswith("Error: "), (argv, result.output)
        for word in words:
            assert word in result.output, (argv, result.output)
        assert "Traceback" not in result.output and not out.exists()
    # --skip-bad scores the good lines and says what it skipped
    result = CliRunner().invoke(SCORE, ["--model", str(quantile_folder), "--data", str(bad), "--out", str(out),
                                             "--skip-bad"])
    assert result.exit_code == 0 and "skipped 1 malformed lines" in result.stdout
    assert load_scores(out).num_pairs == len(lines)


def test_a_lone_surrogate_is_bad_data_with_its_line(tmp_path, quantile_folder, data_file):
    """Valid JSON holding what no tokenizer takes: an error naming the line, skipped with --skip-bad."""
    bad = tmp_path / "surrogate.jsonl"
    lines = data_file.read_text().splitlines()
    bad.write_text("\n".join(lines[:1] + [SURROGATE_LINE] + lines[1:]) + "\n")
    argv = ["--model", str(quantile_folder), "--data", str(bad), "--out", str(tmp_path / "scores.npz")]
    result = CliRunner().invoke(SCORE, argv)
    assert result.exit_code == 1 and result.output == surrogate_error(bad, 2)
    result = CliRunner().invoke(SCORE, argv + ["--skip-bad"])
    assert result.exit_code == 0 and "skipped 0 malformed lines and 1 with bad fields" in result.output
    assert load_scores(tmp_path / "scores.npz").num_pairs == len(lines)


# ---- a broken model, and the progress bar in a log file ----

def test_a_model_that_gives_nan_is_called_broken_at_its_first_batch(tmp_path, tokenizer, data_file, monkeypatch):
    folder = tmp_path / "broken"
    model = random_reward_model("quantile", 7, seed=7)
    with torch.no_grad():
        model.transformer.ln_f.weight[3] = float("nan")  # as a diverged training leaves it
    model.save_pretrained(folder, tokenizer=tokenizer, training_args={"max_length": MAX_LENGTH})
    out = tmp_path / "scores.npz"
    calls = []
    forward_pairs = RewardModel.forward_pairs
    monkeypatch.setattr(RewardModel, "forward_pairs", lambda self, batch: calls.append(1) or forward_pairs(self, batch))
    argv = ["--model", str(folder), "--data", str(data_file), "--out", str(out)]
    result = CliRunner().invoke(SCORE, argv + ["--batch-size", "2"])
    assert result.exit_code == 1 and len(calls) == 1 and not out.exists()
    result = CliRunner().invoke(SCORE, argv + ["--batch-size", "100"])  # one batch: pair 0 is the first
    assert result.output.endswith(f"Error: the reward model {folder} is broken: it gives NaN rewards (first for pair 0 of "
                             "the data; scoring stopped at that batch, nothing was written). Its weights hold NaN or "
                             "inf: train it again (with a lower --lr?), or score another model\n")


def test_progress_into_a_log_file_is_redrawn_every_10_seconds_only(tokenizer, capsys):
    """stderr is no TTY here (captured): 12 batches over more than 0.6 s would draw 6 or more lines at the
    terminal's 0.1 s; a log file gets the first and the last only."""
    model = random_reward_model("quantile", 3)
    forward_pairs = model.forward_pairs

    def slow(batch):
        time.sleep(0.05)
        return forward_pairs(batch)

    model.forward_pairs = slow
    pairs = [Pair("\n\nHuman: hi\n\nAssistant: a", f"\n\nHuman: hi\n\nAssistant: {k}", f"pair {k}") for k in range(12)]
    score_pairs(model, tokenizer, pairs, max_length=MAX_LENGTH, batch_size=1, progress=True)
    drawn = capsys.readouterr().err.split("\r")
    assert [line for line in drawn if "scoring" in line] and len(drawn) <= 4, drawn


def test_normalize_applies_the_saved_reward_statistics(tmp_path, tokenizer, data_file):
    """--normalize writes (output - mean) / std for every output and the anchor, with the statistics in
    config.json; a model without them is refused before any scoring."""
    folder = tmp_path / "model"
    random_reward_model("quantile", 5, seed=2).save_pretrained(folder, tokenizer=tokenizer,
                                                               training_args={"max_length": MAX_LENGTH},
                                                               reward_stats={"mean": -0.75, "std": 2.5})
    argv = ["--model", str(folder), "--data", str(data_file), "--anchor-reply", " I see."]
    assert CliRunner().invoke(SCORE, [*argv, "--out", str(tmp_path / "raw.npz")]).exit_code == 0
    result = CliRunner().invoke(SCORE, [*argv, "--out", str(tmp_path / "normal.npz"), "--normalize"])
    assert result.exit_code == 0, result.output
    raw, normal = load_scores(tmp_path / "raw.npz"), np.load(tmp_path / "normal.npz")  # the numbers as stored
    for name in ("chosen", "rejected", "anchor"):
        expected = (getattr(raw, name).astype(np.float64) + 0.75) / 2.5
        np.testing.assert_allclose(normal[name], expected, atol=1e-6, rtol=0)
    assert load_scores(tmp_path / "normal.npz").metadata["normalized"] == {"mean": -0.75, "std": 2.5}
    assert printed_accuracies(result.stdout)[0][2] == printed_accuracies(
        CliRunner().invoke(SCORE, [*argv, "--out", str(tmp_path / "again.npz")]).stdout)[0][2]

    bare = tmp_path / "bare"
    random_reward_model("quantile", 5, seed=2).save_pretrained(bare, tokenizer=tokenizer)
    result = CliRunner().invoke(SCORE, ["--model", str(bare), "--data", str(data_file), "--out",
                                             str(tmp_path / "n.npz"), "--normalize"])
    assert result.exit_code == 1 and not (tmp_path / "n.npz").exists()
    assert result.output == (f"Error: normalize: {bare} has no reward statistics (config.json's minqr.reward_mean and "
                             "reward_std): training measures them on its held-out pairs, so train with --eval-data\n")


def test_the_analysis_reads_normalized_scores_in_the_models_units(tmp_path, tokenizer, data_file):
    """A scores file written with --normalize is read back as the model's own outputs (its
    probabilities and coverage are in those units)."""
    folder = tmp_path / "model"
    random_reward_model("quantile", 5, seed=3).save_pretrained(folder, tokenizer=tokenizer,
                                                               training_args={"max_length": MAX_LENGTH},
                                                               reward_stats={"mean": 1.25, "std": 0.5})
    argv = ["--model", str(folder), "--data", str(data_file)]
    assert CliRunner().invoke(SCORE, [*argv, "--out", str(tmp_path / "raw.npz")]).exit_code == 0
    assert CliRunner().invoke(SCORE, [*argv, "--out", str(tmp_path / "n.npz"), "--normalize"]).exit_code == 0
    raw, normal = load_scores(tmp_path / "raw.npz"), load_scores(tmp_path / "n.npz")
    np.testing.assert_allclose(normal.chosen, raw.chosen, atol=1e-5, rtol=0)
    np.testing.assert_allclose(normal.rejected, raw.rejected, atol=1e-5, rtol=0)
    stored = np.load(tmp_path / "n.npz")["chosen"]  # the file itself holds the normalised numbers
    np.testing.assert_allclose(stored, (raw.chosen - 1.25) / 0.5, atol=1e-5, rtol=0)


def test_score_texts_scores_in_eval_mode_and_gives_the_mode_back(tokenizer):
    """With dropout, a forward in training mode gives other numbers: score_texts must switch to eval
    mode when the model is training, and leave a model in eval mode as it is."""
    model = RewardModel(random_gpt2(tiny_config(n_positions=POSITIONS, resid_pdrop=0.5), seed=4),
                        HeadConfig.make("quantile", 3))
    pairs = make_pairs(seed=2)
    texts = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]  # a pair's two share a prompt
    expected = np.stack([alone(model.eval(), tokenizer, text, MAX_LENGTH) for text in texts])  # [M, 3]
    token_lists = [tokenizer.encode(text)[-MAX_LENGTH:] for text in texts]
    for training in (True, False):
        model.train(training)
        for shared_prefix in (True, False):
            np.testing.assert_allclose(score_texts(model, token_lists, batch_size=4, shared_prefix=shared_prefix),
                                       expected, atol=1e-5, rtol=1e-5)
        assert all(module.training == training for module in model.modules())


def test_refusals_that_need_nothing_read_make_no_folder(tmp_path, quantile_folder, data_file):
    """A bad --out name is refused before the lock beside --out is made, so no folder appears."""
    out = tmp_path / "new" / "sub" / "x.txt"
    result = CliRunner().invoke(SCORE, ["--model", str(quantile_folder), "--data", str(data_file),
                                             "--out", str(out)])
    assert result.exit_code == 1 and f"out {out}: a scores file's name ends in .npz" in result.output
    assert not (tmp_path / "new").exists()


def test_deep_json_and_a_mistyped_model_path_are_one_line_errors(tmp_path, quantile_folder, data_file, monkeypatch):
    lines = data_file.read_text().splitlines()
    deep = tmp_path / "deep.jsonl"
    deep.write_text("\n".join(lines[:2] + ['{"chosen": ' + "[" * 100_000 + "]" * 100_000 + "}"] + lines[2:]) + "\n")
    argv = ["--model", str(quantile_folder), "--data", str(deep), "--out", str(tmp_path / "s.npz")]
    result = CliRunner().invoke(SCORE, argv)
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: {deep}:3: malformed JSON (nested deeper than 100 levels at column 111)")
    result = CliRunner().invoke(SCORE, argv + ["--skip-bad"])
    assert result.exit_code == 0 and "skipped 1 malformed lines" in result.output, result.output
    assert load_scores(tmp_path / "s.npz").num_pairs == len(lines)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    result = CliRunner().invoke(SCORE, ["--model", "runs/dmeo/quantile", "--data", str(data_file),
                                             "--out", "t.npz"])
    assert result.exit_code == 1 and result.output.startswith(
        "Error: no such model folder: 'runs/dmeo/quantile' (runs/dmeo does not exist;"), result.output


def test_score_texts_stops_at_outputs_that_are_not_finite(tokenizer):
    """What the adapters, best-of-N and the anchors read: a model that gives NaN is an error naming
    how many texts, not NaN rewards (best-of-N wrote them, no JSON, and picked candidate 0)."""
    model = random_reward_model("quantile", 4, seed=2)
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = float("nan")
    token_lists = tokenizer.encode_batch(["\n\nHuman: hi\n\nAssistant: a", "Waves roll in."])
    with pytest.raises(MinqrError, match=r"NaN or infinite outputs for 2 of 2 texts \(the first: text 0\)"):
        score_texts(model, token_lists)
    assert np.isnan(score_texts(model, token_lists, check_finite=False)).all()  # the server checks per request
    # copies of a text are run once, but counted and numbered as the caller gave them
    with pytest.raises(MinqrError, match=r"NaN or infinite outputs for 4 of 4 texts \(the first: text 0\)"):
        score_texts(model, [token_lists[0]] * 3 + [token_lists[1]])
