"""Options: a config dataclass's field that carries its default, its help text and its limits.

Every command of minqr (`minqr train`, `minqr score`, ...) is a dataclass of such fields, and the
command line is derived from it (minqr_cli/options.py), so an option's name, default, help and
range are written once, here in the library, beside the code that uses them:

    max_length: int = option(512, "tokens kept of each text", low=1)

gives `--max-length INTEGER RANGE [x>=1] ... [default: 512]`. A field without a default is
required; `flag` renames its option (`n_resamples` is `--bootstrap`); `argument=True` makes it a
positional argument (a tuple of them, for a tuple field); `in_file=False` keeps it out of config
files (`--resume` says what to do this time, not how the run is set up).

A float option is a finite number whatever its limits (NaN would pass any `x >= 0`, and an infinite
weight or margin only turns the loss into NaN later); `option_problems` applies the same rules to
a config built in Python, which never passes through the command line.
"""
import math
from dataclasses import MISSING, field, fields

# The seeds every command takes: numpy and torch refuse negative seeds, torch those beyond 64 bits (and
# training also seeds seed + 1 + rank); 32 bits is what every seeding API takes.
MAX_SEED = 2**32 - 1


def option(default=MISSING, help: str = "", choices=None, *, low=None, high=None, open_range: bool = False,
           flag: str | None = None, argument: bool = False, in_file: bool = True):
    """A field of a command's config. `low`/`high` bound a number (inclusive, or exclusive with
    `open_range`); `choices` lists the values a string may take."""
    return field(default=default, metadata={
        "help": help, "choices": tuple(choices) if choices else None, "low": low, "high": high,
        "open_range": open_range, "flag": flag, "argument": argument, "in_file": in_file})


def seed_option(help: str):
    """The `seed` field of a command: 0 by default, from 0 to MAX_SEED."""
    return option(0, help, low=0, high=MAX_SEED)


def option_problems(config) -> list[str]:
    """What the command line would refuse among `config`'s values, one line each: a float that is
    not finite, a number outside its option's `low`/`high`."""
    problems = []
    for f in fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = "--" + f.name.replace("_", "-")
        if not math.isfinite(value):
            problems.append(f"{name} must be a finite number (got {value})")
            continue
        low, high, strict = meta.get("low"), meta.get("high"), meta.get("open_range")
        if low is not None and (value <= low if strict else value < low):
            problems.append(f"{name} must be {'more than' if strict else 'at least'} {low} (got {value})")
        if high is not None and (value >= high if strict else value > high):
            problems.append(f"{name} must be {'less than' if strict else 'at most'} {high} (got {value})")
    return problems
