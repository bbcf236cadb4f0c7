"""Studying trained reward models. scoring.py runs a model over a data set's pairs into a scores
file; scores_file.py is that file's format and read-out (numpy only); analysis.py gathers every
measure of one scores file: divergences.py (separation of chosen from rejected), bootstrap.py
(bias-corrected estimates and intervals), accuracy.py (ranking, likelihood, calibration) and
coverage.py (quantile diagnostics, coverage against a known truth); report.py writes the report
folder with tables.py's tables and figures.py's figures; personalize.py scores labelled pairs into
each annotator's posterior, saved with the model. The measures need no torch; scoring does.
"""
