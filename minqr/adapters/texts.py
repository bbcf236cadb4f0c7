"""A reward model ready to give RL trainers one number per (prompt, completion): the text it reads,
its raw outputs, and a statistic of its reward distribution relative to a reference.

    rewards = TextRewards.load("runs/mixture", statistic="cvar:0.25")
    values, mean, spread = rewards.statistic_values(prompts, completions, group=prompts)   # [M] each

The text. A prompt and its completion are either strings, read as prompt + completion (as TRL and
minqr's data do), or lists of {"role", "content"} messages (TRL's conversational format), rendered
with the reward model's chat template as minqr renders conversations in training
(minqr/data/chat.py, prompt_reply_texts). A string reply (a completion or reference) to a
conversation is the assistant's message (verl passes the response alone, a reference reply is
often one text for every prompt). A model whose tokenizer has no template was trained on the
HH-style text of message lists ("\\n\\nHuman: ...\\n\\nAssistant: ..."), which is then used, with a
warning, as it is when a string prompt meets message-list replies (training reads such a pair so:
a completion and its reference are always read in one rendering). A prompt, completion or reference
that is neither a string nor a list of messages is refused, naming its row; which roles a
conversation may hold (a tool turn, a developer message) is the chat template's to say. Texts longer
than `max_length` tokens (default: the --max-length the model was trained with, else its number of
positions) are cut from the left, as in training: the completion survives.

The reference (minqr/distribution/statistics.py says why one is needed): `group`, one key per text
whose equal values mark completions of the same prompt (the prompt itself will do), or
`references`, a reply per text whose outputs are the reference. Neither: the mean is the expected
reward itself; any other statistic of N > 1 outputs is refused. A group needs two texts or more in
the call: a lone completion is its own reference, and its reward says nothing of it, so it is
refused (TRL on several GPUs hands each process its share of the completions, which can split a
prompt's group, and verl with one response a prompt has none: there give a reference reply instead).

Whose reward: by default the population's. `annotators`, one id per text, asks for each named
person's instead: the statistic with the mixture's kinds weighted by that person's posterior
(minqr/distribution/personal.py), from the annotators.json saved with the model; None in the list
is the population. An id the model does not know is refused.
"""
import json
import warnings

import torch

from minqr.data.chat import prompt_reply_texts
from minqr.data.pairs import check_encodable
from minqr.distribution.personal import Annotators, posterior_weights
from minqr.distribution.statistics import (Statistic, lone_member, mean_and_spread, parse_statistic,
                                           relative_outputs, statistic_values)
from minqr.errors import MinqrError
from minqr.models.reward import load_reward_model
from minqr.study.scoring import DEFAULT_BATCH_SIZE, score_texts, text_length_limit


class TextRewards:
    """A reward model, its tokenizer and the statistic it hands out."""

    def __init__(self, model, tokenizer, statistic: str | Statistic = "mean", max_length: int | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, device="auto", dtype: str = "auto",
                 annotators: Annotators | None = None, folder=None):
        self.annotators = annotators  # the posteriors saved with the model (None: it has none)
        if max_length is not None and max_length < 1:
            raise MinqrError(f"max_length must be at least 1 (tokens kept of each text), got {max_length}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.statistic = statistic if isinstance(statistic, Statistic) else parse_statistic(statistic)
        # `folder`: where the model was loaded from, whose training_args.json says its --max-length
        self.max_length = text_length_limit(model, folder, max_length)
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        self._warned_hh = False

    @classmethod
    def load(cls, folder, **options) -> "TextRewards":
        """From a folder `RewardModel.save_pretrained` wrote (or a hub name); options as __init__."""
        model, tokenizer, path = load_reward_model(folder)
        return cls(model, tokenizer, annotators=Annotators.load(path, model.num_quantiles), folder=path, **options)

    @property
    def objective(self) -> str:
        return self.model.head_config.objective

    def texts(self, prompt, *replies) -> list:
        """What the model reads for each of `replies` to one prompt, in one rendering, as training reads
        a pair (minqr.data.chat.prompt_reply_texts), with a warning the first time messages are read
        in the HH style."""
        template = self.tokenizer.chat_template
        texts, hh = prompt_reply_texts(prompt, replies, template, "a prompt and completion")
        if hh and not self._warned_hh:
            self._warned_hh = True
            why = "the reward model's tokenizer has no chat template" if template is None else \
                "a string is mixed with message lists (a completion, its prompt or its reference)"
            warnings.warn(f"conversations are read in the HH style ('\\n\\nHuman: ...\\n\\nAssistant: ...'), as "
                          f"minqr trains on such pairs: {why}", stacklevel=3)
        return texts

    @torch.inference_mode()
    def outputs(self, texts: list) -> torch.Tensor:
        """[M, N] float32 raw outputs for M texts (each cut from the left to max_length tokens)."""
        token_lists = self.tokenizer.encode_batch(texts, self.max_length)
        empty = [i for i, ids in enumerate(token_lists) if not ids]
        if empty:
            raise MinqrError(f"texts {empty[:5]} are empty, so they have no last token to read a reward at")
        return torch.from_numpy(score_texts(self.model, token_lists, self.batch_size, self.device, self.dtype))

    def weights(self, annotators: list) -> torch.Tensor:
        """[M, N] float64: each text's annotator's posterior over the kinds (uniform for None)."""
        return posterior_weights(self.annotators, self.model.head_config, annotators)

    def statistic_values(self, prompts: list, completions: list, *, group: list | None = None,
                         references: list | None = None, annotators: list | None = None) -> tuple:
        """(values, mean, spread), each [M] float64: the statistic of each completion's reward
        distribution relative to its group (equal keys: the same prompt) or to its reference reply (a
        completion of the same prompt, in the completions' format), and that relative distribution's
        mean and standard deviation (None, None without a reference). `annotators`: one id per
        completion (None: the population), whose personal statistic, mean and spread they are."""
        if len(prompts) != len(completions):
            raise MinqrError(f"{len(prompts)} prompts but {len(completions)} completions: one prompt per completion")
        if group is not None and references is not None:
            raise MinqrError("give a group or references, not both")
        reference_outputs, group_ids = None, None
        if references is not None and len(references) != len(prompts):
            raise MinqrError(f"{len(references)} references for {len(prompts)} completions: one reply per completion")
        # a completion and its reference in one rendering: [completion's text, reference's text] each
        rows = [self.texts(p, *_replies(p, [c] if references is None else [c, references[i]], i))
                for i, (p, c) in enumerate(zip(prompts, completions))]
        texts = [row[0] for row in rows] + ([row[1] for row in rows] if references is not None else [])
        outputs = self.outputs(texts).double()  # [M, N] or [2M, N]: the completions, then their references
        if references is not None:
            outputs, reference_outputs = outputs[:len(prompts)], outputs[len(prompts):]
        if group is not None:
            if len(group) != len(prompts):
                raise MinqrError(f"{len(group)} group keys for {len(prompts)} completions: one key per completion")
            group_ids = key_ids(group)
            alone = lone_member(group_ids)
            if alone is not None:
                raise MinqrError(f"completion {alone} is the only one of its prompt in this call, so its group reference "
                                 "is itself and its reward says nothing of it: give a prompt's completions together, "
                                 "or a reference reply (TRL on several GPUs may split a prompt's completions)")
        if annotators is not None and len(annotators) != len(prompts):
            raise MinqrError(f"{len(annotators)} annotators for {len(prompts)} completions: one id (or None) per "
                             "completion")
        weights = None if annotators is None else self.weights(annotators)
        values = statistic_values(self.statistic, outputs, reference=reference_outputs, group=group_ids,
                                  objective=self.objective, weights=weights)
        if reference_outputs is None and group_ids is None:
            return values, None, None
        relative = relative_outputs(outputs, reference=reference_outputs, group=group_ids, objective=self.objective)
        return values, *mean_and_spread(relative, weights)


def _replies(prompt, replies: list, row: int) -> list:
    """The replies to `prompt` (a completion, and its reference if any), each checked with the prompt
    to be a string or a list of messages (what roles a conversation may hold is the chat template's
    to say: tool turns, a developer message), naming the row, and a string reply to a conversation
    made the assistant's message."""
    for field, value in zip(("prompt", "completion", "reference"), (prompt, *replies)):
        if isinstance(value, str):
            check_encodable(value, f"completion {row}: field {field!r}")
        elif not (isinstance(value, list) and all(isinstance(message, dict) for message in value)):
            raise MinqrError(f"completion {row}: field {field!r} must be a string or a list of messages "
                             f"({{\"role\", \"content\"}} objects), not {type(value).__name__}")
    return [[{"role": "assistant", "content": reply}] if isinstance(prompt, list) and isinstance(reply, str) else reply
            for reply in replies]


def key_ids(keys: list) -> torch.Tensor:
    """[M] one integer per key, equal for equal keys (strings, or message lists compared as JSON)."""
    ids = {}
    return torch.tensor([ids.setdefault(key if isinstance(key, str) else json.dumps(key, sort_keys=True), len(ids))
                         for key in keys], dtype=torch.long)

