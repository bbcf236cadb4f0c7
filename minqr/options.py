"""Options: a config dataclass's field that carries its default, its help text and its limits.

Every command of minqr (`minqr train`, `minqr score`, ...) is a dataclass of such fields, and the
command line is derived from it (minqr_cli/options.py), so an option's name, default, help and
range are written once, here in the library, beside the code that uses them:

    max_length: int = option(512, "tokens kept of each text", low=1)

gives `--max-length INTEGER RANGE [x>=1] ... [default: 512]`. A field without a default is
required; `flag` renames its option (`n_resamples` is `--bootstrap`); `argument=True` makes it a
positional argument (a tuple of them, for a tuple field); `in_file=False` keeps it out of config
files (`--resume` says what to do this time, not how the run is set up).
"""
from dataclasses import MISSING, field


def option(default=MISSING, help: str = "", choices=None, *, low=None, high=None, open_range: bool = False,
           flag: str | None = None, argument: bool = False, in_file: bool = True):
    """A field of a command's config. `low`/`high` bound a number (inclusive, or exclusive with
    `open_range`); `choices` lists the values a string may take."""
    return field(default=default, metadata={
        "help": help, "choices": tuple(choices) if choices else None, "low": low, "high": high,
        "open_range": open_range, "flag": flag, "argument": argument, "in_file": in_file})
