"""Training a reward model. loop.py is the run, `train(config)`, readable top to bottom;
config.py holds TrainConfig (every option, its default, its help and its range); loss.py the whole
loss of a step; inputs.py the model and data the options name; evaluation.py the held-out metrics;
optimizer.py AdamW and the schedule; distributed.py the processes under torchrun; sharding.py
FSDP2 (--fsdp) and its sharded checkpoints; resume.py the checkpoint that `--resume` continues from
bit for bit (and whether an out folder holds one); divergence.py the stop on a NaN or infinite loss,
gradient or weight; interrupt.py Ctrl-C and SIGTERM; metrics.py metrics.jsonl and curves.png.
"""
