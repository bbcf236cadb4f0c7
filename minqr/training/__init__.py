"""Training a reward model. loop.py is the run, `train(config)`, readable top to bottom;
config.py holds TrainConfig (every option, its default and its help); objective.py the objective
of a step; optimizer.py AdamW and the schedule; distributed.py the processes under torchrun;
resume.py the checkpoint that `--resume` continues from bit for bit; interrupt.py Ctrl-C;
metrics.py metrics.jsonl and curves.png.
"""
