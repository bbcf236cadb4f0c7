"""A tiny mixture reward model saved as a folder, and the statistics of its outputs computed by
their definitions in float64 Python, for the adapters' tests (`from tiny_reward import ...`).

    tiny_reward_folder(folder, template=None, n=6, seed=0) -> (path, model, tokenizer)
    outputs_one_by_one(model, tokenizer, texts) -> [[N floats] a text]
    statistic_by_definition(model, tokenizer, texts, text, groups=None, reference_texts=None) -> list[float]
"""
import math

import torch
from factories import random_gpt2, tiny_config, write_tiny_tokenizer

from minqr import load_tokenizer
from minqr.data.chat import ChatTemplate
from minqr.models.head import HeadConfig
from minqr.models.reward import RewardModel


def tiny_reward_folder(folder, template=None, n=6, seed=0):
    """A mixture reward model with N distinct random rows, saved under folder/rm with the tiny
    tokenizer (and `template`, a Jinja chat template, if given)."""
    tokenizer = load_tokenizer(write_tiny_tokenizer(folder / "tok", layout="tokenizer.json"))
    if template is not None:
        tokenizer.chat_template = ChatTemplate(template, {}, "test")
    model = RewardModel(random_gpt2(tiny_config(), seed), HeadConfig.make("quantile", n, "mixture"))
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(seed)))
    model.save_pretrained(folder / "rm", tokenizer=tokenizer)
    return folder / "rm", model.eval(), tokenizer


def outputs_one_by_one(model, tokenizer, texts):
    """Each text's raw outputs [N] as a list of floats, the model run on the text alone (no padding)."""
    with torch.no_grad():
        return [model(torch.tensor([tokenizer.encode(t)]))[0].double().tolist() for t in texts]


def statistic_by_definition(model, tokenizer, texts, text, groups=None, reference_texts=None):
    """"mean", "cvar:ALPHA" or "preference" of each text's outputs, kind by kind relative to its
    reference text's outputs, or to the mean outputs of the texts with the same group key."""
    outputs = outputs_one_by_one(model, tokenizer, texts)
    if reference_texts is not None:
        references = outputs_one_by_one(model, tokenizer, reference_texts)
    else:
        references = []
        for i in range(len(texts)):
            members = [outputs[j] for j in range(len(texts)) if groups[j] == groups[i]]
            references.append([sum(m[k] for m in members) / len(members) for k in range(len(outputs[i]))])
    values = []
    for h, r in zip(outputs, references):
        d = [a - b for a, b in zip(h, r)]
        n = len(d)
        if text == "mean":
            values.append(sum(d) / n)
        elif text.startswith("cvar:"):  # Rockafellar-Uryasev: max over t of t - E[(t - X)^+] / alpha
            alpha = float(text.split(":")[1])
            values.append(max(t - sum(max(t - x, 0.0) for x in d) / (n * alpha) for t in d))
        elif text == "preference":
            values.append(sum(1 / (1 + math.exp(-x)) for x in d) / n)
        else:
            raise ValueError(f"no definition here for {text!r}")
    return values
