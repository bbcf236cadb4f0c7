"""Studying trained reward models. scoring.py runs a model over a data set's pairs into a scores
file; scores_file.py is that file's format and read-out (numpy only); analysis.py measures the
scores (divergences with bootstrap intervals, accuracy, calibration, coverage against the known
truth); report.py writes Table 1, the figures and report.md. Nothing here but scoring.py needs
torch.
"""
