"""Adapters: a minqr reward model where RL trainers look for a reward.

    server.py    `minqr serve`, an HTTP reward server (OpenRLHF's remote reward protocol,
                 openrlhf.py), batching concurrent requests (batcher.py)
"""
