"""Write a synthetic preference task with known reward distributions (minqr/synthetic/) into a folder.

    python tools/synthetic.py --out runs/tasks/shifted --variant shifted
    python tools/train.py --model runs/tasks/shifted/model --data runs/tasks/shifted/train.jsonl \
        --eval-data runs/tasks/shifted/test.jsonl --out runs/shifted-mixture ...

`tools/train.py --demo` makes the "demo" variant by itself; this is for the other variants, other
sizes and other seeds. The folder holds the data, the truth that score.py and analyze.py find, a
tokenizer and a tiny random GPT-2 to train from.
This is `minqr synthetic` as a script (minqr_cli/commands/).
"""
from minqr_cli.commands.synthetic import synthetic as main

if __name__ == "__main__":
    main()
