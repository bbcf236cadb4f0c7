"""Choose among each prompt's candidate replies by statistics of their reward distributions
(minqr/adapters/best_of_n.py).

    python tools/best_of_n.py --model runs/demo/quantile --data candidates.jsonl --out choices.jsonl

This is `minqr best-of-n` as a script (minqr_cli/commands/).
"""
from minqr_cli.commands.best_of_n import best_of_n as main

if __name__ == "__main__":
    main()
