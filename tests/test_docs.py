"""The Python a user copies from the documents runs, and gives what it says: README.md's statistics
of a reply relative to a reference (its own padding and masks) and docs/guide.md's TRL reward
function, each run as written on a tiny mixture model saved where the snippet looks, and checked
against the statistics' definitions on the model run one text at a time (tiny_reward.py)."""
import re
from pathlib import Path

import pytest
import torch
from factories import ROOT, random_gpt2, tiny_config, write_tiny_tokenizer
from tiny_reward import outputs_one_by_one, statistic_by_definition

from minqr import load_tokenizer
from minqr.distribution.statistics import statistic_values
from minqr.models.head import HeadConfig
from minqr.models.reward import RewardModel


def python_blocks(document: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / document).read_text(), re.S)


def saved_mixture(folder: Path, seed: int = 0):
    """A mixture of N = 6 random kinds on a tiny GPT-2 of 1,024 positions (the snippets keep up to
    512 tokens of a text), saved in `folder`."""
    tokenizer = load_tokenizer(write_tiny_tokenizer(folder.parent / "tok", layout="tokenizer.json"))
    model = RewardModel(random_gpt2(tiny_config(n_positions=1024), seed), HeadConfig.make("quantile", 6, "mixture"))
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(seed)))
    model.save_pretrained(folder, tokenizer=tokenizer)
    return model.eval(), tokenizer


def run_block(code: str, folder_line: str, folder: Path, times: int = 1) -> dict:
    """Run a snippet with its model folder (`times` in it) pointed at `folder`; returns its names,
    with what it printed under "printed" (one tuple a print)."""
    assert code.count(folder_line) == times, f"the snippet no longer names {folder_line} {times} times"
    printed = []
    names = {"print": lambda *args: printed.append(args), "printed": printed}
    exec(compile(code.replace(folder_line, repr(str(folder))), "snippet", "exec"), names)
    return names


def test_the_readme_reads_statistics_relative_to_a_reference(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tokenizer = saved_mixture(tmp_path / "rm")
    [code] = python_blocks("README.md")
    names = run_block(code, '"runs/demo/quantile"', tmp_path / "rm")
    texts, replies = names["texts"], names["replies"]
    assert [args[0] for args in names["printed"]] == ["mean", "quantile:0.05", "cvar:0.25", "preference"]
    for statistic, values in names["printed"]:
        if statistic.startswith("quantile"):  # no definition written out: the model one text at a time
            outputs = torch.tensor(outputs_one_by_one(model, tokenizer, texts), dtype=torch.float64)  # [R + 1, N]
            expected = statistic_values(statistic, outputs[:-1], reference=outputs[-1:].expand(len(replies), -1),
                                        objective="mixture").tolist()
        else:
            expected = statistic_by_definition(model, tokenizer, texts[:-1], statistic,
                                               reference_texts=[texts[-1]] * len(replies))
        assert values.tolist() == pytest.approx(expected, abs=1e-5), statistic


def test_the_guides_trl_reward_function_gives_each_texts_expected_reward(tmp_path):
    model, tokenizer = saved_mixture(tmp_path / "rm", seed=1)
    [code] = [block for block in python_blocks("docs/guide.md") if "def minqr_reward" in block]
    names = run_block(code, '"runs/quantile"', tmp_path / "rm", times=2)  # the model's and the tokenizer's
    prompts = ["\n\nHuman: Hi!\n\nAssistant:", "\n\nHuman: Plan a trip.\n\nAssistant:", "\n\nHuman: x\n\nAssistant:"]
    completions = [" Hello, how can I help?", " Where to?", " " + "word " * 300]
    rewards = names["minqr_reward"](prompts, completions)
    ids = [tokenizer.encode(p + c) for p, c in zip(prompts, completions)]
    assert len(ids[-1]) > 600  # the last text is cut from the left to the snippet's 512 tokens
    ids = [i[-512:] for i in ids]
    with torch.no_grad():
        expected = [model(torch.tensor([i]))[0].double().mean().item() for i in ids]
    assert rewards == pytest.approx(expected, abs=1e-5)
