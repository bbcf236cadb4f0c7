"""A synthetic task's folder: `make_synthetic_task(folder)` writes the data, its truth, a tokenizer
and a tiny random GPT-2 to train from (`minqr synthetic`, tools/synthetic.py).

Files written:
    train.jsonl, test.jsonl   {"chosen": ..., "rejected": ...} a line (minqr's data format)
    test_truth.npz            aligned with test.jsonl line by line (P test pairs, G groups, V tags):
        chosen_samples, rejected_samples     [P, S] float32  the response's reward for S random
                                                             annotators of the population
        chosen_group_means, ..._group_stds   [P, G]          the Gaussian of each group: the exact
        rejected_group_means, ..._group_stds [P, G]          distribution is their mixture with
        group_weights                        [G]             these weights (see mixture_quantiles)
        quantile_levels                      [10]            tau_i = (2i+1)/20, the paper's N=10
        chosen_quantiles, rejected_quantiles [P, 10]         the exact quantiles at those levels
        preference_probability               [P]             P(chosen preferred to rejected)
        chosen_tags, rejected_tags           [P, V] int8     which tags each response has
        tag_names, controversial_tags        [V] str, bool   the tags, and which split the groups
        anchor_texts                         [P] str         the anchor reply to each test pair's
                                                             question, whose reward is 0 for all
    task.json                 the task's parameters, the tag table, the Bayes accuracy (with annotator
                              pools also group_rewards_scale: minqr/synthetic/pools.py)
    tokenizer/                a byte-level BPE trained on train.jsonl (minqr.load_tokenizer reads it)
    model/                    a tiny random GPT-2 (2 layers, 64 wide) with that tokenizer inside:
                              the `--model` of the offline demo

Rewards are in logit units (a difference of 1 is odds e:1), so a model trained by a Bradley-Terry
likelihood learns them in the same units: only the additive constants are free, and the anchor
fixes those.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import models, pre_tokenizers, trainers

from minqr.atomic import atomic_dir, check_replaceable
from minqr.errors import MinqrError
from minqr.models.gpt2 import GPT2, GPT2Config
from minqr.models.hf_folder import save_gpt2
from minqr.models.tokenizer import Tokenizer, byte_level_bpe
from minqr.options import check_options, option, seed_option
from minqr.synthetic.pools import pooled_task
from minqr.synthetic.task import TASK_VARIANTS, sample_pairs
from minqr.synthetic.truth import bayes_accuracy, bayes_accuracy_on_labels, truth_arrays

# The demo's backbone: small enough to train in seconds on a 2-core CPU, deep enough to add up tags.
TASK_KIND = "a synthetic task"  # what its .minqr-made marker says it is (minqr/atomic.py)
TINY_MODEL = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
TOKENIZER_VOCAB_SIZE = 512  # a target: the BPE stops earlier once every word is one token
def train_tokenizer(texts, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Tokenizer:
    """A GPT-2-style byte-level BPE trained on `texts`, with <|endoftext|> as its last id."""
    # vocab_size - 1 learnt tokens, then EOS as the last id, as in GPT-2
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return Tokenizer(byte_level_bpe(models.BPE(), texts, trainer))


def tiny_backbone(tokenizer: Tokenizer, seed: int) -> GPT2:
    """A randomly initialised GPT-2 of TINY_MODEL's shape over the tokenizer's vocabulary."""
    config = GPT2Config(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.eos_id,
                        eos_token_id=tokenizer.eos_id, **TINY_MODEL)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        return GPT2(config)


def _write_jsonl(path: Path, chosen, rejected, annotators=None) -> None:
    with open(path, "w") as f:
        for i, (c, r) in enumerate(zip(chosen, rejected)):
            row = {"chosen": c, "rejected": r} | ({} if annotators is None else {"annotator": annotators[i]})
            f.write(json.dumps(row) + "\n")



@dataclass
class SyntheticConfig:
    """The options of `minqr synthetic` (make_synthetic_task)."""

    out: str = option(help="folder to write: a new or empty one, or one minqr wrote with --overwrite (replaced as a "
                      "whole)")
    variant: str = option("demo", "demo: the offline demo's task; shifted: other group shares (75/25), wider "
                          "personal deviations and more controversial tags", TASK_VARIANTS)
    num_train: int = option(40_000, "training pairs", low=1)
    num_test: int = option(1000, "held-out pairs", low=1)
    seed: int = seed_option("seed of the data, the truth samples and the tiny model")
    labels_per_annotator: int = option(0, "K: a pool of annotators, each labelling K training pairs (rows carry "
                                       "'annotator'), with held-out pairs of known and of new annotators "
                                       "(minqr/synthetic/pools.py); 0: a fresh annotator for every label",
                                       low=0)
    overwrite: bool = option(False, "replace --out if it holds anything (only a folder minqr wrote, with nothing "
                             "added since)", in_file=False)

    def __post_init__(self):
        check_options(self)  # every range and choice the fields declare
        if self.labels_per_annotator > self.num_train:
            raise MinqrError(f"--labels-per-annotator {self.labels_per_annotator} is more than the {self.num_train} "
                             "training pairs (--num-train): one annotator could not label that many")


def make_synthetic_task(folder, num_train: int = 40_000, num_test: int = 1000, seed: int = 0,
                        num_samples: int = 256, variant: str = "demo", labels_per_annotator: int = 0,
                        overwrite: bool = False) -> Path:
    """Write the task's data, truth, tokenizer and tiny model into `folder` (atomically: a folder
    that holds anything is replaced as a whole only with `overwrite`, and one that holds anything
    minqr did not write never, minqr.atomic). The same
    arguments give the same data, truth, tokenizer and weights. `variant` names one of TASK_VARIANTS;
    `labels_per_annotator` K > 0 writes the task with annotator pools (minqr/synthetic/pools.py)
    instead of one fresh annotator a label."""
    SyntheticConfig(out=str(folder), variant=variant, num_train=num_train, num_test=num_test, seed=seed,
                    labels_per_annotator=labels_per_annotator, overwrite=overwrite)  # checks
    if num_samples < 1:
        raise MinqrError(f"num_samples must be at least 1, got {num_samples}")
    task = TASK_VARIANTS[variant]
    check_replaceable(folder, "--out", overwrite=overwrite, kind=TASK_KIND)  # before the minute of work below
    # independent streams for the data and the truth, so that e.g. more truth samples leave the data
    # unchanged; within the data's stream the test pairs come after the training pairs, so another
    # num_train (or annotator pools) draws another test set
    data_rng, truth_rng = (np.random.default_rng([seed, stream]) for stream in (0, 1))
    pooled, pooled_facts = {}, {}
    if labels_per_annotator:
        pooled, pooled_facts = pooled_task(task, data_rng, truth_rng, num_train, num_test, labels_per_annotator,
                                           num_samples)
        train = pooled.pop("train.jsonl")[1]
    else:
        train = sample_pairs(task, data_rng, num_train)
    test = sample_pairs(task, data_rng, num_test)
    truth = truth_arrays(task, test, truth_rng, num_samples)
    p = truth["preference_probability"]
    summary = {
        "description": "minqr synthetic preference task (see minqr/synthetic/)",
        "seed": seed, "variant": variant, "num_train": num_train, "num_test": num_test,
        "truth_samples": num_samples, "labels_per_annotator": labels_per_annotator,
        **task.to_dict(),
        # the ceiling for a reward model on test.jsonl: expected over fresh labels ...
        "bayes_accuracy": bayes_accuracy(p),
        # ... and on the labels test.jsonl actually holds (the chosen side is the likelier one)
        "bayes_accuracy_on_labels": bayes_accuracy_on_labels(p),
        "model": TINY_MODEL,
        **pooled_facts,
    }
    tokenizer = train_tokenizer(train["chosen"] + train["rejected"])
    with atomic_dir(folder, "--out", overwrite=overwrite, kind=TASK_KIND) as tmp:
        _write_jsonl(tmp / "train.jsonl", train["chosen"], train["rejected"], train.get("ids"))
        _write_jsonl(tmp / "test.jsonl", test["chosen"], test["rejected"])
        for name, (kind, payload) in pooled.items():
            if kind == "jsonl":
                _write_jsonl(tmp / name, payload["chosen"], payload["rejected"], payload["ids"])
            else:
                with open(tmp / name, "wb") as f:
                    np.savez_compressed(f, **payload)
        with open(tmp / "test_truth.npz", "wb") as f:
            np.savez_compressed(f, **truth)
        (tmp / "task.json").write_text(json.dumps(summary, indent=2) + "\n")
        tokenizer.save(tmp / "tokenizer")
        save_gpt2(tiny_backbone(tokenizer, seed), tmp / "model")
        tokenizer.save(tmp / "model")  # a Hugging Face model folder carries its tokenizer
    return Path(folder)

