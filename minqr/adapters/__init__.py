"""The reward distribution where RL trainers read one number per completion: texts.py (a reward
model that renders prompt + completion and hands out a statistic relative to a reference), trl.py
(a TRL reward function), verl.py (a verl compute_score file), server.py (`minqr serve`, an HTTP
reward server speaking OpenRLHF's remote reward protocol, openrlhf.py, batching concurrent requests,
batcher.py)."""
