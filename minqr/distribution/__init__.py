"""What a learnt reward distribution is used for: statistics of it relative to a reference reply
(statistics.py), which the RL adapters (minqr/adapters/) and best-of-N selection read."""
