"""The command line (minqr_cli): one `minqr` command, every subcommand's options derived from its
config dataclass, config files, and tools/*.py as the same commands.

The jobs themselves are tested through their commands in test_train, test_scoring, test_report,
test_export and test_synthetic; here the library functions are replaced by recorders where only
what the command line passes them matters.
"""
import ast
import dataclasses
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import setuptools
from click.testing import CliRunner
from factories import ROOT, load_tool, sigint_at_default
from test_train import as_argv, tiny_options, write_run_inputs

import minqr
import minqr_cli.commands as commands
from minqr.adapters.server import ServeConfig
from minqr.adapters.best_of_n import BestOfNConfig
from minqr.errors import MinqrError
from minqr.models.export import ExportConfig
from minqr.study.report import AnalyzeConfig, TableConfig
from minqr.study.scoring import ScoreConfig
from minqr.synthetic.candidates import CandidatesConfig
from minqr.synthetic.folder import SyntheticConfig
from minqr.training.config import RUN_FACTS, TrainConfig

CONFIGS = {"train": TrainConfig, "score": ScoreConfig, "analyze": AnalyzeConfig, "export": ExportConfig,
           "synthetic": SyntheticConfig, "objectives-table": TableConfig, "candidates": CandidatesConfig,
           "best-of-n": BestOfNConfig, "serve": ServeConfig}


def invoke(*argv):
    return CliRunner().invoke(commands.main, [str(a) for a in argv])


def record(monkeypatch, target, returns="done"):
    """Replace a library function that a command calls, "MODULE.NAME" (NAME as minqr_cli/commands/MODULE.py
    names it), by a recorder of its arguments."""
    calls = []

    def recorder(*args, **kwargs):
        calls.append((args, kwargs))
        return returns
    module, name = target.split(".")
    monkeypatch.setattr(importlib.import_module(f"minqr_cli.commands.{module}"), name, recorder)
    return calls


# ---- one command, options from the config dataclasses -----------------------------------------

def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output == f"minqr, version {minqr.__version__}\n"


def test_every_subcommand_loads_under_its_name_and_the_help_lists_it_unloaded():
    """The group's table names each subcommand's module: each loads as a command of that name, and
    `minqr --help` lists them all, with the table's lines, without importing one (nor torch)."""
    for name in commands.COMMANDS:
        command = commands.main.get_command(None, name)
        assert command.name == name and command.help, name
    assert commands.main.get_command(None, "trian") is None
    result = invoke("trian")
    assert result.exit_code == 2 and "No such command 'trian'. Did you mean 'train'?" in result.output
    program = ("import sys; from minqr_cli.commands import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
               "print(sorted(m for m in sys.modules if m.startswith('minqr_cli.commands.') or m == 'torch'))")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env={**os.environ,
                          "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    listing, loaded = done.stdout.rsplit("\n", 2)[:2]
    assert loaded == "[]"
    for name, (_, summary) in commands.COMMANDS.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(summary)}$", listing, re.MULTILINE), (name, listing)


def test_every_package_folder_is_in_the_distribution():
    """setup.py's find_packages patterns take every folder of minqr and minqr_cli that holds an
    __init__.py: a wheel would lack one they miss (minqr_cli.commands, say), which the editable
    install that the tests run in does not show."""
    call = next(node for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "find_packages")
    include = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "include"))
    folders = {".".join(init.parent.relative_to(ROOT).parts)
               for top in ("minqr", "minqr_cli") for init in (ROOT / top).rglob("__init__.py")}
    assert "minqr_cli.commands" in folders
    assert folders <= set(setuptools.find_packages(where=str(ROOT), include=include))


def test_console_script_is_installed():
    """`pip install` puts `minqr` beside the interpreter (make test installs minqr into .venv)."""
    script = Path(sys.executable).parent / "minqr"
    if not script.exists():
        pytest.skip(f"no console script at {script}: minqr is not pip-installed into this interpreter's environment")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == f"minqr, version {minqr.__version__}\n", done.stderr
    done = subprocess.run([str(script), "score", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--anchor-reply" in done.stdout


@pytest.mark.parametrize("name", CONFIGS)
def test_options_are_the_config_fields(name):
    """Every field is an option (or the argument), under its name, and nothing else but --config."""
    command = commands.main.get_command(None, name)
    params = {param.name for param in command.params}
    assert params == {f.name for f in dataclasses.fields(CONFIGS[name])} | {"config"}
    for f in dataclasses.fields(CONFIGS[name]):
        (param,) = [p for p in command.params if p.name == f.name]
        assert param.required == (f.default is dataclasses.MISSING), f.name
        if f.default is not dataclasses.MISSING:
            assert param.default == f.default, f.name


@pytest.mark.parametrize("tool, name", [("train", "train"), ("score", "score"), ("analyze", "analyze"),
                                        ("export", "export"), ("synthetic", "synthetic"),
                                        ("objectives_table", "objectives-table"), ("candidates", "candidates"),
                                        ("best_of_n", "best-of-n"), ("serve", "serve"), ("personalize", "personalize")])
def test_tools_are_the_same_commands(tool, name):
    assert load_tool(tool) is commands.main.get_command(None, name)


def test_every_subcommand_has_its_script():
    assert sorted(p.stem.replace("_", "-") for p in (ROOT / "tools").glob("*.py") if p.stem != "best_of_n_table") == \
        sorted(commands.COMMANDS)


def test_ranges_choices_and_renamed_flags(monkeypatch):
    calls = record(monkeypatch, "analyze.analyze")
    assert invoke("analyze", "a.npz", "b.npz", "--out", "r", "--bootstrap", 7, "--confidence", 0.9).exit_code == 0
    assert calls == [((("a.npz", "b.npz"), "r"), {"view": "mean", "bins": 50, "eps": 1e-10, "n_resamples": 7,
                                                   "confidence": 0.9, "seed": 0, "truth": None, "no_truth": False,
                                                   "overwrite": False})]
    for argv, words in [(["--bins", 0], "Invalid value for '--bins': 0 is not in the range x>=1."),
                        (["--confidence", 1], "Invalid value for '--confidence': 1.0 is not in the range 0<x<1."),
                        (["--n-resamples", 3], "No such option '--n-resamples'")]:
        result = invoke("analyze", "a.npz", "--out", "r", *argv)
        assert result.exit_code == 2 and words in result.output, result.output
    result = invoke("synthetic", "--out", "t", "--variant", "other")
    assert result.exit_code == 2 and "'other' is not one of 'demo', 'shifted'" in result.output


def test_usage_errors_exit_2_library_errors_exit_1(monkeypatch, tmp_path):
    result = invoke("analyze", "a.npz", "--out", "r", "--truth", "t.npz", "--no-truth")
    assert result.exit_code == 2
    assert result.output.endswith("Error: --truth and --no-truth contradict each other; give one\n")
    result = invoke("export", "--model", tmp_path, "--out", tmp_path / "x")
    assert result.exit_code == 1
    assert result.output == ("Error: nothing to export: add --scalar (a one-output model whose reward is the mean of "
                             "the quantiles), the only export for now\n")


# ---- config files ------------------------------------------------------------------------------

def test_config_file_precedence(monkeypatch, tmp_path):
    """The command line over the file, the file over the defaults; dashes or underscores; YAML or JSON."""
    calls = record(monkeypatch, "synthetic.make_synthetic_task")
    json_file = tmp_path / "task.json"
    json_file.write_text(json.dumps({"num-train": 5, "variant": "shifted", "out": "from-file"}))
    yaml_file = tmp_path / "task.yaml"
    yaml_file.write_text("num_train: 5\nvariant: shifted\nout: from-file\n")
    for config in (json_file, yaml_file):
        assert invoke("synthetic", "--config", config, "--num-test", 9, "--out", "typed").exit_code == 0
        assert invoke("synthetic", "--config", config).exit_code == 0
    typed = (("typed",), {"num_train": 5, "num_test": 9, "seed": 0, "variant": "shifted", "labels_per_annotator": 0,
                          "overwrite": False})
    from_file = (("from-file",), {"num_train": 5, "num_test": 1000, "seed": 0, "variant": "shifted",
                                  "labels_per_annotator": 0, "overwrite": False})
    assert calls == [typed, from_file, typed, from_file]


def test_config_values_are_checked_by_their_options(tmp_path):
    config = tmp_path / "c.json"
    cases = [
        ({"num_trian": 5}, f"Invalid value for '--config': {config}: 'num_trian' is not an option of `synthetic`; "
                           "its options are labels_per_annotator, num_test, num_train, out, seed, variant"),
        ({"num_train": "many"}, f"Invalid value for '--config': {config}: num_train: 'many' is not a valid integer range."),
        ({"num_train": 0}, f"Invalid value for '--config': {config}: num_train: 0 is not in the range x>=1."),
        ({"variant": "other"}, f"Invalid value for '--config': {config}: variant: 'other' is not one of 'demo', "
                               "'shifted'."),
        ([1, 2], f"Invalid value for '--config': {config} holds a list, not a mapping of option names to values"),
        # null where the option has a value by default (a TypeError deep in the run before)
        ({"num_train": None}, f"Invalid value for '--config': {config}: num_train: null is no value of this option "
                              "(its default is 40000): give a value, or leave the key out for the default"),
        # and where the option is required (a TypeError in the output's lock before)
        ({"out": None}, f"Invalid value for '--config': {config}: out: null is no value of this option (it has no "
                        "default): give a value"),
        # a number for text (YAML's out: 2024.10 is 2024.1), and one option under two keys
        ({"out": 2024.1}, f"Invalid value for '--config': {config}: out: 2024.1 is a number in the file, but this "
                          "option takes text, which a number's digits may not survive: quote it."),
        ({"num_train": 5, "num-train": 6}, f"Invalid value for '--config': {config}: 'num_train' and 'num-train' "
                                           "are the same option: give it once"),
    ]
    for values, message in cases:
        config.write_text(json.dumps(values))
        result = invoke("synthetic", "--config", config)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    yaml_config = tmp_path / "c.yaml"
    yaml_config.write_text("out: task\nseed: 1\nout: other\n")  # PyYAML alone keeps the last
    result = invoke("synthetic", "--config", yaml_config)
    assert result.exit_code == 2 and "the key 'out' is given twice" in result.output, result.output
    config.write_text("{not json")
    result = invoke("synthetic", "--config", config)
    assert result.exit_code == 2 and f"{config} is not a readable JSON file: Expecting property name" in result.output
    result = invoke("synthetic", "--config", tmp_path / "none.json")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_run_facts_and_command_line_only_options_in_a_file(monkeypatch, tmp_path):
    """training_args.json's facts are passed over; so are --resume and --overwrite (what to do this
    time, not how the run is set up): repeating a resumed run elsewhere starts afresh."""
    calls = record(monkeypatch, "train.train_model", returns=types.SimpleNamespace(rank=1))  # rank 1 prints nothing
    config = tmp_path / "training_args.json"
    config.write_text(json.dumps({"head": "scalar", "out": str(tmp_path / "run"), "resume": True, "overwrite": True,
                                  **{fact: 1 for fact in RUN_FACTS}}))
    assert invoke("train", "--config", config).exit_code == 0
    ((config_given,), _), = calls
    assert (config_given.head, config_given.resume, config_given.overwrite) == ("scalar", False, False)


def test_training_args_repeat_the_run_bit_for_bit(tmp_path):
    """`minqr train --config RUN/training_args.json --out NEW` trains the same model, bit for bit."""
    inputs = write_run_inputs(tmp_path / "inputs")
    first = tmp_path / "first"
    assert invoke("train", *as_argv(tiny_options(inputs, first, max_steps=4, head="quantile"))).exit_code == 0
    again = tmp_path / "again"
    result = invoke("train", "--config", first / "training_args.json", "--out", again)
    assert result.exit_code == 0, result.output
    assert (again / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    args = json.loads((again / "training_args.json").read_text())
    assert {**json.loads((first / "training_args.json").read_text()), "out": str(again)} == args


def test_config_keys_may_be_option_names(monkeypatch, tmp_path):
    """A key is a field's name or its option's: `bootstrap` as well as `n_resamples`."""
    calls = record(monkeypatch, "analyze.analyze")
    for key in ("bootstrap", "n-resamples"):
        config = tmp_path / f"{key}.yaml"
        config.write_text(f"{key}: 7\nscores: [a.npz]\nout: r\n")
        assert invoke("analyze", "--config", config).exit_code == 0
    assert [kwargs["n_resamples"] for _, kwargs in calls] == [7, 7]
    assert [args for args, _ in calls] == [(("a.npz",), "r")] * 2


def test_config_file_values_are_converted_as_the_command_line_converts_them(tmp_path):
    """A file's value is what the command line would have typed: no float truncated into an integer,
    no true counted as 1, one value for a one-value option, true/false for a switch only."""
    config = tmp_path / "c.yaml"
    cases = [
        ("seed: 3.7", "seed: '3.7' is not a valid integer range"),
        ("epochs: true", "epochs: expects one value, not a bool (True)"),
        ("lr: [1, 2]", "lr: expects one value, not a list ([1, 2])"),
        ("lr: {a: 1}", "lr: expects one value, not a dict"),
        ("grad_checkpoint: 2", "grad_checkpoint: 2 is not true or false (a switch)"),
        ("lr: .nan", "lr: 'nan' is not a finite number"),
        ("center_coef: .inf", "center_coef: 'inf' is not a finite number"),
        ("seed: 99999999999999999999", "seed: 99999999999999999999 is not in the range 0<=x<=4294967295"),
    ]
    for line, message in cases:
        config.write_text(line + "\n")
        result = invoke("train", "--config", config)
        assert result.exit_code == 2, result.output
        assert f"Invalid value for '--config': {config}: {message}" in " ".join(result.output.split()), result.output
    # what the command line would take, a file takes: numbers as YAML or JSON writes them
    calls = []
    for text in ("seed: 3\nlr: 1e-5\nmax_steps: 4\ngrad_checkpoint: true\nhead: scalar\n",
                 json.dumps({"seed": 3, "lr": 1e-05, "max_steps": 4, "grad_checkpoint": True, "head": "scalar"})):
        config.write_text(text)
        with pytest.MonkeyPatch.context() as patch:
            calls = record(patch, "train.train_model", returns=types.SimpleNamespace(rank=1))
            assert invoke("train", "--config", config).exit_code == 0
        ((given,), _), = calls
        assert (given.seed, given.lr, given.max_steps, given.grad_checkpoint) == (3, 1e-5, 4, True)


def test_analyze_scores_may_be_one_name_or_a_list_in_a_file(monkeypatch, tmp_path):
    calls = record(monkeypatch, "analyze.analyze")
    config = tmp_path / "c.yaml"
    for scores in ("a.npz", "[a.npz]"):
        config.write_text(f"scores: {scores}\nout: r\n")
        assert invoke("analyze", "--config", config).exit_code == 0
    config.write_text("scores: 3\nout: r\n")
    result = invoke("analyze", "--config", config)
    assert result.exit_code == 2 and "scores: 3 is not a list of values" in result.output
    assert [args for args, _ in calls] == [(("a.npz",), "r")] * 2


@pytest.mark.parametrize("argv, words", [
    (["train", "--seed", "-1"], ["'--seed'", "-1 is not in the range 0<=x<=4294967295"]),
    (["train", "--seed", "99999999999999999999"], ["'--seed'", "is not in the range 0<=x<=4294967295"]),
    (["synthetic", "--out", "x", "--seed", "-1"], ["'--seed'", "0<=x<=4294967295"]),
    (["analyze", "a.npz", "--out", "r", "--seed", "4294967296"], ["'--seed'", "0<=x<=4294967295"]),
    (["analyze", "a.npz", "--out", "r", "--eps", "nan"], ["'--eps'", "'nan' is not a finite number"]),
    (["analyze", "a.npz", "--out", "r", "--confidence", "nan"], ["'--confidence'", "'nan' is not a finite number"]),
    (["train", "--lr", "nan"], ["'--lr'", "'nan' is not a finite number"]),
    (["train", "--center-coef", "inf"], ["'--center-coef'", "'inf' is not a finite number"]),
    (["train", "--margin", "-inf"], ["'--margin'", "'-inf' is not a finite number"]),
    (["train", "--bag-coef", "NaN"], ["'--bag-coef'", "'NaN' is not a finite number"]),
])
def test_seeds_and_floats_are_checked_before_anything_runs(monkeypatch, argv, words):
    """Every seed has one range, every float option refuses NaN and the infinities: usage errors
    (status 2) before the job starts (the job here is a recorder that must not be called)."""
    calls = [record(monkeypatch, target)
             for target in ("train.train_model", "synthetic.make_synthetic_task", "analyze.analyze")]
    result = invoke(*argv)
    assert result.exit_code == 2 and all(word in result.output for word in words), result.output
    assert calls == [[], [], []]


def test_configs_built_in_python_are_checked_as_the_command_line(tmp_path):
    for options, message in [({"center_coef": math.inf}, "--center-coef must be a finite number (got inf)"),
                             ({"lr": math.nan}, "--lr must be a finite number (got nan)"),
                             ({"seed": -1}, "--seed must be in [0, 4294967295] (got -1)"),
                             ({"seed": 2**64}, "--seed must be in [0, 4294967295] (got 18446744073709551616)")]:
        with pytest.raises(MinqrError, match=re.escape(message)):
            TrainConfig(**options)


def test_a_deeply_nested_config_file_is_a_usage_error(tmp_path):
    for name, text in (("c.json", '{"seed": ' + "[" * 100_000 + "]" * 100_000 + "}"),
                       ("c.yaml", "seed: " + "[" * 100_000 + "]" * 100_000 + "\n")):
        config = tmp_path / name
        config.write_text(text)
        result = invoke("train", "--config", config)
        assert result.exit_code == 2 and f"Invalid value for '--config': {config}" in result.output, result.output
        assert "nested" in result.output and "Traceback" not in result.output


# ---- how a command ends (minqr_cli/exits.py) ---------------------------------------------------

@pytest.mark.slow  # a real process started and signalled: about 4 s of CPU
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="watches the process's open files in /proc")
def test_ctrl_c_while_a_command_starts_exits_130(tmp_path):
    """A real SIGINT while train reads its data (before training, whose Ctrl-C test_train covers):
    status 130, the shell's 128 + SIGINT, and one line; not click's "Aborted!" and status 1."""
    inputs = write_run_inputs(tmp_path / "inputs")
    line = Path(inputs["data"]).read_text().splitlines()[0]
    data = tmp_path / "many.jsonl"
    data.write_text((line + "\n") * 200_000)  # seconds of reading
    options = tiny_options(inputs, tmp_path / "run", data=str(data))
    process = subprocess.Popen([sys.executable, str(ROOT / "tools" / "train.py"), *as_argv(options)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_at_default)
    try:
        deadline = time.monotonic() + 120
        while str(data.resolve()) not in _open_files(process.pid):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the data file was not opened within 2 minutes"
            time.sleep(0.005)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, (stdout, stderr)
    assert stderr.strip().splitlines()[-1] == "Stopped: interrupted (Ctrl-C)", stderr
    assert "Aborted!" not in stderr and "Traceback" not in stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _open_files(pid: int) -> set:
    """The paths of the files process `pid` holds open (those that close meanwhile left out)."""
    paths = set()
    try:
        for entry in Path(f"/proc/{pid}/fd").iterdir():
            try:
                paths.add(os.readlink(entry))
            except OSError:  # closed since the listing
                pass
    except OSError:  # the process ended
        pass
    return paths


def test_under_torchrun_process_0_alone_prints_an_error_of_the_options(monkeypatch, tmp_path):
    """Every process of a torchrun job parses the same options: a mistake in them is printed by
    process 0 only, and every process exits with its status (other errors: every process)."""
    config = tmp_path / "c.json"
    config.write_text('{"seed": 3.7}')
    cases = [(["train", "--lr", "nan"], 2, "'nan' is not a finite number"),
             (["train", "--config", config], 2, "seed: '3.7' is not a valid integer"),
             (["train", "--warmup", "5"], 1, "--warmup is a fraction of the steps")]
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        for argv, status, message in cases:
            result = invoke(*argv)
            assert result.exit_code == status, result.output
            assert (message in result.output) == (rank == "0"), (rank, result.output)
    result = invoke("export", "--model", tmp_path, "--out", tmp_path / "x")  # not an error of the options
    assert result.exit_code == 1 and "nothing to export" in result.output
