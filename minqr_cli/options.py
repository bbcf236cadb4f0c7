"""From a command's config dataclass to its command line, and config files.

Every minqr command is a dataclass of `minqr.options.option` fields (TrainConfig, ScoreConfig, ...),
and `config_command` turns one into a click command, field by field:

    int, float, str        --name VALUE   (a range or a choice where the field gives one)
    bool, default False    --name         (a flag)
    bool, default True     --name/--no-name
    X | None               an option whose default is worked out later (the help says how)
    tuple[str, ...]        a positional argument taking one or more values (argument=True)

plus `--config FILE`: a JSON or YAML mapping of option names (dashes or underscores) to values,
read before the command line, so that the command line wins over the file and the file over the
defaults (click's `default_map`). Each value is converted and checked by its option's own type,
and an error names the file and the key.
"""
import json
import math
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

import click
import yaml
from click.core import ParameterSource

from minqr.errors import MinqrError, MinqrUsageError
from minqr.options import option_name
from minqr.reading import loads
from minqr_cli.exits import MinqrCommand

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def config_command(config_class, name: str | None = None, ignored_keys=()):
    """Decorator: `function(options, given)` becomes a click command whose options are
    `config_class`'s fields and --config. `options` holds every field's value, `given` only those
    the user set (on the command line or in the file). A MinqrError becomes "Error: ..." and exit
    status 1 (2 for a MinqrUsageError, as for any other misuse of the options); Ctrl-C, status 130
    (minqr_cli/exits.py). `name`: the command's name [default: the function's, with dashes for
    underscores]. `ignored_keys` may
    appear in a config file without being options (a run's training_args.json records facts such as
    its number of processes)."""
    def decorate(function):
        hints = typing.get_type_hints(config_class)
        params = [_parameter(f, hints[f.name]) for f in fields(config_class)]
        command_line_only = {f.name for f in fields(config_class) if not f.metadata["in_file"]}

        def callback(**options):
            context = click.get_current_context()
            given = {name: value for name, value in options.items()
                     if context.get_parameter_source(name) is not ParameterSource.DEFAULT}
            try:
                return function(options, given)
            except MinqrUsageError as error:
                raise click.UsageError(str(error)) from None
            except MinqrError as error:
                raise click.ClickException(str(error)) from None

        return MinqrCommand(name or function.__name__.replace("_", "-"), callback=callback,
                            params=[_config_option(set(ignored_keys), command_line_only), *params],
                            help=function.__doc__, context_settings=CONTEXT)
    return decorate


def _parameter(f, hint) -> click.Parameter:
    """The click option (or argument) of one config field."""
    meta = f.metadata
    many = typing.get_origin(hint) in (tuple, list)
    kind = _value_type(hint)
    required = f.default is MISSING
    if meta["argument"]:
        return click.Argument([f.name], nargs=-1 if many else 1, required=required, type=_click_type(meta, kind))
    name = option_name(f)
    if kind is bool:
        if f.default:  # a field that defaults to True is switched off with --no-NAME (e.g. --no-shared-prefix)
            return click.Option([f"{name}/--no-{name[2:]}", f.name], default=True, show_default=True, help=meta["help"])
        return click.Option([name, f.name], is_flag=True, default=False, help=meta["help"])
    default = None if required else f.default
    return click.Option([name, f.name], type=_click_type(meta, kind), required=required, default=default,
                        show_default=default is not None, help=meta["help"])


def _value_type(hint):
    """The type of one value: `int | None` -> int, `tuple[str, ...]` -> str."""
    if isinstance(hint, types.UnionType):
        (hint,) = [kind for kind in typing.get_args(hint) if kind is not type(None)]
    if typing.get_origin(hint) in (tuple, list):
        hint = typing.get_args(hint)[0]
    return hint


class _Finite:
    """A float type that refuses NaN and the infinities (NaN passes click's range checks)."""

    def convert(self, value, param, context):
        number = super().convert(value, param, context)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, context)
        return number


class FiniteFloat(_Finite, click.types.FloatParamType):
    pass


class FiniteFloatRange(_Finite, click.FloatRange):
    pass


def _click_type(meta: dict, kind):
    if meta["choices"]:
        return click.Choice(meta["choices"])
    # A range with its own error (`out_of_range`) is the library's to check (minqr.options.check_options):
    # its message says why the range is what it is, and click's would not.
    if (meta["low"] is not None or meta["high"] is not None) and not meta["out_of_range"]:
        bounded = click.IntRange if kind is int else FiniteFloatRange
        return bounded(meta["low"], meta["high"], min_open=meta["low_open"], max_open=meta["high_open"])
    return FiniteFloat() if kind is float else kind


# -- config files ---------------------------------------------------------------------------------

def _config_option(ignored_keys: set, command_line_only: set) -> click.Option:
    def load(context, parameter, path):
        if path is not None:
            context.default_map = _file_defaults(context, Path(path), ignored_keys, command_line_only)
    return click.Option(["--config"], type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False,
                        callback=load, help="JSON or YAML file of options (names with dashes or underscores); the "
                        "command line overrides it. A run's training_args.json is one: `minqr train --config "
                        "RUN/training_args.json --out NEW` repeats RUN. Options that say what to do this time "
                        "(train's --resume and --overwrite) are taken from the command line only.")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, with a key given twice in one mapping refused (as JSON's is, minqr.reading):
    the plain loader keeps the last, and a file's `model:` written twice silently picks one."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        for k, key in enumerate(keys):
            if key in keys[:k]:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        node.value[k][0].start_mark)
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: Path) -> dict:
    """The mapping in a .json, .yaml or .yml file (JSON for any other name)."""
    try:
        text = path.read_text(encoding="utf-8")
        values = yaml.load(text, _UniqueKeyLoader) if path.suffix in (".yaml", ".yml") else loads(text)
    except RecursionError:  # YAML nested too deep for its parser (JSON is bounded by minqr.reading)
        raise click.BadParameter(f"{path} is nested too deep to be a config file", param_hint="'--config'") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as error:
        raise click.BadParameter(f"{path} is not a readable {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} "
                                 f"file: {error}", param_hint="'--config'") from None
    if not isinstance(values, dict):
        raise click.BadParameter(f"{path} holds a {type(values).__name__}, not a mapping of option names to values",
                                 param_hint="'--config'")
    return values


def _file_defaults(context: click.Context, path: Path, ignored_keys: set, command_line_only: set) -> dict:
    """A config file's values, checked against the command's options, as click's default_map. Keys
    of `command_line_only` options are passed over: a run's training_args.json records whether it
    was resumed, and repeating the run elsewhere must not resume."""
    command = context.command
    # a key is a field's name or its option's, with dashes or underscores (n_resamples or bootstrap)
    by_name = {name.lstrip("-").replace("-", "_"): param for param in command.params if param.name != "config"
               for name in [param.name, *param.opts]}
    defaults, keys = {}, {}
    for key, value in read_config_file(path).items():
        name = str(key).replace("-", "_")
        if name in ignored_keys or (name in by_name and by_name[name].name in command_line_only):
            continue
        if name in by_name and by_name[name].name in keys:
            raise click.BadParameter(f"{path}: {keys[by_name[name].name]!r} and {key!r} are the same option: give "
                                     "it once", param_hint="'--config'")
        if name in by_name:
            keys[by_name[name].name] = key
        if name not in by_name:
            raise click.BadParameter(f"{path}: {key!r} is not an option of `{command.name}`; its options are "
                                     f"{', '.join(sorted({p.name for p in by_name.values()} - command_line_only))}",
                                     param_hint="'--config'")
        param = by_name[name]
        if value is None and (param.required or param.default is not None):  # null only where "none" is the default
            default = param.default
            why = "it has no default" if param.required or not isinstance(default, (str, int, float, tuple)) \
                else f"its default is {default!r}"
            raise click.BadParameter(f"{path}: {key}: null is no value of this option ({why}): give a value"
                                     + ("" if param.required else ", or leave the key out for the default"),
                                     param_hint="'--config'")
        if value is not None:
            try:
                value = by_name[name].type_cast_value(context, _as_typed(by_name[name], value))
            except click.BadParameter as error:
                raise click.BadParameter(f"{path}: {key}: {error.message}", param_hint="'--config'") from None
        defaults[by_name[name].name] = value
    return defaults


def _as_typed(param: click.Parameter, value):
    """A config file's value as the command line would have typed it, so that the option's own type
    converts and checks it as it does the command line's: a number as its text (`seed: 3.7` is
    "3.7", no integer), true/false for a flag only, a list for an option of several values only."""
    if getattr(param, "is_flag", False):
        if not isinstance(value, bool):
            raise click.BadParameter(f"{value!r} is not true or false (a switch).")
        return value
    several = param.nargs != 1 or getattr(param, "multiple", False)
    text = isinstance(param.type, click.types.StringParamType)
    if several and isinstance(value, str):
        return (value,)
    if several and isinstance(value, list):
        return tuple(_as_typed_one(item, text) for item in value)
    if several:
        raise click.BadParameter(f"{value!r} is not a list of values.")
    return _as_typed_one(value, text)


def _as_typed_one(value, text: bool) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise click.BadParameter(f"expects one value, not a {type(value).__name__} ({value!r:.60}).")
    if text and not isinstance(value, str):  # YAML reads out: 2024.10 as 2024.1, and 0755 as 493
        raise click.BadParameter(f"{value!r} is a number in the file, but this option takes text, which a number's "
                                 "digits may not survive: quote it.")
    return str(value)
