"""The reward model: a backbone (GPT-2 or the Llama family) plus a linear head with N outputs,
read at the last real token.

    outputs = score(hidden at the last real token)        score: hidden_size -> N, no bias

- scalar head, N = 1: one reward per text, trained Bradley-Terry style.
- quantile head, N outputs: the distribution of the text's reward over the people who judge it,
  read out as its quantiles at tau_i = (2i+1)/(2N) (N = 10: 0.05, 0.15, ..., 0.95): q_0 is the
  pessimistic end, q_{N-1} the optimistic one, and their mean is the expected reward (what ranks
  responses). What the raw outputs are, how they are trained and how they become quantiles is the
  head's objective (minqr/objectives/): the model owns its read-out (`quantiles`, `reward_band`),
  which is relative to a reference reply to the same prompt (minqr/distribution/statistics.py says
  why); what it is trained by is the training's (minqr/training/loss.py).

The module names are those of Hugging Face's `GPT2ForSequenceClassification` (`transformer`,
`score`); a Llama-family backbone is saved under `model.`, as `LlamaForSequenceClassification`
(`Qwen2...`, `Mistral...`) has it. `save_pretrained` writes a folder that transformers'
`AutoModelForSequenceClassification` loads as it is, giving logits whose columns are the raw outputs of
`RewardModel(...)` ([B, 1] for a scalar head; [B, N + 1], the mean first, for N > 1, below) on the same
right-padded token ids (pad = the config's pad token, else EOS; the
last real token being the last one that is not the pad). The `minqr` section of its config.json
records the head: kind, N, objective and its hyper-parameters, read-out and tau levels.

The saved head of N > 1 outputs has one more row, first: the mean of the N rows, labelled
"reward" (`mean_row` in the minqr section). transformers' logits are then [B, N + 1], the expected
reward followed by the N raw outputs, so that every tool that reads one number from a sequence
classifier, `logits[:, 0]` (TRL's GRPOTrainer given a model, and most others), gets the expected
reward and never a single kind of annotator (kind 0's raw output, with its own free constant).
Loaders that build a one-output head (TRL given a path, OpenRLHF) find N + 1 rows where they expect
one, and refuse. from_pretrained drops the row again (after checking that it is the mean).

Pooling reads the last token whose attention mask is 1, so right and left padding both work; to
match transformers, whose pooling looks for the last token that is not the pad id, texts must not
end in the pad token (minqr appends no EOS).
"""
import copy
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from minqr import hub
from minqr.atomic import MARKER, UNCHANGED, writing
from minqr.distribution.statistics import quantile_band, relative_outputs
from minqr.errors import MinqrError
from minqr.models.backbone import FAMILIES, family, load_backbone
from minqr.models.gpt2 import GPT2, GPT2Config
from minqr.models.head import HeadConfig
from minqr.models.hf_folder import (backbone_config, check_blocks, hf_tensors, load_backbone_tensors, read_config,
                                    read_json, read_tensors, write_hf_folder)
from minqr.models.tokenizer import load_tokenizer

SCORE = "score.weight"
MEAN_ROW = "mean_row"  # the minqr section's flag: score.weight's first row is the mean of the others
TRAINING_ARGS_FILE = "training_args.json"  # the options a model was trained with, beside it
STAGING_DIR = ".staging"  # save_pretrained's files before they are renamed into place


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] padding mask (1 = token) -> [B] the column of each row's last real token (right or
    left padding alike)."""
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (columns * attention_mask.long()).argmax(-1)


class RewardModel(nn.Module):
    """A backbone (`transformer`: GPT2 or Llama) + a linear head without bias (`score`, [N, hidden_size]).

    Build one with `from_backbone` (pretrained weights, new head), `from_config` (random GPT-2
    init, for tests and the demo) or `from_pretrained` (a folder `save_pretrained` wrote).
    """

    def __init__(self, transformer: nn.Module, head: HeadConfig):
        super().__init__()
        self.transformer = transformer
        self.head_config = head
        weight = next(transformer.parameters())  # the backbone's device and dtype
        self.score = nn.Linear(transformer.config.hidden_size, head.num_quantiles, bias=False,
                               device=weight.device, dtype=weight.dtype)
        # mean and std of the expected reward on held-out data, for users who normalise rewards;
        # set by training, saved in config.json
        self.reward_stats = None
        head.init_weight(self.score.weight)

    @classmethod
    def from_config(cls, config: GPT2Config, head: str = "quantile", num_quantiles: int | None = None,
                    objective: str | None = None, **hyperparameters) -> "RewardModel":
        """A randomly initialised backbone (GPT-2's init) and a new head (HeadConfig.make)."""
        return cls(GPT2(config), HeadConfig.make(head, num_quantiles, objective, **hyperparameters))

    @classmethod
    def from_backbone(cls, path, head: str = "quantile", num_quantiles: int | None = None, objective: str | None = None,
                      dtype=None, device=None, **hyperparameters) -> "RewardModel":
        """Pretrained weights from a Hugging Face folder (minqr.load_backbone) and a new head.
        Defaults (HeadConfig.make): quantile head with minqr.objectives.loss.DEFAULT_OBJECTIVE and its
        default N (20 for mixture and independent, 10 for paper); scalar head N = 1, bradley_terry."""
        head_config = HeadConfig.make(head, num_quantiles, objective, **hyperparameters)
        return cls(load_backbone(path, dtype=dtype, device=device), head_config)

    @property
    def num_quantiles(self) -> int:
        return self.head_config.num_quantiles

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, T] (and a [B, T] padding mask, 1 = token) -> raw outputs [B, N], read at each
        row's last real token (the last position without a mask)."""
        return self.score(self.pooled(input_ids, attention_mask))

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The state the head reads: the backbone's last hidden state at each row's last real token,
        [B, n_embd]."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise MinqrError(f"input_ids must be [B, T] with T >= 1 (a reward is read at a last token), "
                             f"got shape {list(input_ids.shape)}")
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise MinqrError(f"attention_mask must be a [B, T] padding mask like input_ids "
                                 f"{list(input_ids.shape)}, got {list(attention_mask.shape)} (use "
                                 "forward_pairs for shared-prefix batches)")
            if not attention_mask.any(-1).all():
                empty = (~attention_mask.any(-1)).nonzero().flatten().tolist()
                raise MinqrError(f"rows {empty} of attention_mask have no real token, so no reward: "
                                 "drop empty texts before scoring")
        hidden = self.transformer(input_ids, attention_mask)  # [B, T, n_embd]
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        last = torch.full_like(rows, input_ids.shape[1] - 1) if attention_mask is None else last_token_index(attention_mask)
        return hidden[rows, last]

    def forward_pairs(self, batch, return_hidden: bool = False) -> tuple:
        """A `minqr.data.batching.PairBatch` -> (r_chosen [B, N], r_rejected [B, N]), the raw outputs, the
        backbone run once over the batch's rows in either layout (separate sequences or shared
        prefixes).

        With `return_hidden`, also the hidden states [R, T, n_embd], for a language-model loss on
        the chosen response (`self.transformer.lm_logits(hidden)`, targets `batch.chosen_lm_labels`)."""
        hidden, _, _, r_chosen, r_rejected = self.pair_states(batch)
        return (r_chosen, r_rejected, hidden) if return_hidden else (r_chosen, r_rejected)

    def pair_states(self, batch) -> tuple:
        """A PairBatch -> (hidden [R, T, n_embd], pooled chosen [B, n_embd], pooled rejected [B, n_embd],
        r_chosen [B, N], r_rejected [B, N]): the raw outputs with the states they were read from, all
        in one call (sharded, the call that gathers the head: minqr/training/sharding.py)."""
        hidden = self.transformer(batch.input_ids, batch.attention_mask, batch.position_ids)  # [R, T, n_embd]
        pooled_chosen = hidden[batch.chosen_rows, batch.chosen_cols]  # [B, n_embd]
        pooled_rejected = hidden[batch.rejected_rows, batch.rejected_cols]
        return hidden, pooled_chosen, pooled_rejected, self.score(pooled_chosen), self.score(pooled_rejected)

    def forward_texts(self, batch, pooled: bool = False) -> torch.Tensor:
        """A `minqr.data.batching.TextBatch` -> the raw outputs [M, N] of its M texts, in the batch's
        text order (texts sharing a prefix row run it once); with `pooled`, the states the head
        reads instead, [M, n_embd]."""
        hidden = self.transformer(batch.input_ids, batch.attention_mask, batch.position_ids)  # [R, T, n_embd]
        states = hidden[batch.rows, batch.cols]  # [M, n_embd], each text's last token
        return states if pooled else self.score(states)

    # ---- reading out ----

    def quantiles(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  reference: torch.Tensor | None = None, group: torch.Tensor | None = None,
                  raw: bool = False) -> torch.Tensor:
        """[B, N] the quantiles at tau_i of each text's reward relative to a reference reply to the
        same prompt: `reference`, that reply's raw outputs [B, N] (`model(reference_ids, mask)`), or
        `group` [B], rows with the same id being candidates for the same prompt (the reference is
        their mean output). See minqr.distribution.statistics for what relative means per objective.

        A scalar head needs no reference (its one output is the reward). N > 1 outputs do: a
        mixture's kinds each have a free constant, which a sort of raw outputs would mix with the
        disagreement. raw=True reads the raw outputs out anyway (sorted for mixture and independent,
        as they are for paper), constants included."""
        outputs = self(input_ids, attention_mask)
        if self._raw_readout(raw, reference, group, "quantiles"):
            return self.head_config.quantiles(outputs)
        return relative_outputs(outputs, reference=reference, group=group,
                                objective=self.head_config.objective).sort(dim=-1).values

    def reward_band(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    level: float = 0.9, *, reference: torch.Tensor | None = None, group: torch.Tensor | None = None,
                    raw: bool = False) -> tuple:
        """(reward, lower, upper), each [B]: the expected reward and the central `level` band of the
        reward distribution (see `quantile_band`), relative to a reference reply as in `quantiles`
        (the reward is then the expected reward minus the reference's). A scalar head needs no
        reference, and its band is the reward itself."""
        return quantile_band(self.quantiles(input_ids, attention_mask, reference=reference, group=group, raw=raw),
                             level)

    def _raw_readout(self, raw: bool, reference, group, what: str) -> bool:
        """Whether to read the raw outputs out: asked for (raw), or a scalar head with no reference."""
        if raw and (reference is not None or group is not None):
            raise MinqrError(f"{what}: raw=True reads the raw outputs, so it takes no reference or group")
        if raw or (self.num_quantiles == 1 and reference is None and group is None):
            return True
        if reference is None and group is None:
            raise MinqrError(f"{what} of {self.num_quantiles} outputs needs a reference: reference=model(ids of a "
                             "reply to the same prompt) or group=one prompt id per row. A mixture's kinds each have "
                             "their own free constant, which sorted raw outputs mix with the disagreement; raw=True "
                             "reads them out anyway")
        return False

    def to_scalar(self) -> "RewardModel":
        """A one-output copy whose reward is exactly the mean of this model's quantiles: the mean of
        N linear functions of the same features is the linear function with the averaged row. The
        backbone is copied; reward_stats (statistics of the expected reward) carry over."""
        scalar = RewardModel(copy.deepcopy(self.transformer), HeadConfig.make("scalar"))
        with torch.no_grad():
            scalar.score.weight.copy_(self.score.weight.mean(dim=0, keepdim=True))  # [1, n_embd]
        scalar.reward_stats = self.reward_stats
        return scalar.train(self.training)

    def normalized(self) -> "RewardModel":
        """A copy of this scalar model whose reward is exactly (r - mean) / std, with the reward
        statistics that training measured (reward_stats). transformers' GPT2ForSequenceClassification
        has no bias on its head, so the shift goes into the final layer norm's bias, along the
        head's row w: the pooled state h becomes h - (mean / std) w / |w|², and w·h moves by
        -mean / std. ln_f feeds nothing but the head in a sequence classifier."""
        if self.head_config.head != "scalar":
            raise MinqrError("only a one-output (scalar) model folds its normalisation into its weights; export a "
                             "quantile model with --scalar")
        mean, std = reward_normalization(self)
        if getattr(getattr(self.transformer, "ln_f", None), "bias", None) is None:
            raise MinqrError(f"normalize: the shift goes into the final layer norm's bias, and a "
                             f"{type(self.transformer).__name__} backbone's final norm has none (nor has its head): "
                             "score with --normalize instead, or normalise the rewards with config.json's "
                             "minqr.reward_mean and reward_std where you use them")
        model = copy.deepcopy(self)
        with torch.no_grad():
            row = model.score.weight[0].double() / std  # [n_embd]
            model.score.weight.copy_(row[None])
            model.transformer.ln_f.bias.sub_((mean / std) * row / row.dot(row))
        model.reward_stats = {"mean": 0.0, "std": 1.0}
        return model

    # ---- files ----

    def hf_config(self, reward_stats: dict | None = None, pad_id: int | None = None) -> dict:
        """The config.json of a GPT2ForSequenceClassification (LlamaForSequenceClassification, ...)
        with this head."""
        head, backbone = self.head_config, self.transformer.config.to_dict()
        # transformers' pooling finds the last token that is not the pad id. GPT-2 has no pad
        # token and pads with EOS; Llama 3 lists several EOS ids, its end of text first.
        pad = pad_id if pad_id is not None else backbone.get("pad_token_id")
        eos = backbone.get("eos_token_id")
        pad = pad if pad is not None else eos[0] if isinstance(eos, list) else eos
        if pad is None:
            raise MinqrError("the backbone's config has neither pad_token_id nor eos_token_id, and transformers "
                             "reads a reward at the last token that is not the pad: set pad_token_id in its config")
        labels = head.labels()
        minqr = head.to_dict()
        if head.num_quantiles > 1:  # the expected reward first, for readers of logits[:, 0]
            labels, minqr[MEAN_ROW] = ["reward", *labels], True
        stats = reward_stats if reward_stats is not None else self.reward_stats
        if stats is not None:
            minqr["reward_mean"], minqr["reward_std"] = float(stats["mean"]), float(stats["std"])
        return {
            **backbone,
            "architectures": [FAMILIES[backbone["model_type"]][2] + "ForSequenceClassification"],
            "num_labels": len(labels),
            "id2label": {str(i): label for i, label in enumerate(labels)},
            "label2id": {label: i for i, label in enumerate(labels)},
            "problem_type": "regression",  # real-valued outputs, not classes
            "pad_token_id": pad,  # the reward is read at the last token that is not the pad
            "minqr": minqr,
        }

    def save_pretrained(self, folder, tokenizer=None, training_args: dict | None = None,
                        reward_stats: dict | None = None) -> Path:
        """Write the model into `folder` in Hugging Face's GPT2ForSequenceClassification layout (or
        LlamaForSequenceClassification, ..., by the backbone):
        config.json, model.safetensors, the tokenizer's files (if given) and training_args.json
        (if given). reward_stats ({"mean", "std"}, default: the model's own) go into config.json.

        Other files in `folder` stay (a training run keeps its metrics and checkpoints there): the
        new files are written completely into a staging folder beside them, then renamed into
        place one by one, the old config.json removed first and the new one renamed last, so that a
        reader never sees a half-written file, nor a folder of two saves that loads. The
        staging folder is written with minqr.atomic, so what a save killed half-way leaves there
        is removed by the next save."""
        if reward_stats is not None and not {"mean", "std"} <= set(reward_stats):
            raise MinqrError(f"reward_stats needs 'mean' and 'std', got keys {sorted(reward_stats)}")
        # the pad that transformers' pooling skips must be the one its tokenizer pads with
        config = self.hf_config(reward_stats, pad_id=tokenizer.pad_id if tokenizer is not None else None)
        rows = self.score.weight.detach()  # [N, n_embd]
        if self.num_quantiles > 1:
            mean = rows.float().mean(0, keepdim=True).to(rows.dtype)  # [1, n_embd]
            rows = torch.cat([mean, rows])  # [N + 1, n_embd]: the mean row first
        tensors = {**hf_tensors(self.transformer), SCORE: rows.contiguous()}
        extra_files = dict(tokenizer.files()) if tokenizer is not None else {}
        if training_args is not None:
            extra_files[TRAINING_ARGS_FILE] = json.dumps(training_args, indent=2, default=str) + "\n"
        folder = Path(folder)
        # write_hf_folder goes through atomic_dir: a killed save leaves its temporary sibling, or a
        # staging folder not yet emptied, and this write replaces both. A failed write names `folder`.
        with writing(folder, UNCHANGED):
            staged = write_hf_folder(folder / STAGING_DIR, config, tensors, extra_files)
        # the staging folder's marker stays until last, so that a staging folder a kill left half
        # emptied is still one that minqr made, and the next save replaces it; the old config.json
        # goes first, so that a kill between the renames leaves a folder that no loader takes (the new
        # weights under the old config's reward statistics loaded as a whole model before)
        (folder / "config.json").unlink(missing_ok=True)
        for name in sorted(set(os.listdir(staged)) - {MARKER}, key=lambda n: n == "config.json"):
            os.replace(staged / name, folder / name)
        (staged / MARKER).unlink()
        staged.rmdir()
        return folder

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None) -> "RewardModel":
        """Load a folder `save_pretrained` wrote, in eval mode. A GPT2ForSequenceClassification with
        one label and no minqr section (another tool's GPT-2 reward model) loads as a scalar head."""
        config = read_config(folder)
        where = Path(folder) / "config.json"
        head = _head_from_hf_config(config, where)
        model_class, config_class, _ = family(config, folder)
        backbone, tensors = backbone_config(config_class, config, folder), read_tensors(folder)
        check_blocks(model_class, backbone, tensors, folder)
        with torch.device("meta"):  # no memory, no random init: the file's tensors become the weights
            model = cls(model_class(backbone), head)
        extras = load_backbone_tensors(model.transformer, tensors, extra_allowed=(SCORE,), dtype=dtype, device=device)
        mean_row = bool(config.get("minqr", {}).get(MEAN_ROW))
        expected = [head.num_quantiles + mean_row, model.transformer.config.hidden_size]
        if SCORE not in extras:
            raise MinqrError(f"{folder} has no {SCORE} (the reward head, shape {expected}): it is a plain "
                             "backbone checkpoint, not a reward model; load it with RewardModel.from_backbone")
        score = extras[SCORE]
        if list(score.shape) != expected:
            what = f"the mean row and {head.num_quantiles}" if mean_row else str(head.num_quantiles)
            raise MinqrError(f"{folder}: {SCORE} is {list(score.shape)}, but config.json says {expected} "
                             f"({what} outputs of the backbone's width); the two do not belong together")
        if not torch.isfinite(score).all():
            raise MinqrError(f"{folder}: {SCORE} holds values that are not finite (NaN or infinity): the file is "
                             "damaged or was saved from a run that diverged; use an earlier checkpoint")
        if mean_row:
            score = _without_mean_row(score, folder)
        backbone = next(model.transformer.parameters())
        model.score.weight = nn.Parameter(score.to(device=backbone.device, dtype=backbone.dtype))
        stats = config.get("minqr", {})
        if "reward_mean" in stats and "reward_std" in stats:
            model.reward_stats = {"mean": stats["reward_mean"], "std": stats["reward_std"]}
        return model.eval()


def _without_mean_row(score: torch.Tensor, folder) -> torch.Tensor:
    """score.weight [N + 1, n_embd] as saved -> the head's N rows, once the first is checked to be
    their mean (a file edited row by row would otherwise give transformers' readers another reward)."""
    rows = score[1:]
    # within a bfloat16 rounding (2^-8) of the rows' scale: a file saved in half precision passes
    tolerance = 1e-2 * float(rows.double().abs().max())
    if not torch.allclose(score[0].double(), rows.double().mean(0), rtol=0, atol=tolerance):
        raise MinqrError(f"{folder}: the first row of {SCORE} is not the mean of the others, as the minqr section's "
                         f"{MEAN_ROW} says it is: the file was edited; save the model again with minqr")
    return rows


def _head_from_hf_config(config: dict, where: Path) -> HeadConfig:
    id2label, labels = config.get("id2label"), config.get("num_labels", 2)
    if id2label is not None:
        if not isinstance(id2label, dict):
            raise MinqrError(f"{where}: id2label must map output indices to labels, got {id2label!r}")
        labels = len(id2label)
    if not isinstance(labels, int) or isinstance(labels, bool):
        raise MinqrError(f"{where}: num_labels must be a count, got {labels!r}")
    section = config.get("minqr")
    if section is not None and not isinstance(section, dict):
        raise MinqrError(f"{where}: the minqr section must be an object of the head's settings, got "
                         f"{type(section).__name__}; re-save the model with minqr")
    stats = (section or {}).get("reward_mean"), (section or {}).get("reward_std")
    if any(v is not None for v in stats) and not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in stats):
        raise MinqrError(f"{where}: the minqr section's reward_mean and reward_std must be finite numbers (what "
                         f"training measured), got {stats[0]!r} and {stats[1]!r}; re-save the model with minqr")
    if "minqr" not in config:
        if labels == 1:
            return HeadConfig.make("scalar")
        raise MinqrError(f"{where} has no minqr section and {labels} labels: not a minqr reward model. "
                         "A plain GPT-2 checkpoint becomes one with RewardModel.from_backbone; a "
                         "GPT2ForSequenceClassification with one label loads as a scalar reward model")
    head = HeadConfig.from_dict(config["minqr"], str(where))
    mean_row = config["minqr"].get(MEAN_ROW, False)
    if mean_row is not (head.num_quantiles > 1):
        raise MinqrError(f"{where}: the minqr section's {MEAN_ROW} is {mean_row!r}, but a head of "
                         f"{head.num_quantiles} output{'s' if head.num_quantiles > 1 else ''} is saved "
                         f"{'with' if head.num_quantiles > 1 else 'without'} the mean row first; re-save the model "
                         "with minqr")
    if head.num_quantiles + mean_row != labels:
        with_row = " and the mean row" if mean_row else ""
        raise MinqrError(f"{where}: the minqr section says num_quantiles={head.num_quantiles}{with_row} but the "
                         f"config has {labels} labels (id2label); the file was edited inconsistently")
    return head


def model_folder_kind(folder) -> str:
    """What a folder that a command would save a model into (save_pretrained: config.json, the
    weights, the tokenizer's files, training_args.json) holds: "new" (none of those files, so
    nothing there is written over), "run" (a training run: its training_args.json), "export" (minqr
    export's: training_args.json with "exported_from"), "other": model files that minqr did not
    write (a downloaded checkpoint, say), which no command may replace, or "file": not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return "file" if folder.exists() else "new"
    if not model_files_in(folder):
        return "new"
    if not (folder / TRAINING_ARGS_FILE).is_file():
        return "other"
    return "export" if "exported_from" in training_args(folder) else "run"


def model_files_in(folder: Path) -> list[str]:
    """The files in `folder` that saving a model there would write over (weights of any name included)."""
    saved = {"config.json", TRAINING_ARGS_FILE, "tokenizer.json", "tokenizer_config.json"}
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.name in saved or p.suffix in (".safetensors", ".bin"))


def training_args(folder: Path) -> dict:
    """The training_args.json that tools/train.py saves beside a model ({} when there is none)."""
    path = Path(folder) / TRAINING_ARGS_FILE
    return read_json(path, fix="fix or delete it") if path.is_file() else {}


def reward_normalization(model: RewardModel, folder=None) -> tuple[float, float]:
    """(mean, std) of the expected reward that training measured on its held-out pairs, for
    normalising rewards; an error when the model has none or they cannot normalise."""
    stats = model.reward_stats
    where = f"{folder} has" if folder is not None else "this model has"
    if stats is None:
        raise MinqrError(f"normalize: {where} no reward statistics (config.json's minqr.reward_mean and reward_std): "
                         "training measures them on its held-out pairs, so train with --eval-data")
    mean, std = float(stats["mean"]), float(stats["std"])
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise MinqrError(f"normalize: {where} reward mean {mean} and std {std}; normalising needs a finite mean and a "
                         "positive std")
    return mean, std


def load_reward_model(model) -> tuple[RewardModel, object, Path]:
    """(model, tokenizer, folder) from a folder that RewardModel.save_pretrained wrote (or a hub name)."""
    folder = hub.fetch_model(model)
    reward_model = RewardModel.from_pretrained(folder)
    try:
        tokenizer = load_tokenizer(folder)
    except MinqrError as error:
        raise MinqrError(f"{error}. A reward model folder carries its tokenizer (tools/train.py saves it "
                         "there); copy the tokenizer's files into it") from None
    check_vocabulary(tokenizer, reward_model.transformer, f"the tokenizer in {folder}", f"the model in {folder}")
    return reward_model, tokenizer, folder


def check_vocabulary(tokenizer, backbone, tokenizer_where: str, model_where: str) -> None:
    """A MinqrError when the tokenizer can give ids that the backbone has no embedding for (an index
    error deep in the forward on a CPU, a device-side assert on a GPU)."""
    vocab_size = backbone.config.vocab_size
    if tokenizer.vocab_size > vocab_size:
        raise MinqrError(f"{tokenizer_where} has {tokenizer.vocab_size} ids but {model_where} embeds only "
                         f"{vocab_size}: they do not belong together")
