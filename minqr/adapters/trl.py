"""A minqr reward model as a TRL reward function: `GRPOTrainer(reward_funcs=RewardFunction(...))`.

    from minqr.adapters.trl import RewardFunction
    reward = RewardFunction("runs/mixture", statistic="cvar:0.25")       # relative to each prompt's group
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=prompts)

TRL calls a reward function with keywords: `prompts` and `completions` (strings, or message lists in
its conversational format), `completion_ids`, every other column of the data set by name, and
`log_metric` / `log_extra`, and wants one float per completion. GRPO samples several completions of
each prompt, so the default reference is the group of completions of the same prompt in the call
(minqr/distribution/statistics.py: kind by kind, relative to the group's mean output), which needs
no extra reply. A reference reply per prompt can come instead from a data set column
(`reference_column`, e.g. the SFT model's answer) or be one fixed text for all prompts
(`reference_reply`, e.g. a refusal), in the completions' format. With `reference=None` and the
statistic "mean", the reward is the expected reward itself.

Each call logs, through TRL's `log_metric`, the mean over its completions of the relative
distribution's spread (its std over the N kinds: how much the population disagrees about a
completion), under "minqr/spread".

Whose reward: the population's by default. `annotator` gives one person's reward for every
completion, `annotator_column` a data set column naming each prompt's person: the statistic with
the mixture's kinds weighted by that person's posterior, saved with the model (minqr personalize;
docs/personal.md). A null in the column is the population.

A minqr model loaded with transformers can also be passed as `reward_funcs`: TRL reads its
`logits[:, 0]`, which a saved folder makes the expected reward, never a single kind (the mean row,
minqr/models/reward.py). That is one number with no reference and no risk measure; this function
gives any statistic.
"""
from minqr.adapters.texts import TextRewards
from minqr.errors import MinqrError

GROUP = "group"


class RewardFunction:
    """A callable for TRL's `reward_funcs`: (prompts, completions, **kwargs) -> list[float].

    model: a reward model folder (or a `TextRewards`); statistic: "mean", "quantile:0.1",
    "cvar:0.25", "mean_minus_std:1.0" or "preference"; reference: "group" (the default), or None
    (only for "mean"); reference_column / reference_reply: a reference reply per prompt instead;
    annotator / annotator_column: whose personal reward (one id, or a column of ids).
    Further keywords (max_length, batch_size, device, dtype) go to TextRewards."""

    def __init__(self, model, statistic: str = "mean", reference: str | None = GROUP,
                 reference_column: str | None = None, reference_reply=None, annotator=None,
                 annotator_column: str | None = None, **options):
        self.rewards = model if isinstance(model, TextRewards) else TextRewards.load(model, statistic=statistic,
                                                                                     **options)
        if isinstance(model, TextRewards) and (options or statistic != "mean"):
            raise MinqrError("pass the statistic and options to TextRewards when you give one, not again here")
        given = [name for name, value in (("reference_column", reference_column),
                                          ("reference_reply", reference_reply)) if value is not None]
        if len(given) > 1:
            raise MinqrError("give reference_column or reference_reply, not both")
        if reference not in (GROUP, None):
            raise MinqrError(f"reference must be 'group' or None (a reply per prompt comes from reference_column "
                             f"or reference_reply), got {reference!r}")
        self.reference = given[0] if given else reference
        if self.reference is None and self.rewards.statistic.needs_reference(self.rewards.model.num_quantiles):
            raise MinqrError(f"statistic {self.rewards.statistic} needs a reference (reference='group', "
                             "reference_column or reference_reply); only the mean means something without one")
        self.reference_column, self.reference_reply = reference_column, reference_reply
        if annotator is not None and annotator_column is not None:
            raise MinqrError("give annotator or annotator_column, not both")
        self.annotator, self.annotator_column = annotator, annotator_column
        if annotator is not None:
            self.rewards.weights([annotator])  # an annotator the model does not know is refused now, not mid-run
        # TRL names a reward function's log columns after __name__
        self.__name__ = f"minqr_{self.rewards.statistic}".replace(":", "_")

    def __call__(self, prompts: list, completions: list, log_metric=None, **columns) -> list[float]:
        kwargs = {}
        if self.reference == GROUP:
            kwargs["group"] = prompts
        elif self.reference == "reference_column":
            if self.reference_column not in columns:
                raise MinqrError(f"reference_column={self.reference_column!r}: the data set has no such column "
                                 f"(TRL passed {', '.join(sorted(columns)) or 'none'})")
            kwargs["references"] = columns[self.reference_column]
        elif self.reference == "reference_reply":
            kwargs["references"] = [self.reference_reply] * len(prompts)
        if self.annotator_column is not None:
            if self.annotator_column not in columns:
                raise MinqrError(f"annotator_column={self.annotator_column!r}: the data set has no such column "
                                 f"(TRL passed {', '.join(sorted(columns)) or 'none'})")
            kwargs["annotators"] = list(columns[self.annotator_column])
        elif self.annotator is not None:
            kwargs["annotators"] = [self.annotator] * len(prompts)
        values, _, spread = self.rewards.statistic_values(prompts, completions, **kwargs)
        if log_metric is not None and spread is not None:
            log_metric("minqr/spread", float(spread.mean()))
        return values.tolist()
