"""minqr's command line: the `minqr` command and its subcommands (train, score, analyze, export, ...).

The library (`minqr`) never imports click: each command's options are a dataclass there
(TrainConfig, ScoreConfig, AnalyzeConfig, ...), and this package turns them into click commands
(options.py) and calls the library with them (commands/, a module a subcommand). `tools/*.py` are
the same commands as scripts, for `python tools/train.py ...` and `torchrun tools/train.py ...`.
"""
