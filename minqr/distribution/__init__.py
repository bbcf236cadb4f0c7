"""The math of a learnt reward distribution, free of models and data: statistics of it relative to
a reference reply (statistics.py), which the model's read-out (minqr/models/reward.py), the study,
the RL adapters and best-of-N selection (minqr/adapters/) all read; one person's weighting of a
mixture's kinds (personal.py); and the scale at which labelled pairs are likeliest (scale.py)."""
