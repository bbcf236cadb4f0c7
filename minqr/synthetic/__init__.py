"""The synthetic preference task, whose true reward distributions are known: the offline demo's
data, and the ground truth that a distributional reward model is checked against.

task.py is the generating process (annotator groups, tags, labels); truth.py each test response's
exact reward distribution and what reads it back; folder.py writes a task's folder (data, truth,
tokenizer, tiny model: `minqr synthetic`); anchors.py is the reply whose reward is 0 for everyone,
which pins a model's free constants; probe.py checks that a backbone encodes the tags; demo.py is
`minqr train --demo`. Scoring, the analysis and training ask these modules instead of knowing
the task.
"""
