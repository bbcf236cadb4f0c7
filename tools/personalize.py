"""Personal rewards for a trained mixture model: the posterior over its kinds of every annotator of
a file of their labelled pairs, saved with the model (annotators.json).

    python tools/personalize.py --model runs/m --data more_labels.jsonl
    python tools/personalize.py --model runs/m --data alice.jsonl --annotator alice   # one person's file

score then gives those annotators' rows their personal probability and rewards (docs/personal.md).
This is `minqr personalize` as a script (minqr_cli/commands/).
"""
from minqr_cli.commands.personalize import personalize as main

if __name__ == "__main__":
    main()
