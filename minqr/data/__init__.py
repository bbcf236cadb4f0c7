"""Preference pairs, from files to batches. pairs.py reads JSON lines, hh-rlhf folders and, through
tables.py, Parquet, Arrow and `hf:` data sets into Pair records, with file:line errors; chat.py
renders conversations with a model's chat template; batching.py tokenises them and builds batches
(length groups, the shared-prefix layout, and who computes which pairs when training, evaluating
and scoring).
"""
