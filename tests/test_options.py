"""minqr.options: a range declared once in `option(...)` is checked by the config itself
(check_options), and agrees with the range click enforces on the command line."""
import math
import random
from dataclasses import dataclass, fields

import click
import pytest
from click.testing import CliRunner

from minqr.adapters.best_of_n import BestOfNConfig
from minqr.adapters.server import ServeConfig
from minqr.errors import MinqrError
from minqr.models.export import ExportConfig
from minqr.options import check_options, option
from minqr.study.personalize import PersonalizeConfig
from minqr.study.report import AnalyzeConfig, TableConfig
from minqr.study.scoring import ScoreConfig
from minqr.synthetic.candidates import CandidatesConfig
from minqr.synthetic.folder import SyntheticConfig
from minqr.training.config import TrainConfig
from minqr_cli.options import config_command


def make_config(**declaration):
    @dataclass
    class Config:
        value: float | None = option(None, "a number", **declaration)
        name: str = option("a", "a choice", ("a", "b"))

        def __post_init__(self):
            check_options(self)
    return Config


def click_accepts(value, low, high, low_open, high_open) -> bool:
    """The reference: click's own range type, which the command line uses."""
    try:
        click.FloatRange(low, high, min_open=low_open, max_open=high_open).convert(value, None, None)
        return True
    except click.BadParameter:
        return False


def test_ranges_agree_with_click_on_random_values_and_edges():
    rng = random.Random(0)
    for _ in range(300):
        low = rng.choice([None, 0.0, -1.5, 2.0])
        high = rng.choice([None, 3.0, 0.5, math.inf]) if low is None or low < 0.5 else rng.choice([None, 3.0])
        if low is None and high is None:
            high = 1.0
        low_open, high_open = rng.random() < 0.5, rng.random() < 0.5
        edges = [v for v in (low, high) if v is not None and math.isfinite(v)]
        value = rng.choice(edges + [rng.uniform(-3, 4), math.inf, -math.inf])
        config = make_config(low=low, high=high, low_open=low_open, high_open=high_open)
        if click_accepts(value, low, high, low_open, high_open) and math.isfinite(value):  # inf: never a float option
            config(value=value)
        else:
            with pytest.raises(MinqrError, match="^--value "):
                config(value=value)
        # NaN lies in no range (click's range type lets it through: it compares false to both ends)
        with pytest.raises(MinqrError, match=r"\(got nan\)"):
            config(value=math.nan)


def test_messages_name_the_option_and_the_range():
    with pytest.raises(MinqrError) as error:
        make_config(low=1)(value=0)
    assert str(error.value) == "--value must be at least 1 (got 0)"
    with pytest.raises(MinqrError) as error:
        make_config(low=0, high=1, high_open=True)(value=1.0)
    assert str(error.value) == "--value must be in [0, 1) (got 1.0)"
    with pytest.raises(MinqrError) as error:
        make_config(low=0, high=0.5, out_of_range="is a share in {range} (got {value}), at most {high}")(value=0.75)
    assert str(error.value) == "--value is a share in [0, 0.5] (got 0.75), at most 0.5"
    with pytest.raises(MinqrError) as error:  # every problem at once
        make_config(low=1)(value=0, name="c")
    assert str(error.value) == "--value must be at least 1 (got 0); --name must be one of a, b, not 'c'"
    make_config(low=1)(value=None)  # None: a default still to be worked out


def test_a_range_with_its_own_reason_is_left_to_the_library():
    """On the command line: a range with its reason fails in the config, exit 1, with the reason; one
    without fails in click's range type, exit 2, before the command runs."""

    explained = make_config(low=0, high=1, out_of_range="is a probability in {range} (got {value})")

    @config_command(explained, name="probe")
    def probe(options, given):
        """A probe."""
        explained(**options)
    result = CliRunner().invoke(probe, ["--value", "2"])
    assert result.exit_code == 1 and result.output == "Error: --value is a probability in [0, 1] (got 2.0)\n"

    @config_command(make_config(low=0, high=1), name="probe")
    def plain(options, given):
        """A probe."""
    result = CliRunner().invoke(plain, ["--value", "2"])
    assert result.exit_code == 2 and "2.0 is not in the range 0<=x<=1" in result.output


# each command's config: its required fields, and an out-of-range value with the message it must give
COMMAND_CASES = [
    (ScoreConfig, dict(model="m", data="d", out="o.npz"), "batch_size", 0, "--batch-size must be at least 1 (got 0)"),
    (ScoreConfig, dict(model="m", data="d", out="o.npz"), "dtype", "fp8",
     "--dtype must be one of auto, float32, bfloat16, not 'fp8'"),
    (AnalyzeConfig, dict(scores=("s.npz",), out="r"), "confidence", 1.0, "--confidence must be in (0, 1) (got 1.0)"),
    (AnalyzeConfig, dict(scores=("s.npz",), out="r"), "n_resamples", -1, "--bootstrap must be at least 0 (got -1)"),
    (SyntheticConfig, dict(out="t"), "num_test", 0, "--num-test must be at least 1 (got 0)"),
    (SyntheticConfig, dict(out="t"), "variant", "other", "--variant must be one of demo, shifted, not 'other'"),
    (BestOfNConfig, dict(model="m", data="d", out="o.jsonl"), "reference", "prompt",
     "--reference must be one of group, reply, not 'prompt'"),
    (BestOfNConfig, dict(model="m", data="d", out="o.jsonl"), "max_length", 0, "--max-length must be at least 1 (got 0)"),
    (ServeConfig, dict(model="m"), "port", 65536, "--port must be in [0, 65535] (got 65536)"),
    (ServeConfig, dict(model="m"), "max_batch", 0, "--max-batch must be at least 1 (got 0)"),
    (CandidatesConfig, dict(out="c"), "num_candidates", 1, "--num-candidates must be in [2, 64] (got 1)"),
    (CandidatesConfig, dict(out="c"), "num_candidates", 65, "--num-candidates must be in [2, 64] (got 65)"),
    (PersonalizeConfig, dict(model="m", data="d"), "batch_size", 0, "--batch-size must be at least 1 (got 0)"),
]


@pytest.mark.parametrize("config, required, name, value, message", COMMAND_CASES,
                         ids=[f"{case[0].__name__}-{case[2]}={case[3]}" for case in COMMAND_CASES])
def test_every_command_config_holds_python_to_its_ranges(config, required, name, value, message):
    """A config built in Python (not through click) checks the ranges and choices its options
    declare, as the command line does; the same config with an in-range value is accepted."""
    with pytest.raises(MinqrError) as error:
        config(**required, **{name: value})
    assert str(error.value) == message
    config(**required)  # the defaults lie in range


@pytest.mark.parametrize("config", [TrainConfig, ScoreConfig, AnalyzeConfig, TableConfig, ExportConfig,
                                    PersonalizeConfig, SyntheticConfig, CandidatesConfig, BestOfNConfig, ServeConfig])
def test_what_to_do_this_time_comes_from_the_command_line_only(config):
    """--overwrite and --resume are never read from a config file (docs/guide.md): a run's
    training_args.json, or any file, must not replace what exists (export, objectives-table and
    personalize took `overwrite: true` from a file)."""
    for field in fields(config):
        if field.name in ("overwrite", "resume"):
            assert field.metadata["in_file"] is False, (config.__name__, field.name)
