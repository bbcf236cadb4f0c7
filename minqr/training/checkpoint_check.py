"""What `--resume` reads back is untrusted input: a checkpoint may be cut short, edited, or made by
another run. Everything in it is checked before any of it is used, and each problem is named by
its key (`position.batch`, `model.h.0.attn.c_attn.weight`, `rng_states[0].numpy.keys`), so that a
damaged checkpoint is one message instead of a traceback, a hang or a run that silently trains
nothing:

- `layout_problems(state)`: the fields of state.pt and their types and ranges, on their own
  (`step` a whole number >= 0, `position` two of them, the random generators' states of the sizes
  torch, numpy and Python use, ...);
- `run_problems(...)`: against the run that resumes: the step and data position fit its schedule
  (a data position past the end of an epoch would loop for ever), and every tensor of the model,
  the weight average and AdamW's state has the shape and dtype of the parameter it belongs to;
- `shard_problems(folder)`: with --fsdp, every shard file that the shards' index (`.metadata`)
  names is there and holds the bytes the index says it does.

The shards' index is a pickle (torch.distributed.checkpoint writes it so) and a pickle can run
code: `read_shard_index` reads it with an unpickler that builds only the index's own classes.
"""
import io
import math
import pickle
import random
import re
from datetime import datetime
from pathlib import Path

import torch

# the Mersenne Twister of numpy (624 words and a position) and of Python's random (625 words)
MT_WORDS = 624


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shape(value) -> str:
    """A tensor's dtype and shape, or the type of anything else, for messages."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
    return f"a {type(value).__name__}"


def layout_problems(state) -> list[str]:
    """What is wrong with state.pt's fields on their own (empty: nothing)."""
    if not isinstance(state, dict):
        return [f"it holds a {type(state).__name__}, not the dict of a checkpoint"]
    missing = [key for key in ("step", "position", "model", "optimizer", "average", "scheduler", "rng_states",
                               "compute", "data") if key not in state]
    if missing:
        return [f"it has no {', '.join(missing)}"]
    problems = []
    if not _whole(state["step"]):
        problems.append(f"step is {state['step']!r}, not a whole number >= 0")
    position = state["position"]
    if not (isinstance(position, dict) and set(position) == {"epoch", "batch"}):
        problems.append(f"position is {position!r}, not {{'epoch': ..., 'batch': ...}}")
    else:
        problems += [f"position.{key} is {value!r}, not a whole number >= 0" for key, value in position.items()
                     if not _whole(value)]
    for key in ("model", "optimizer", "average", "scheduler"):
        value = state.get(key)
        if not (isinstance(value, dict) or (value is None and key != "scheduler")):
            problems.append(f"{key} is a {type(value).__name__}, not a dict")
    if (state.get("model") is None) != (state.get("optimizer") is None):
        problems.append("it holds a model without an optimizer state, or the other way round")
    compute = state["compute"]
    kinds = {"device": str, "dtype": str, "compile": bool}
    if not (isinstance(compute, dict) and all(isinstance(compute.get(k), kind) for k, kind in kinds.items())):
        problems.append(f"compute is {compute!r}, not {{'device': str, 'dtype': str, 'compile': bool}}")
    data = state["data"]
    if not (isinstance(data, dict) and set(data) == {"sha256", "rendered_at"} and isinstance(data["sha256"], str)
            and re.fullmatch(r"[0-9a-f]{64}", data["sha256"]) and _iso_time(data["rendered_at"])):
        problems.append(f"data is {data!r:.120}, not {{'sha256': the training pairs' digest, 'rendered_at': an ISO "
                        "time}")
    rng_states = state["rng_states"]
    if not (isinstance(rng_states, list) and rng_states):
        problems.append(f"rng_states is {_shape(rng_states)}, not a list with one state per process")
    else:
        for rank, rng in enumerate(rng_states):
            problems += [f"rng_states[{rank}].{p}" for p in _rng_problems(rng)]
    return problems


def _iso_time(value) -> bool:
    try:
        return isinstance(value, str) and datetime.fromisoformat(value) is not None
    except ValueError:
        return False


def _rng_problems(rng) -> list[str]:
    """What is wrong with one process's generators, as resume.capture_rng_state saved them."""
    if not (isinstance(rng, dict) and {"torch", "cuda", "numpy", "python"} <= set(rng)):
        return ["is not a dict with torch, cuda, numpy and python"]
    problems = []
    expected = torch.get_rng_state()
    if not (isinstance(rng["torch"], torch.Tensor) and rng["torch"].dtype == expected.dtype
            and rng["torch"].shape == expected.shape):
        problems.append(f"torch is {_shape(rng['torch'])}, expected {_shape(expected)}")
    if not (isinstance(rng["cuda"], list) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                                                  for t in rng["cuda"])):
        problems.append("cuda is not a list of uint8 tensors")
    n = rng["numpy"]
    if not (isinstance(n, dict) and n.get("bit_generator") == "MT19937" and isinstance(n.get("keys"), torch.Tensor)
            and list(n["keys"].shape) == [MT_WORDS] and ((n["keys"] >= 0) & (n["keys"] < 2**32)).all()
            and _whole(n.get("position")) and n["position"] <= MT_WORDS and n.get("has_gauss") in (0, 1)
            and isinstance(n.get("cached_gaussian"), float)):
        problems.append("numpy is not the state of numpy's MT19937 generator")
    p = rng["python"]
    if not (isinstance(p, dict) and isinstance(p.get("version"), int) and isinstance(p.get("internal"), list)
            and len(p["internal"]) == MT_WORDS + 1 and all(_whole(w) and w < 2**32 for w in p["internal"])
            and (p.get("gauss") is None or isinstance(p.get("gauss"), float))):
        problems.append("python is not the state of Python's random generator")
    else:
        try:  # the one check left is the generator's own (e.g. its version)
            saved = random.getstate()
            random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
            random.setstate(saved)
        except (TypeError, ValueError) as error:
            problems.append(f"python is refused by random.setstate ({error})")
    return problems


def run_problems(checkpoint, *, model, optimizer, average, steps_per_epoch: int, total_steps: int,
                 sharded: bool) -> list[str]:
    """What keeps the resuming run from continuing from `checkpoint` (a resume.Checkpoint, whose
    state.pt had no layout problems; the model, optimizer and average are not in it when sharded:
    see shard_problems). `sharded`: whether the resuming run is (--fsdp)."""
    step, (epoch, batch) = checkpoint.step, (checkpoint.position.epoch, checkpoint.position.batch)
    problems = []
    if (checkpoint.model is None) != sharded:  # config.json agreed (--fsdp cannot change): state.pt does not
        problems.append("model and optimizer are None, as a --fsdp run's (in shards/), and this run is not --fsdp"
                        if checkpoint.model is None else
                        "model and optimizer are in it, as a run's without --fsdp, and this run is --fsdp")
    if step > total_steps:
        problems.append(f"step {step} is past the run's last step, {total_steps}")
    now = "of the data as it is now"  # a data file changed since the run began gives another count
    if batch >= steps_per_epoch:
        problems.append(f"position.batch {batch} is past the end of an epoch, which has {steps_per_epoch} batches "
                        f"{now}")
    elif epoch * steps_per_epoch + batch != step:
        problems.append(f"position (epoch {epoch}, batch {batch}) is not where step {step} leaves the data "
                        f"({steps_per_epoch} batches an epoch {now})")
    last_epoch = checkpoint.scheduler.get("last_epoch")
    if last_epoch != step or isinstance(last_epoch, bool):
        problems.append(f"scheduler.last_epoch is {last_epoch!r}, not the step {step}")
    problems += _scheduler_problems(checkpoint.scheduler, len(optimizer.param_groups))
    if checkpoint.model is not None and not sharded:
        problems += _tensor_problems(checkpoint.model, model.state_dict(), "model")
        problems += _optimizer_problems(checkpoint.optimizer, optimizer)
        if average is not None:
            problems += (["average is missing, and the run keeps a weight average (--ema-window)"]
                         if checkpoint.average is None else
                         _tensor_problems(checkpoint.average, average.state_dict(), "average"))
    return problems


def _tensor_problems(found: dict, expected: dict, where: str) -> list[str]:
    """Names missing, unexpected, ill-shaped and non-finite tensors of `found` against `expected`
    (name -> tensor). Training never saves a NaN or inf weight (divergence.py stops first), so one
    here is damage, not a run that diverged."""
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    fits = {name: isinstance(found[name], torch.Tensor) and found[name].shape == t.shape and found[name].dtype == t.dtype
            for name, t in expected.items() if name in found}
    wrong = [f"{where}.{name} is {_shape(found[name])}, expected {_shape(expected[name])}"
             for name, fit in fits.items() if not fit]
    not_finite = [name for name, fit in fits.items()
                  if fit and found[name].is_floating_point() and not bool(torch.isfinite(found[name]).all())]
    return ([f"{where} is missing {', '.join(missing)}"] if missing else []) \
        + ([f"{where} has unexpected {', '.join(unexpected)}"] if unexpected else []) + wrong \
        + ([f"{where} holds NaN or inf in {', '.join(not_finite)}"] if not_finite else [])


def _scheduler_problems(scheduler: dict, num_groups: int) -> list[str]:
    """The learning-rate schedule's state (torch's LambdaLR): a learning rate per parameter group,
    finite, and the lambdas' slots (None: minqr's schedule is a function, rebuilt by the run)."""
    problems = []
    for key in ("base_lrs", "_last_lr"):
        rates = scheduler.get(key)
        if not (isinstance(rates, list) and len(rates) == num_groups and all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in rates)):
            problems.append(f"scheduler.{key} is {rates!r}, not {num_groups} finite learning rates")
    lambdas = scheduler.get("lr_lambdas")
    if not (isinstance(lambdas, list) and len(lambdas) == num_groups and all(x is None for x in lambdas)):
        problems.append(f"scheduler.lr_lambdas is {lambdas!r:.80}, not {num_groups} × None (minqr's schedule is a "
                        "function, rebuilt by the run)")
    # LambdaLR.load_state_dict sets every key as an attribute: one named like a method would replace it
    shadowing = sorted(key for key in scheduler if key == "optimizer" or callable(
        getattr(torch.optim.lr_scheduler.LambdaLR, key, None)))
    if shadowing:
        problems.append(f"scheduler has {', '.join(shadowing)}, which no schedule's state holds")
    return problems


def _like(value, mine) -> bool:
    """Is a saved hyper-parameter of the kind of the run's own: a finite number for a number, a
    bool or None for a flag (torch saves some flags as None), numbers alike for a tuple (betas)."""
    if isinstance(mine, bool) or mine is None:
        return value is None or isinstance(value, bool)
    if isinstance(mine, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(mine, (tuple, list)):
        return isinstance(value, (tuple, list)) and len(value) == len(mine) and all(map(_like, value, mine))
    return type(value) is type(mine)


MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's, each of its parameter's shape


def _optimizer_problems(saved: dict, optimizer) -> list[str]:
    """AdamW's saved state against the optimizer made for this run: its groups hold as many
    parameters, every number is a finite number, and every moment has its parameter's shape."""
    groups, state = saved.get("param_groups"), saved.get("state")
    if not (isinstance(groups, list) and isinstance(state, dict)):
        return ["optimizer is not the state of an optimizer (param_groups and state)"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    problems = []
    # the ids of the parameters, in order, group after group (torch's state_dict numbers them so)
    starts = [sum(len(g["params"]) for g in optimizer.param_groups[:i]) for i in range(len(optimizer.param_groups))]
    if len(groups) != len(optimizer.param_groups) or not all(
            isinstance(g, dict) and g.get("params") == list(range(start, start + len(mine["params"])))
            for g, mine, start in zip(groups, optimizer.param_groups, starts)):
        problems.append(f"optimizer.param_groups do not hold the run's {len(params)} parameters in "
                        f"{len(optimizer.param_groups)} groups")
    for index, (group, mine) in enumerate(zip(groups, optimizer.param_groups) if not problems else []):
        problems += [f"optimizer.param_groups[{index}].{key} is {value!r}" for key, value in group.items()
                     if key in mine and key != "params" and not _like(value, mine[key])]
    for index, moments in state.items():
        if not (isinstance(index, int) and 0 <= index < len(params) and isinstance(moments, dict)):
            problems.append(f"optimizer.state has an entry {index!r} for no parameter")
            continue
        absent = [key for key in MOMENTS if key not in moments]
        if absent:
            problems.append(f"optimizer.state[{index}] has no {', '.join(absent)}")
        for key, value in moments.items():
            where = f"optimizer.state[{index}].{key}"
            if not isinstance(value, (torch.Tensor, int, float)):
                problems.append(f"{where} is a {type(value).__name__}")
            elif key in MOMENTS and not (isinstance(value, torch.Tensor) and value.shape == params[index].shape):
                problems.append(f"{where} is {_shape(value)}, its parameter {list(params[index].shape)}")
            elif not torch.as_tensor(value).float().isfinite().all():
                problems.append(f"{where} is not finite")
    if hasattr(optimizer, "masters"):  # --master-weights: the float32 copies, one a parameter
        masters = saved.get("masters")
        if not (isinstance(masters, list) and len(masters) == len(params)):
            problems.append(f"optimizer.masters is {_shape(masters)}, not the {len(params)} float32 masters of "
                            "--master-weights")
        else:
            for index, (master, param) in enumerate(zip(masters, params)):
                if not (isinstance(master, torch.Tensor) and master.shape == param.shape
                        and master.dtype == torch.float32):
                    problems.append(f"optimizer.masters[{index}] is {_shape(master)}, expected {_shape(param)}")
                elif not bool(torch.isfinite(master).all()):
                    problems.append(f"optimizer.masters[{index}] is not finite")
    return problems


# ---- the shards of --fsdp ------------------------------------------------------------------------

INDEX_FILE = ".metadata"  # torch.distributed.checkpoint's index of the shards


class _IndexUnpickler(pickle.Unpickler):
    """Builds the classes of a shards index (those that torch.distributed.checkpoint defines for it)
    and the torch and Python values they hold; nothing else."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module in self.MODULES:  # only a class defined there, not whatever that module imports
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is no part of a shards index")


def read_shard_index(folder: Path):
    """The Metadata of the shards in `folder`, read without running code. Raises OSError or
    pickle.UnpicklingError (and whatever else a damaged pickle raises)."""
    return _IndexUnpickler(io.BytesIO((Path(folder) / INDEX_FILE).read_bytes())).load()


def shard_problems(folder: Path) -> list[str]:
    """What is wrong with the shard files in `folder` against their index."""
    folder = Path(folder)
    try:
        index = read_shard_index(folder)
        stored = {(info.relative_path, info.offset, info.length) for info in index.storage_data.values()}
    except FileNotFoundError:
        return [f"{folder / INDEX_FILE} is missing"]
    except Exception as error:  # a damaged pickle can raise nearly anything: all of it means damaged
        return [f"{folder / INDEX_FILE} cannot be read ({type(error).__name__}: {error})"]
    problems = []
    for name in sorted({path for path, _, _ in stored}):
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        needed = max(offset + length for p, offset, length in stored if p == name)
        if path.stat().st_size < needed:
            problems.append(f"{path} is cut short ({path.stat().st_size:,} bytes of the {needed:,} its index says)")
    return problems
