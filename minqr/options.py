"""Options: a config dataclass's field that carries its default, its help text and its limits.

Every command of minqr (`minqr train`, `minqr score`, ...) is a dataclass of such fields, and the
command line is derived from it (minqr_cli/options.py), so an option's name, default, help and
range are written once, here in the library, beside the code that uses them:

    max_length: int = option(512, "tokens kept of each text", low=1)

gives `--max-length INTEGER RANGE [x>=1] ... [default: 512]`. A field without a default is
required; `flag` renames its option (`n_resamples` is `--bootstrap`); `argument=True` makes it a
positional argument (a tuple of them, for a tuple field); `in_file=False` keeps it out of config
files (`--resume` says what to do this time, not how the run is set up).

A config checks its values against these declarations with `check_options(self)` in its
`__post_init__`, so that a config built in Python is held to the same ranges as the command line.
Where a range needs saying why it is what it is, `out_of_range` words the error: the command line
then leaves that option's range to the library, whose message carries the reason. A float option
is a finite number whatever its range (NaN would pass any unbounded option, and an infinite weight
or margin only turns the loss into NaN later), on the command line and in `check_options` alike.
"""
import math
from dataclasses import MISSING, field, fields

from minqr.errors import MinqrError

# The seeds every command takes: numpy and torch refuse negative seeds, torch those beyond 64 bits (and
# training also seeds seed + 1 + rank); 32 bits is what every seeding API takes.
MAX_SEED = 2**32 - 1


def option(default=MISSING, help: str = "", choices=None, *, low=None, high=None, low_open: bool = False,
           high_open: bool = False, out_of_range: str | None = None, flag: str | None = None, argument: bool = False,
           in_file: bool = True):
    """A field of a command's config. `low`/`high` bound a number (inclusive, or exclusive with
    `low_open`/`high_open`); `choices` lists the values a string may take. `out_of_range`: the
    error for a value outside the range, after the option's name, with {value}, {range}, {low} and
    {high} filled in [default: "must be at least {low} (got {value})", "must be in {range} ..."]."""
    return field(default=default, metadata={
        "help": help, "choices": tuple(choices) if choices else None, "low": low, "high": high,
        "low_open": low_open, "high_open": high_open, "out_of_range": out_of_range, "flag": flag,
        "argument": argument, "in_file": in_file})


def seed_option(help: str):
    """The `seed` field of a command: 0 by default, from 0 to MAX_SEED."""
    return option(0, help, low=0, high=MAX_SEED)


def option_name(f) -> str:
    """How the command line spells a config field: its `flag`, or --name-with-dashes."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def in_range(value, meta: dict) -> bool:
    """Whether a number lies in its option's range (NaN lies in none)."""
    low, high = meta["low"], meta["high"]
    above = low is None or (value > low if meta["low_open"] else value >= low)
    below = high is None or (value < high if meta["high_open"] else value <= high)
    return above and below  # NaN fails both comparisons


def range_text(meta: dict) -> str:
    """[0, 1), (0, inf), ...: the range an option's declaration gives."""
    low = "-inf" if meta["low"] is None else _number(meta["low"])
    high = "inf" if meta["high"] is None else _number(meta["high"])
    return f"{'(' if meta['low_open'] else '['}{low}, {high}{')' if meta['high_open'] else ']'}"


def _number(bound) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"  # a seed's 4294967295, not 4.29497e+09


def check_options(config) -> None:
    """Raise one MinqrError naming every field of `config` (a dataclass of `option` fields) whose
    value lies outside its declared range or choices; None is a default still to be worked out."""
    problems = []
    for f in fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None or "choices" not in meta:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{option_name(f)} must be a finite number (got {value})")
        elif meta["choices"] and value not in meta["choices"]:
            problems.append(f"{option_name(f)} must be one of {', '.join(meta['choices'])}, not {value!r}")
        elif (meta["low"] is not None or meta["high"] is not None) and not in_range(value, meta):
            if meta["out_of_range"]:
                message = meta["out_of_range"]
            elif meta["high"] is None and not meta["low_open"]:
                message = "must be at least {low} (got {value})"
            else:
                message = "must be in {range} (got {value})"
            problems.append(f"{option_name(f)} " + message.format(value=value, range=range_text(meta),
                                                                   low=meta["low"], high=meta["high"]))
    if problems:
        raise MinqrError("; ".join(problems))
