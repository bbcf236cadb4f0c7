"""A minqr reward model as verl's custom reward function: point verl at this file.

verl loads a reward function from a file path and calls it with keywords, adding the config's
`reward_kwargs` (here: which model, which statistic, where the prompt is):

    reward:
      custom_reward_function:
        path: /path/to/minqr/adapters/verl.py     # python -c "import minqr.adapters.verl as v; print(v.__file__)"
        name: compute_score                        # or compute_score_batch, with reward_manager: batch
        reward_kwargs: {model: runs/mixture, statistic: "cvar:0.25", reference_key: sft_answer}

- `compute_score(data_source, solution_str, ground_truth, extra_info, **reward_kwargs)`, as verl's
  per-sample ("naive") reward manager calls it, returns {"score": the statistic, "mean": the
  expected reward, "spread": the std over the kinds} for one response; verl trains on "score" and
  logs the others. A single response has no group, so a statistic other than the mean needs a
  reference reply per prompt: `reference_key` (an extra_info field, e.g. the SFT model's answer) or
  `reference_reply` (one text for all prompts, e.g. a refusal).
- `compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos, **reward_kwargs)`,
  as verl's "batch" reward manager calls it, returns that dict for each response; without a
  reference reply, the reference is the group of responses to the same prompt in the batch, which
  needs two or more a prompt (with one, `rollout.n = 1`, give a reference reply, or use
  compute_score, whose mean needs none).

verl passes `solution_str`, the response alone; the prompt comes from `extra_info[prompt_key]`
(default "prompt"), a string, or a list of messages (TRL's and verl's chat format) rendered with the
reward model's chat template together with the response as the assistant's message. Put it there
when preparing the data set. `ground_truth` and `data_source` are not used. "spread" is logged only
where there is a reference (without one the kinds' free constants would be in it).

`annotator_key` names an extra_info field holding each prompt's annotator (null: the population):
"score" is then that person's statistic, the mixture's kinds weighted by their posterior saved with
the model (minqr personalize; docs/personal.md).

The reward model is loaded once per process and option set, on the first call.
"""
from minqr.adapters.texts import TextRewards, key_ids
from minqr.distribution.statistics import lone_member
from minqr.errors import MinqrError

# what verl's reward managers may add to the keywords, which this function does not use
VERL_KEYWORDS = ("reward_router_address", "reward_model_tokenizer")
_LOADED = {}  # (model, statistic, max_length, batch_size, device, dtype) -> TextRewards
WHAT = {"prompt_key": "prompt", "reference_key": "reference reply", "annotator_key": "annotator's id (or null)"}


def compute_score(data_source=None, solution_str: str = "", ground_truth=None, extra_info: dict | None = None,
                  **reward_kwargs) -> dict:
    """One response's reward dict {"score", "mean"[, "spread"]} (see the module docstring)."""
    return _reward_dicts([solution_str], [extra_info], per_sample=True, **reward_kwargs)[0]


def compute_score_batch(data_sources=None, solution_strs=(), ground_truths=None, extra_infos=None,
                        **reward_kwargs) -> list[dict]:
    """Every response's reward dict, in order (see the module docstring)."""
    solutions = list(solution_strs)
    infos = list(extra_infos) if extra_infos is not None else [None] * len(solutions)
    if len(infos) != len(solutions):
        raise MinqrError(f"{len(solutions)} solution_strs but {len(infos)} extra_infos: verl passes one extra_info "
                         "per response")
    return _reward_dicts(solutions, infos, per_sample=False, **reward_kwargs)


def _reward_dicts(solutions: list, infos: list, per_sample: bool, model: str | None = None, statistic: str = "mean",
                  prompt_key: str = "prompt", reference_key: str | None = None, reference_reply=None,
                  annotator_key: str | None = None, max_length: int | None = None, batch_size: int = 16,
                  device: str = "auto", dtype: str = "auto", **others) -> list[dict]:
    unknown = sorted(set(others) - set(VERL_KEYWORDS))
    if unknown:
        raise MinqrError(f"reward_kwargs: unknown option {', '.join(unknown)}; minqr's verl reward takes model, "
                         "statistic, prompt_key, reference_key, reference_reply, annotator_key, max_length, "
                         "batch_size, device, dtype")
    if model is None:
        raise MinqrError("reward_kwargs: model is missing: the reward model folder (reward_kwargs: {model: DIR})")
    if reference_key is not None and reference_reply is not None:
        raise MinqrError("reward_kwargs: give reference_key or reference_reply, not both")
    key = (str(model), str(statistic), max_length, batch_size, device, dtype)
    if key not in _LOADED:
        _LOADED[key] = TextRewards.load(model, statistic=statistic, max_length=max_length, batch_size=batch_size,
                                        device=device, dtype=dtype)
    rewards = _LOADED[key]
    prompts = [_field(info, prompt_key, "prompt_key", i) for i, info in enumerate(infos)]
    if reference_key is not None:
        kwargs = {"references": [_field(info, reference_key, "reference_key", i) for i, info in enumerate(infos)]}
    elif reference_reply is not None:
        kwargs = {"references": [reference_reply] * len(prompts)}
    elif per_sample and rewards.statistic.needs_reference(rewards.model.num_quantiles):
        raise MinqrError(f"statistic {rewards.statistic} needs a reference, and compute_score sees one response "
                         "at a time: set reward_kwargs reference_key (an extra_info field with a reference reply "
                         "per prompt) or reference_reply, or use compute_score_batch with reward_manager batch "
                         "(the reference is then the group of responses to the same prompt)")
    elif per_sample:
        kwargs = {}
    else:
        alone = lone_member(key_ids(prompts))
        if alone is not None:
            raise MinqrError(f"response {alone} is the only response to its prompt in this batch, so there is no "
                             "group to read it against: with one response a prompt (rollout.n = 1) set "
                             "reward_kwargs reference_key or reference_reply, or use compute_score (whose mean "
                             "needs no reference)")
        kwargs = {"group": prompts}
    if annotator_key is not None:
        kwargs["annotators"] = [_field(info, annotator_key, "annotator_key", i) for i, info in enumerate(infos)]
    values, means, spreads = rewards.statistic_values(prompts, solutions, **kwargs)
    # without a reference the statistic is the mean itself (or, at N = 1, the one reward)
    results = [{"score": float(v), "mean": float(m)} for v, m in zip(values, values if means is None else means)]
    if spreads is not None:
        for result, spread in zip(results, spreads):
            result["spread"] = float(spread)
    return results


def _field(info, key: str, option: str, index: int):
    if not isinstance(info, dict) or key not in info:
        has = ", ".join(sorted(info)) if isinstance(info, dict) else "no extra_info"
        raise MinqrError(f"response {index}: extra_info has no {key!r} (reward_kwargs {option}); it has {has}. "
                         f"Put the {WHAT[option]} there when you "
                         "prepare the data set")
    return info[key]
