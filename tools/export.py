"""Export a quantile reward model for tools that want one number per response.

    python tools/export.py --model runs/quantile --scalar --out runs/quantile-scalar

--scalar writes a one-output GPT2ForSequenceClassification whose reward is exactly the mean of the
N quantiles (the head's rows averaged: the mean of N linear maps of the same features), with the
tokenizer and training_args.json; transformers' AutoModelForSequenceClassification loads it as it
is. It is the only export for now, so it must be asked for by name; a scalar model is refused (it
is already one). The quantile folder itself also gives one number where one is read: its first
logit is the expected reward, followed by the N raw outputs. For the distribution, relative to a
reference reply, use RewardModel.reward_band or minqr.distribution.statistics (docs/distribution.md).
This is `minqr export` as a script (minqr_cli/commands/).
"""
from minqr_cli.commands.export import export as main

if __name__ == "__main__":
    main()
