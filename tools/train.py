"""Train a reward model: `python tools/train.py --head quantile` (GPT-2 on HH-RLHF helpful-base).

    python tools/train.py --head quantile --demo              offline, a few minutes on a laptop CPU
    python tools/train.py --head scalar --out runs/scalar     the Bradley-Terry baseline
    python tools/train.py ... --resume                        continue an interrupted run
    torchrun --nproc_per_node 8 tools/train.py ...            several GPUs (or CPU processes)

This is `minqr train` as a script (so that torchrun can start it); its options are the fields of
TrainConfig (minqr/training/config.py), turned into a command line by minqr_cli.
"""
from minqr_cli.commands.train import train as main

if __name__ == "__main__":
    main()
