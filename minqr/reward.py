"""The reward model: GPT-2 plus a linear head with N outputs, read at the last real token.

    rewards = score(hidden at the last real token)        score: n_embd -> N, no bias

- scalar head, N = 1: one reward per text, trained Bradley-Terry style.
- quantile head, N outputs: the quantiles of the text's reward distribution at the levels
  tau_i = (2i+1)/(2N) (N = 10: 0.05, 0.15, ..., 0.95). Output 0 is the pessimistic end, output
  N-1 the optimistic one, and their mean is the expected reward (what ranks responses).

The module names are those of Hugging Face's `GPT2ForSequenceClassification` (`transformer`,
`score`), and `save_pretrained` writes a folder that transformers' `AutoModelForSequenceClassification`
loads as it is, giving logits [B, N] equal to `RewardModel(...)` on the same right-padded token ids
(pad = EOS, the last real token being the last one that is not EOS). The `minqr` section of its
config.json records the head: kind, N, tau levels, and the loss's kappa, lambda and margin.

Pooling reads the last token whose attention mask is 1, so right and left padding both work; to
match transformers, whose pooling looks for the last token that is not the pad id, texts must not
end in EOS (minqr appends none).
"""
import copy
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from minqr.checkpoint import hf_tensors, load_backbone_tensors, load_gpt2, read_config, read_tensors, write_hf_folder
from minqr.errors import MinqrError
from minqr.gpt2 import GPT2, GPT2Config
from minqr.head import quantile_levels

HEAD_KINDS = ("scalar", "quantile")
SCORE = "score.weight"
TRAINING_ARGS_FILE = "training_args.json"  # the options a model was trained with, beside it
STAGING_DIR = ".staging"  # save_pretrained's files before they are renamed into place
# The head starts as N equal rows of one random vector whose entries have this std / sqrt(n_embd):
# on unit-scale features (a freshly initialised ln_f) every reward starts near 0 with std ~0.1.
HEAD_INIT_SCALE = 0.1


@dataclass(frozen=True)
class HeadConfig:
    """What the head is and the loss hyper-parameters it was trained with (saved with the model)."""

    kind: str = "quantile"
    num_quantiles: int = 10
    kappa: float = 1.0  # Huber threshold of the quantile loss
    lam: float = 1.0  # weight of the quantile-Huber term (0 for the scalar head)
    margin: float = 1.0  # the shift m of the partner's quantiles used as targets

    @classmethod
    def make(cls, kind: str = "quantile", num_quantiles: int | None = None, kappa: float = 1.0,
             lam: float | None = None, margin: float = 1.0) -> "HeadConfig":
        """Fill in the kind's defaults (quantile: N = 10, lam = 1; scalar: N = 1, lam = 0) and check."""
        if kind not in HEAD_KINDS:
            raise MinqrError(f"head must be one of {', '.join(HEAD_KINDS)}, not {kind!r}")
        if kind == "scalar":
            if num_quantiles not in (None, 1) or lam not in (None, 0):
                raise MinqrError(f"the scalar head has one output and no quantile term, but got "
                                 f"num_quantiles={num_quantiles}, lam={lam}: drop them or use head='quantile'")
            return cls(kind, 1, kappa, 0.0, margin)
        return cls(kind, 10 if num_quantiles is None else num_quantiles, kappa, 1.0 if lam is None else lam, margin)

    def __post_init__(self):
        problems = []
        if self.kind not in HEAD_KINDS:
            problems.append(f"head={self.kind!r} is not one of {', '.join(HEAD_KINDS)}")
        n = self.num_quantiles
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            problems.append(f"num_quantiles={n!r} must be an integer >= 1")
        elif self.kind == "scalar" and (n != 1 or self.lam != 0):
            problems.append(f"the scalar head has num_quantiles=1 and lam=0, not {n} and {self.lam}")
        if not (isinstance(self.kappa, (int, float)) and math.isfinite(self.kappa) and self.kappa > 0):
            problems.append(f"kappa={self.kappa!r} must be a positive number")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            problems.append(f"lam={self.lam!r} must be a non-negative number")
        if not (isinstance(self.margin, (int, float)) and math.isfinite(self.margin)):
            problems.append(f"margin={self.margin!r} must be a finite number")
        if problems:
            raise MinqrError("invalid reward head: " + "; ".join(problems))

    @property
    def levels(self) -> list:
        """The quantile levels tau_i of the outputs, as floats."""
        return quantile_levels(self.num_quantiles, dtype=torch.float64).tolist()

    def labels(self) -> list:
        """Names of the outputs in config.json's id2label: "reward", or "q0" ... "q{N-1}"."""
        return ["reward"] if self.kind == "scalar" else [f"q{i}" for i in range(self.num_quantiles)]

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"head": d.pop("kind"), **d, "quantile_levels": self.levels}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "HeadConfig":
        keys = ("head", "num_quantiles", "kappa", "lam", "margin")
        missing = [k for k in keys if k not in d]
        if missing:
            raise MinqrError(f"{where}: the minqr section lacks {', '.join(missing)}; re-save the model with minqr")
        try:
            return cls(d["head"], d["num_quantiles"], d["kappa"], d["lam"], d["margin"])
        except MinqrError as e:
            raise MinqrError(f"{where}: {e}") from None


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] padding mask (1 = token) -> [B] the column of each row's last real token (right or
    left padding alike)."""
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (columns * attention_mask.long()).argmax(-1)


def quantile_band(quantiles: torch.Tensor, level: float = 0.9) -> tuple:
    """[B, N] quantiles at tau_i = (2i+1)/(2N) -> (reward, lower, upper), each [B].

    reward is the mean of the quantiles, the expected reward. lower and upper are the quantile
    function at (1 - level)/2 and (1 + level)/2, read off the piecewise-linear curve through the
    points (tau_i, q_i); beyond the outermost levels tau_0 and tau_{N-1} it is flat (the model says
    nothing about the tails, and extrapolating would invent them), so a level of at least
    1 - 1/N gives the band [min q, max q], and N = 1 gives lower = upper = reward. The quantiles
    are sorted first (a model may output crossing quantiles; sorting is the monotone
    rearrangement, which leaves the mean unchanged). The mean can lie outside a narrow band of
    a skewed distribution.
    """
    if not 0 <= level <= 1:
        raise MinqrError(f"level must lie in [0, 1] (e.g. 0.9 for the 5%-95% band), got {level}")
    n = quantiles.shape[-1]
    ordered = quantiles.sort(dim=-1).values

    def quantile_at(tau: float) -> torch.Tensor:
        # tau_i = (2i+1)/(2N), so tau sits at fractional index tau*N - 1/2 of the levels
        position = min(max(tau * n - 0.5, 0.0), n - 1.0)
        below = min(int(position), max(n - 2, 0))
        weight = position - below
        upper_neighbour = ordered[..., min(below + 1, n - 1)]
        return ordered[..., below] * (1 - weight) + upper_neighbour * weight

    return quantiles.mean(-1), quantile_at((1 - level) / 2), quantile_at((1 + level) / 2)


def ranking_credit(chosen_reward, rejected_reward):
    """Element-wise, how right a reward ranks each pair: 1 when the chosen response's reward is the
    higher, 0 when it is the lower, and a tie counts half (a model that cannot tell the two apart
    scores chance, 0.5). Pair accuracy is its mean. Torch tensors and numpy arrays alike."""
    return (chosen_reward > rejected_reward) + 0.5 * (chosen_reward == rejected_reward)


class RewardModel(nn.Module):
    """GPT-2 (`transformer`) + a linear head without bias (`score`, [N, n_embd]).

    Build one with `from_backbone` (pretrained GPT-2 weights, new head), `from_config` (random
    init, for tests and the demo) or `from_pretrained` (a folder `save_pretrained` wrote).
    """

    def __init__(self, transformer: GPT2, head: HeadConfig):
        super().__init__()
        self.transformer = transformer
        self.head_config = head
        weight = transformer.wte.weight
        self.score = nn.Linear(transformer.config.n_embd, head.num_quantiles, bias=False,
                               device=weight.device, dtype=weight.dtype)
        # mean and std of the expected reward on held-out data, for users who normalise rewards;
        # set by training, saved in config.json
        self.reward_stats = None
        self.reset_head()

    @torch.no_grad()
    def reset_head(self) -> None:
        """All N rows the same small random vector: the quantiles start equal (no crossing, no
        spread: the quantile loss then spreads them in the order of their levels) and near 0
        (the first pairwise losses are near log 2, no large gradients into a pretrained backbone),
        yet not zero, so the backbone receives gradient from the first step."""
        n_embd = self.score.in_features
        row = torch.randn(n_embd, dtype=self.score.weight.dtype, device=self.score.weight.device)
        self.score.weight.copy_(row * (HEAD_INIT_SCALE / math.sqrt(n_embd)))  # [N, n_embd] by broadcasting

    @classmethod
    def from_config(cls, config: GPT2Config, head: str = "quantile", num_quantiles: int | None = None,
                    kappa: float = 1.0, lam: float | None = None, margin: float = 1.0) -> "RewardModel":
        """A randomly initialised backbone (GPT-2's init) and a new head."""
        return cls(GPT2(config), HeadConfig.make(head, num_quantiles, kappa, lam, margin))

    @classmethod
    def from_backbone(cls, path, head: str = "quantile", num_quantiles: int | None = None, kappa: float = 1.0,
                      lam: float | None = None, margin: float = 1.0, dtype=None, device=None) -> "RewardModel":
        """Pretrained GPT-2 weights from a Hugging Face folder (minqr.load_gpt2) and a new head.
        Defaults: quantile head N = 10, lam = 1; scalar head N = 1, lam = 0."""
        head_config = HeadConfig.make(head, num_quantiles, kappa, lam, margin)
        return cls(load_gpt2(path, dtype=dtype, device=device), head_config)

    @property
    def num_quantiles(self) -> int:
        return self.head_config.num_quantiles

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, T] (and a [B, T] padding mask, 1 = token) -> rewards [B, N], read at each
        row's last real token (the last position without a mask)."""
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
        return self.score(hidden[rows, last])

    def forward_pairs(self, batch, return_hidden: bool = False) -> tuple:
        """A `minqr.batching.PairBatch` -> (r_chosen [B, N], r_rejected [B, N]), the backbone run once
        over the batch's rows in either layout (separate sequences or shared prefixes).

        With `return_hidden`, also the hidden states [R, T, n_embd], for a language-model loss on
        the chosen response (`self.transformer.lm_logits(hidden)`, targets `batch.chosen_lm_labels`)."""
        hidden = self.transformer(batch.input_ids, batch.attention_mask, batch.position_ids)  # [R, T, n_embd]
        r_chosen = self.score(hidden[batch.chosen_rows, batch.chosen_cols])
        r_rejected = self.score(hidden[batch.rejected_rows, batch.rejected_cols])
        return (r_chosen, r_rejected, hidden) if return_hidden else (r_chosen, r_rejected)

    def reward_band(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    level: float = 0.9) -> tuple:
        """(reward, lower, upper), each [B]: the expected reward and the central `level` band of the
        reward distribution (see `quantile_band`). For a scalar head the band is the reward itself."""
        return quantile_band(self(input_ids, attention_mask), level)

    def to_scalar(self) -> "RewardModel":
        """A one-output copy whose reward is exactly the mean of this model's quantiles: the mean of
        N linear functions of the same features is the linear function with the averaged row. The
        backbone is copied; reward_stats (statistics of the expected reward) carry over."""
        scalar = RewardModel(copy.deepcopy(self.transformer), HeadConfig.make("scalar"))
        with torch.no_grad():
            scalar.score.weight.copy_(self.score.weight.mean(dim=0, keepdim=True))  # [1, n_embd]
        scalar.reward_stats = self.reward_stats
        return scalar.train(self.training)

    # ---- files ----

    def hf_config(self, reward_stats: dict | None = None) -> dict:
        """The config.json of a GPT2ForSequenceClassification with this head."""
        head, eos = self.head_config, self.transformer.config.eos_token_id
        labels = head.labels()
        minqr = head.to_dict()
        stats = reward_stats if reward_stats is not None else self.reward_stats
        if stats is not None:
            minqr["reward_mean"], minqr["reward_std"] = float(stats["mean"]), float(stats["std"])
        return {
            **self.transformer.config.to_dict(),
            "architectures": ["GPT2ForSequenceClassification"],
            "num_labels": len(labels),
            "id2label": {str(i): label for i, label in enumerate(labels)},
            "label2id": {label: i for i, label in enumerate(labels)},
            "problem_type": "regression",  # real-valued outputs, not classes
            "pad_token_id": eos,  # GPT-2 pads with EOS; the reward is read at the last non-pad token
            "minqr": minqr,
        }

    def save_pretrained(self, folder, tokenizer=None, training_args: dict | None = None,
                        reward_stats: dict | None = None) -> Path:
        """Write the model into `folder` in Hugging Face's GPT2ForSequenceClassification layout:
        config.json, model.safetensors, the tokenizer's files (if given) and training_args.json
        (if given). reward_stats ({"mean", "std"}, default: the model's own) go into config.json.

        Other files in `folder` stay (a training run keeps its metrics and checkpoints there): the
        new files are written completely into a staging folder beside them, then renamed into
        place one by one, config.json last, so that a reader never sees a half-written file. The
        staging folder is written with minqr.atomic, so what a save killed half-way leaves there
        is removed by the next save."""
        if reward_stats is not None and not {"mean", "std"} <= set(reward_stats):
            raise MinqrError(f"reward_stats needs 'mean' and 'std', got keys {sorted(reward_stats)}")
        config = self.hf_config(reward_stats)
        tensors = {**hf_tensors(self.transformer), SCORE: self.score.weight.detach().contiguous()}
        extra_files = dict(tokenizer.files()) if tokenizer is not None else {}
        if training_args is not None:
            extra_files[TRAINING_ARGS_FILE] = json.dumps(training_args, indent=2, default=str) + "\n"
        folder = Path(folder)
        # write_hf_folder goes through atomic_dir: a killed save leaves its temporary sibling, or a
        # staging folder not yet emptied, and this write replaces both
        staged = write_hf_folder(folder / STAGING_DIR, config, tensors, extra_files)
        for name in sorted(os.listdir(staged), key=lambda n: n == "config.json"):
            os.replace(staged / name, folder / name)
        staged.rmdir()
        return folder

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None) -> "RewardModel":
        """Load a folder `save_pretrained` wrote, in eval mode. A GPT2ForSequenceClassification with
        one label and no minqr section (another tool's GPT-2 reward model) loads as a scalar head."""
        config = read_config(folder)
        where = Path(folder) / "config.json"
        head = _head_from_hf_config(config, where)
        with torch.device("meta"):  # no memory, no random init: the file's tensors become the weights
            model = cls(GPT2(GPT2Config.from_dict(config)), head)
        extras = load_backbone_tensors(model.transformer, read_tensors(folder), extra_allowed=(SCORE,),
                                       dtype=dtype, device=device)
        expected = [head.num_quantiles, model.transformer.config.n_embd]
        if SCORE not in extras:
            raise MinqrError(f"{folder} has no {SCORE} (the reward head, shape {expected}): it is a plain "
                             "GPT-2 checkpoint, not a reward model; load it with RewardModel.from_backbone")
        score = extras[SCORE]
        if list(score.shape) != expected:
            raise MinqrError(f"{folder}: {SCORE} is {list(score.shape)}, but config.json says {expected} "
                             f"({head.num_quantiles} outputs of width n_embd); the two do not belong together")
        backbone = model.transformer.wte.weight
        model.score.weight = nn.Parameter(score.to(device=backbone.device, dtype=backbone.dtype))
        stats = config.get("minqr", {})
        if "reward_mean" in stats and "reward_std" in stats:
            model.reward_stats = {"mean": stats["reward_mean"], "std": stats["reward_std"]}
        return model.eval()


def _head_from_hf_config(config: dict, where: Path) -> HeadConfig:
    labels = len(config["id2label"]) if "id2label" in config else config.get("num_labels", 2)
    if "minqr" not in config:
        if labels == 1:
            return HeadConfig.make("scalar")
        raise MinqrError(f"{where} has no minqr section and {labels} labels: not a minqr reward model. "
                         "A plain GPT-2 checkpoint becomes one with RewardModel.from_backbone; a "
                         "GPT2ForSequenceClassification with one label loads as a scalar reward model")
    head = HeadConfig.from_dict(config["minqr"], str(where))
    if head.num_quantiles != labels:
        raise MinqrError(f"{where}: the minqr section says num_quantiles={head.num_quantiles} but the "
                         f"config has {labels} labels (id2label); the file was edited inconsistently")
    return head
