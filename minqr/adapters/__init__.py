"""The reward distribution at work, where a trainer or a user reads one number per completion:
texts.py (a reward model that renders prompt + completion and hands out a statistic relative to a
reference), trl.py (a TRL reward function), verl.py (a verl compute_score file), server.py (`minqr
serve`, an HTTP reward server speaking OpenRLHF's remote reward protocol, openrlhf.py, batching
concurrent requests, batcher.py), best_of_n.py (`minqr best-of-n`: each prompt's pick of its
candidates by each statistic)."""
