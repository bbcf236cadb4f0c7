"""The scalar export: its one output is the mean of the quantile model's outputs (float64 reference),
transformers loads it with the same numbers (also through its text-classification pipeline, as peers
read a reward model), the files around the weights carry over, bad input."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from factories import SENTENCES, load_tool, random_gpt2, tiny_config, write_tiny_tokenizer

from minqr import load_tokenizer
from minqr.data.pairs import Pair
from minqr.errors import MinqrError
from minqr.models.export import export_scalar
from minqr.models.head import HeadConfig
from minqr.models.reward import RewardModel
from minqr.study.scoring import score_pairs

ROOT = Path(__file__).resolve().parents[1]
TRAINING_ARGS = {"max_length": 48, "lr": 1e-5, "head": "quantile"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), layout="tokenizer.json"))


def save_model(folder, tokenizer, kind="quantile", n=10, seed=0):
    """A tiny reward model with every tensor random and distinct head rows, saved with its tokenizer,
    training args and reward statistics."""
    model = RewardModel(random_gpt2(tiny_config(n_positions=160), seed), HeadConfig.make(kind, n))
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(seed)))
    model.save_pretrained(folder, tokenizer=tokenizer, training_args=TRAINING_ARGS,
                          reward_stats={"mean": 0.25, "std": 1.5})
    return folder


def text_batch(tokenizer):
    """Texts of very different lengths (one a single token, one long), right padded with EOS."""
    tokens = tokenizer.encode_batch(SENTENCES + ["A", SENTENCES[0] * 3])
    width = max(map(len, tokens))
    ids = torch.full((len(tokens), width), tokenizer.eos_id)
    mask = torch.zeros_like(ids)
    for row, t in enumerate(tokens):
        ids[row, : len(t)], mask[row, : len(t)] = torch.tensor(t), 1
    return ids, mask


def export(model, out, *extra):
    return CliRunner().invoke(load_tool("export"), ["--model", str(model), "--scalar", "--out", str(out), *extra])


@pytest.mark.parametrize("n", [10, 7, 1])
def test_export_is_the_mean_of_the_quantiles_and_transformers_loads_it(tmp_path, tokenizer, n):
    source = save_model(tmp_path / "quantile", tokenizer, n=n, seed=n)
    result = export(source, tmp_path / "scalar")
    assert result.exit_code == 0, result.output
    ids, mask = text_batch(tokenizer)
    with torch.no_grad():
        # both run in float64, so that what differs is only the export: the averaged row, stored in float32
        expected = RewardModel.from_pretrained(source, dtype=torch.float64)(ids, mask).mean(-1)  # [B]
        exported = RewardModel.from_pretrained(tmp_path / "scalar", dtype=torch.float64)
        assert exported.head_config == HeadConfig.make("scalar")
        ours = exported(ids, mask)  # [B, 1]
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "scalar").eval()
        theirs = hf(ids, attention_mask=mask).logits  # [B, 1], float32
    assert type(hf).__name__ == "GPT2ForSequenceClassification" and ours.shape == theirs.shape == (len(ids), 1)
    assert expected.std() > 0.1  # outputs that differ from text to text: the comparison means something
    torch.testing.assert_close(ours[:, 0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(theirs.double(), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("exported", [False, True], ids=["quantile folder", "scalar export"])
def test_transformers_pipeline_gives_minqr_rewards(tmp_path, tokenizer, exported):
    """transformers.pipeline("text-classification") on a saved folder, texts of different lengths in one
    padded batch: the quantile folder's scores are its expected reward then its N raw outputs, the scalar
    export's its one reward,
    the mean of the quantiles; the reference runs minqr's RewardModel on one text at a time (no padding).
    The pipeline batches only with a pad token: the saved tokenizer_config.json names EOS (Tokenizer.files)."""
    source = save_model(tmp_path / "quantile", tokenizer, n=6, seed=3)
    folder = tmp_path / "scalar" if exported else source
    if exported:
        assert export(source, folder).exit_code == 0
    texts = SENTENCES[:4] + ["A", SENTENCES[1] * 2]
    assert len({len(tokenizer.encode(text)) for text in texts}) == len(texts)  # the batch needs padding

    pipe = transformers.pipeline("text-classification", model=str(folder), function_to_apply="none", top_k=None)
    label2id = json.loads((folder / "config.json").read_text())["label2id"]
    theirs = torch.full((len(texts), len(label2id)), torch.nan, dtype=torch.float64)
    for row, result in enumerate(pipe(texts, batch_size=len(texts))):  # every label, ordered by score
        for entry in result:
            theirs[row, label2id[entry["label"]]] = entry["score"]
    quantile_model = RewardModel.from_pretrained(source, dtype=torch.float64)
    with torch.no_grad():
        outputs = torch.cat([quantile_model(torch.tensor([tokenizer.encode(text)])) for text in texts])  # [B, 6]
    # the quantile folder's first label is the expected reward (its mean row), then the N outputs
    expected = outputs.mean(-1, keepdim=True) if exported else torch.cat([outputs.mean(-1, keepdim=True), outputs], 1)
    assert expected.std() > 0.1  # rewards that differ from text to text: the comparison means something
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=0)


def test_files_around_the_weights_carry_over(tmp_path, tokenizer):
    source = save_model(tmp_path / "quantile", tokenizer)
    (tmp_path / "scalar").mkdir()
    (tmp_path / "scalar" / "notes.txt").write_text("mine")
    assert export(source, tmp_path / "scalar").exit_code == 0
    config = json.loads((tmp_path / "scalar" / "config.json").read_text())
    assert config["num_labels"] == 1 and config["id2label"] == {"0": "reward"}
    assert config["minqr"]["head"] == "scalar" and config["minqr"]["num_quantiles"] == 1
    # the statistics of the expected reward are those of the scalar reward
    assert config["minqr"]["reward_mean"] == 0.25 and config["minqr"]["reward_std"] == 1.5
    args = json.loads((tmp_path / "scalar" / "training_args.json").read_text())
    assert {k: args[k] for k in TRAINING_ARGS} == TRAINING_ARGS
    assert args["exported_from"]["model"] == str(source)
    assert args["exported_from"]["head"]["num_quantiles"] == 10
    assert load_tokenizer(tmp_path / "scalar").encode_batch(SENTENCES) == tokenizer.encode_batch(SENTENCES)
    assert (tmp_path / "scalar" / "notes.txt").read_text() == "mine"  # other files in --out are left alone


def test_scoring_the_export_gives_the_mean_of_the_quantile_scores(tmp_path, tokenizer):
    source = save_model(tmp_path / "quantile", tokenizer, n=5, seed=4)
    assert export(source, tmp_path / "scalar").exit_code == 0
    pairs = [Pair(SENTENCES[i], SENTENCES[j], f"pair {i}") for i in range(4) for j in range(4) if i != j]
    quantile = score_pairs(RewardModel.from_pretrained(source), tokenizer, pairs, max_length=48, progress=False)
    scalar = score_pairs(RewardModel.from_pretrained(tmp_path / "scalar"), tokenizer, pairs, max_length=48,
                         progress=False)
    for q, s in zip(quantile, scalar):
        assert s.shape == (len(pairs), 1)
        np.testing.assert_allclose(s[:, 0], q.astype(np.float64).mean(axis=1), atol=1e-5, rtol=0)


def test_bad_exports_are_refused_clearly(tmp_path, tokenizer):
    source = save_model(tmp_path / "quantile", tokenizer)
    scalar = save_model(tmp_path / "scalar", tokenizer, kind="scalar", n=1)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(source, no_weights)
    (no_weights / "model.safetensors").unlink()
    out = tmp_path / "out"
    cases = [
        (["--model", str(source), "--out", str(out)], ["nothing to export", "--scalar"]),
        (["--model", str(scalar), "--scalar", "--out", str(out)], ["already a scalar reward model"]),
        (["--model", str(source), "--scalar", "--out", str(source)], ["is the model folder itself"]),
        (["--model", str(no_weights), "--scalar", "--out", str(out)], ["no weights in", "model.safetensors"]),
        # a typo in a middle folder: a path, never a hub id (it used to reach huggingface_hub's id check)
        (["--model", str(tmp_path / "runs" / "dmeo" / "quantile"), "--scalar", "--out", str(out)],
         [f"no such model folder: '{tmp_path}/runs/dmeo/quantile' ({tmp_path}/runs does not exist;"]),
        (["--model", str(source), "--scalar", "--out", str(tmp_path / "dangling")],
         [f"out {tmp_path / 'dangling'} is a symbolic link to {tmp_path / 'nowhere' / 'x'}, which does not exist"]),
    ]
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x")
    for argv, words in cases:
        result = CliRunner().invoke(load_tool("export"), argv)
        assert result.exit_code == 1 and result.output.startswith("Error: "), (argv, result.output)
        for word in words:
            assert word in result.output, (argv, result.output)
        assert "Traceback" not in result.output and not out.exists()
    assert RewardModel.from_pretrained(source).num_quantiles == 10  # the source is untouched
    # "~" in --out is the home folder, as in --model (a config file's path is not expanded by a shell)
    home = tmp_path / "home"
    home.mkdir()
    result = CliRunner().invoke(load_tool("export"), ["--model", str(source), "--scalar", "--out", "~/exported"],
                                env={"HOME": str(home)})
    assert result.exit_code == 0, result.output
    assert (home / "exported" / "config.json").is_file() and not Path("~").exists()


def test_an_export_writes_only_into_a_new_folder_or_over_an_earlier_export(tmp_path, tokenizer):
    """An earlier export is replaced with --overwrite only; a training run (its checkpoint and log would
    sit beside a model they do not belong to) and a folder of the user's files never, and they stay
    as they were."""
    source = save_model(tmp_path / "quantile", tokenizer)
    export = load_tool("export")
    out = tmp_path / "out"
    assert CliRunner().invoke(export, ["--model", str(source), "--scalar", "--out", str(out)]).exit_code == 0
    again = CliRunner().invoke(export, ["--model", str(source), "--scalar", "--out", str(out)])
    assert again.exit_code == 1 and again.output == (f"Error: out {out} holds an earlier export: pass --overwrite to "
                                                     "replace it, or choose another folder\n")
    assert CliRunner().invoke(export, ["--model", str(source), "--scalar", "--out", str(out), "--overwrite"]).exit_code == 0
    run = save_model(tmp_path / "run", tokenizer)
    (run / "training_args.json").write_text('{"max_length": 64}')
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    (tmp_path / "a_file").write_text("mine")
    result = CliRunner().invoke(export, ["--model", str(source), "--scalar", "--out", str(tmp_path / "a_file")])
    assert result.exit_code == 1 and result.output == (f"Error: out {tmp_path / 'a_file'} is a file, not a folder: the "
                                                       "export is a model folder; choose another path\n")
    for folder, what in ((run, "a training run"), (mine, "model files that minqr did not write (config.json)")):
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        result = CliRunner().invoke(export, ["--model", str(source), "--scalar", "--out", str(folder), "--overwrite"])
        assert result.exit_code == 1 and result.output == (
            f"Error: out {folder} holds {what}, which the export would write over: choose another folder\n")
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("kind, n", [("quantile", 10), ("scalar", 1)])
def test_normalized_export(tmp_path, tokenizer, kind, n):
    """--normalize: the exported reward is (mean of the outputs - 0.25) / 1.5, the statistics saved with
    the model, folded into the weights so that transformers gives it too."""
    source = save_model(tmp_path / "source", tokenizer, kind=kind, n=n, seed=3)
    result = export(source, tmp_path / "normalized", "--normalize")
    assert result.exit_code == 0, result.output
    ids, mask = text_batch(tokenizer)
    with torch.no_grad():
        raw = RewardModel.from_pretrained(source, dtype=torch.float64)(ids, mask).mean(-1)  # [B]
        ours = RewardModel.from_pretrained(tmp_path / "normalized", dtype=torch.float64)(ids, mask)[:, 0]
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "normalized").eval()
        theirs = hf(ids, attention_mask=mask).logits[:, 0]
    expected = (raw - 0.25) / 1.5
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs.double(), expected, atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "normalized" / "config.json").read_text())
    assert (config["minqr"]["reward_mean"], config["minqr"]["reward_std"]) == (0.0, 1.0)


def test_normalize_needs_the_statistics(tmp_path, tokenizer):
    source = save_model(tmp_path / "source", tokenizer)
    config = json.loads((source / "config.json").read_text())
    del config["minqr"]["reward_mean"], config["minqr"]["reward_std"]
    (source / "config.json").write_text(json.dumps(config))
    result = export(source, tmp_path / "normalized", "--normalize")
    assert result.exit_code == 1 and not (tmp_path / "normalized").exists()
    assert result.output == (f"Error: normalize: {source} has no reward statistics (config.json's minqr.reward_mean "
                             "and reward_std): training measures them on its held-out pairs, so train with "
                             "--eval-data\n")
    config["minqr"].update(reward_mean=0.0, reward_std=0.0)
    (source / "config.json").write_text(json.dumps(config))
    result = export(source, tmp_path / "normalized", "--normalize")
    assert result.exit_code == 1 and result.output == (
        f"Error: normalize: {source} has reward mean 0.0 and std 0.0; normalising needs a finite mean and a "
        "positive std\n")


def test_an_export_killed_between_its_renames_leaves_a_folder_no_loader_takes(tmp_path, tokenizer, monkeypatch):
    """The files of a model folder are renamed in one by one: a kill after the new weights and before
    the new config.json left an earlier export's config (its reward statistics, what it was exported
    from) over the new weights, and both minqr and transformers loaded it as one model."""
    import minqr.models.reward as reward

    source = save_model(tmp_path / "quantile", tokenizer)
    out = tmp_path / "out"
    export_scalar(source, out)
    real_replace, moved = os.replace, []

    def killed_after_the_weights(src, dst):
        real_replace(src, dst)
        moved.append(Path(dst).name)
        if Path(dst).name == "model.safetensors":
            raise KeyboardInterrupt  # Ctrl-C between two renames

    monkeypatch.setattr(reward.os, "replace", killed_after_the_weights)
    with pytest.raises(KeyboardInterrupt):
        export_scalar(source, out, normalize=True, overwrite=True)
    monkeypatch.undo()
    assert "model.safetensors" in moved and "config.json" not in moved
    with pytest.raises(MinqrError, match="config.json not found"):
        RewardModel.from_pretrained(out)
    with pytest.raises((OSError, ValueError)):  # "Unrecognized model ... no model_type" in transformers 4.x
        transformers.AutoModelForSequenceClassification.from_pretrained(out)
