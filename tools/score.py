"""Score preference pairs with a reward model: every pair's N outputs into one scores file.

    python tools/score.py --model runs/quantile --data hh-rlhf:harmless-base --out scores.npz
    python tools/score.py --model runs/quantile --data DIR --subset helpful-base --split test --out s.npz
    python tools/score.py --model runs/demo/quantile --data runs/demo/demo-data/test.jsonl --out s.npz

Prints the pair accuracy (ranking by the mean of the outputs) and, for a quantile head, the
accuracy of ranking by each quantile alone. This is `minqr score` as a script: its options are
ScoreConfig's fields and the work is minqr.study.scoring's; tools/analyze.py reads the file.
"""
from minqr_cli.commands.score import score as main

if __name__ == "__main__":
    main()
