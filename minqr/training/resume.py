"""Training checkpoints: everything a run needs to continue bit for bit after an interruption.

A run folder `OUT/` keeps its latest checkpoint in `OUT/checkpoint/`:

    state.pt      model, optimizer and scheduler state dicts, the weight average (--ema-window,
                  if the run keeps one), the step, the data position
                  (epoch, and index of the next batch in that epoch's seeded order), the random
                  number generators of every process (torch, CUDA, numpy, python) and how the
                  numbers were computed (device type, compute dtype, compile), and the training
                  pairs: a digest of them as tokenised, and the moment the run began, which its chat
                  template's strftime_now reads for the run's whole life. Read back with
                  `torch.load(weights_only=True)`, so it holds tensors and plain values only.
    config.json   the options of the run, which `--resume` compares with the new ones.
    shards/       with --fsdp only: the model, optimizer and average state, one file per process, written
                  and read by torch.distributed.checkpoint (state.pt then holds the rest). Resume
                  with the same number of processes for a bit-identical continuation.

Continuing from it gives the weights an uninterrupted run gives: the same batches come next (the
order of an epoch is a function of the seed and the epoch, over the same pairs, rendered as on the
day the run began), dropout draws the same masks (the generators are restored), and AdamW and the
learning-rate schedule pick up their exact state.

The folder is written with `minqr.atomic.atomic_dir`: a process killed while writing leaves the
previous checkpoint whole. In the one instant between the two renames of a replacement the old
checkpoint sits at `OUT/checkpoint.old-*/checkpoint`; `find_checkpoint` looks there too.
"""
import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from minqr.atomic import abandoned, atomic_dir
from minqr.errors import MinqrError
from minqr.models.hf_folder import read_json, read_torch_file
from minqr.models.reward import model_files_in, model_folder_kind
from minqr.training.checkpoint_check import layout_problems, run_problems, shard_problems
from minqr.training.metrics import METRICS_FILE

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
SHARDS_DIR = "shards"
START_AFRESH = "the checkpoint is damaged: start the run afresh with --overwrite instead of --resume"


@dataclass
class DataPosition:
    """Where the data stream stands: the next batch to train on is batch `batch` of epoch `epoch`."""

    epoch: int = 0
    batch: int = 0


@dataclass
class Checkpoint:
    """A checkpoint as read back: `folder` it came from, and its contents."""

    folder: Path
    step: int
    position: DataPosition
    model: dict | None  # None for a sharded (--fsdp) checkpoint: minqr/training/sharding.py
    optimizer: dict | None
    scheduler: dict
    rng_states: list  # one per process, indexed by rank
    config: dict
    compute: dict  # {"device": device type, "dtype": compute dtype, "compile": bool} of the run
    # the training pairs: {"sha256": their data_digest, "rendered_at": the ISO time their chat
    # template's strftime_now read (the run's start, pinned for its whole life)}
    data: dict
    average: dict | None = None  # the weight average (--ema-window), None without one or sharded


def capture_rng_state() -> dict:
    """This process's random number generators, as tensors and plain values (weights_only-safe)."""
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    python_version, python_internal, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            "bit_generator": bit_generator,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": python_version, "internal": list(python_internal), "gauss": python_gauss},
    }


def restore_rng_state(state: dict) -> None:
    """Undo `capture_rng_state`: the generators continue exactly where they were captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def data_digest(pairs) -> str:
    """sha256 of the training pairs as tokenised (TokenizedPairs): what a resumed run must train on.
    The data file's name is an option, but the file may change between the runs, or its texts render
    otherwise (a chat template that writes today's date), and the same number of pairs would continue
    the data position over other pairs without a word."""
    digest = hashlib.sha256()
    for name in ("chosen", "rejected", "chosen_response", "rejected_response", "pair_margins", "annotators"):
        column = getattr(pairs, name)
        digest.update(f"{name}:{'none' if column is None else len(column)};".encode())
        for value in column or ():
            digest.update(np.asarray(value, dtype=np.float64 if name == "pair_margins" else np.int64).tobytes() + b";")
    digest.update(repr(pairs.annotator_ids).encode())
    return digest.hexdigest()


def save_checkpoint(out, *, step: int, position: DataPosition, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, rng_states: list, config: dict,
                    compute: dict, data: dict, average: dict | None = None, write_shards=None) -> Path:
    """Write `out/checkpoint/` atomically, replacing the previous one only once complete. With
    `write_shards` (--fsdp), the model and optimizer are not in state.pt: `write_shards(folder)`
    writes them into the new checkpoint's folder, with every process taking part
    (minqr/training/sharding.py's save_shards)."""
    folder = Path(out) / CHECKPOINT_DIR
    state = {
        "step": step,
        "position": asdict(position),
        "model": None if write_shards else model.state_dict(),
        "optimizer": None if write_shards else optimizer.state_dict(),
        "average": None if write_shards else average,
        "scheduler": scheduler.state_dict(),
        "rng_states": rng_states,
        "compute": compute,
        "data": data,
    }
    # the run's own checkpoint, replaced at every save (one an older minqr wrote too: train's checks
    # found it to be the run's)
    with atomic_dir(folder, overwrite=True, kind="a checkpoint", older=True) as tmp:
        if write_shards:
            write_shards(tmp)
        torch.save(state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    for stale in abandoned(folder, "old"):  # left by an earlier interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    return folder


def find_checkpoint(out) -> Path | None:
    """The checkpoint folder of run `out`, or None when it has none (see the module docstring)."""
    out = Path(out)
    if (out / CHECKPOINT_DIR / STATE_FILE).is_file():
        return out / CHECKPOINT_DIR
    # a kill between atomic_dir's two renames: the previous checkpoint, moved aside but whole
    moved_aside = sorted(out.glob(f"{CHECKPOINT_DIR}.old-*/{CHECKPOINT_DIR}/{STATE_FILE}"))
    return moved_aside[-1].parent if moved_aside else None


def remove_checkpoints(out) -> None:
    """Delete run `out`'s checkpoint, and any copy moved aside, before a run starts afresh there."""
    out = Path(out)
    for folder in [out / CHECKPOINT_DIR, *out.glob(f"{CHECKPOINT_DIR}.old-*")]:
        shutil.rmtree(folder, ignore_errors=True)


def checkpoint_to_resume(out, options: dict, *, resume: bool, overwrite: bool) -> Checkpoint | None:
    """The checkpoint a run in folder `out` with `options` (TrainConfig's, as a dict) continues from,
    or None for a new run; a run is never clobbered by mistake. Each refusal says what the folder
    holds and the one option that gets out."""
    out = Path(out)
    kind, checkpoint = model_folder_kind(out), find_checkpoint(out)
    if checkpoint is not None or (out / METRICS_FILE).exists():
        kind = "run"  # whatever else is there: a run's log or checkpoint (a run stopped before it saved a model)
    if kind == "file":
        raise MinqrError(f"--out {out} is a file, not a folder: a run is a folder; choose another --out")
    if kind == "other":  # not even --overwrite: the files are the user's
        raise MinqrError(f"--out {out} holds model files that are not a minqr run's ({', '.join(model_files_in(out))}): "
                         "training would write its model over them; choose another folder")
    if resume:
        if kind == "new":
            raise MinqrError(f"--resume: {out} holds no run to continue: drop --resume to start one")
        if checkpoint is None:
            raise MinqrError(f"--resume: {out} holds no checkpoint to continue from (a run saves one every "
                             "--save-every steps, and this one was stopped before its first): start it afresh "
                             "with --overwrite instead of --resume")
        checkpoint = load_checkpoint(out)
        check_same_options(checkpoint.config, options)
        return checkpoint
    if overwrite:
        return None
    if checkpoint is not None:
        raise MinqrError(f"--out {out} already holds a run with a checkpoint: add --resume to continue "
                         "it, --overwrite to start afresh, or choose another --out")
    if (out / METRICS_FILE).exists():
        raise MinqrError(f"--out {out} already holds a run that saved no checkpoint (nothing to resume): "
                         "add --overwrite to start afresh, or choose another --out")
    if kind != "new":
        raise MinqrError(f"--out {out} already holds {'an export' if kind == 'export' else 'a run'} of minqr's: add "
                         "--overwrite to replace it, or choose another --out")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held:  # a run replaces its checkpoints, logs, curves and annotators: not files of the user's unasked
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise MinqrError(f"--out {out} is not empty ({shown}) and holds no run of minqr's: a run writes its model, "
                         "checkpoints and logs there, replacing files of the same names; choose another --out, or "
                         "add --overwrite to train into it")
    return None


def load_checkpoint(out) -> Checkpoint:
    """The checkpoint of run `out`, its state.pt's fields checked on their own (checkpoint_check.py);
    `check_resumable` checks them against the run that resumes."""
    folder = find_checkpoint(out)
    if folder is None:
        raise MinqrError(
            f"--resume: no checkpoint in {Path(out) / CHECKPOINT_DIR}: the run in {out} saved none yet "
            "(checkpoints are written every --save-every steps); run the command without --resume"
        )
    state_file = folder / STATE_FILE
    try:
        state = read_torch_file(state_file, fix=START_AFRESH, foreign_fix=START_AFRESH)
        config = read_json(folder / CONFIG_FILE, fix=START_AFRESH)
    except MinqrError as e:
        raise MinqrError(f"--resume: {e}") from None
    if isinstance(state, dict) and "data" not in state and "compute" in state:
        raise MinqrError(f"--resume: {state_file} was written by a minqr that did not yet record the digest of the "
                         "training pairs, which --resume now checks: this minqr cannot continue that run; finish it "
                         "with the minqr that began it, or start it afresh with --overwrite")
    _refuse(state_file, layout_problems(state))
    return Checkpoint(
        folder=folder, step=state["step"], position=DataPosition(**state["position"]),
        model=state.get("model"), optimizer=state.get("optimizer"), scheduler=state["scheduler"],
        rng_states=state["rng_states"], config=config, compute=state["compute"], data=state["data"],
        average=state["average"],
    )


def check_resumable(checkpoint: Checkpoint, data: str, **run) -> None:
    """Refuse a checkpoint that the run about to resume cannot continue from: `data` is the run's
    data_digest, `run` holds its model, optimizer, average, steps_per_epoch, total_steps and whether
    it is sharded (checkpoint_check.run_problems)."""
    if checkpoint.data["sha256"] != data:
        raise MinqrError(f"--resume: the training pairs differ from those the run in {checkpoint.folder.parent} "
                         "began with: the data file has changed since, or its texts render otherwise now (a chat "
                         "template that writes today's date); give the data the run began with, or start it afresh "
                         "with --overwrite instead of --resume")
    _refuse(checkpoint.folder / STATE_FILE, run_problems(checkpoint, **run))
    if checkpoint.model is None:
        _refuse(checkpoint.folder / SHARDS_DIR, shard_problems(checkpoint.folder / SHARDS_DIR))


def _refuse(path: Path, problems: list[str]) -> None:
    if problems:
        raise MinqrError(f"--resume: {path} is not a checkpoint this run can continue from: {'; '.join(problems)}; "
                         f"{START_AFRESH}")


# What --resume may change: where and how fast the run computes, and how often it reports (--out
# names the run, however it is spelt). Everything else decides the weights: a change is an error.
# A change of device type, compute dtype or compile is allowed (a run must be able to move) but
# changes the float rounding, and a GPU draws other dropout masks: TrainingRun._restore warns of it.
RESUME_MAY_CHANGE = ("out", "resume", "overwrite", "eval_every", "save_every", "device", "compile", "report_to",
                     "grad_checkpoint")


def check_same_options(saved: dict, given: dict) -> None:
    """--resume: the options that decide the weights must be those the run started with. A run
    whose checkpoint lacks an option was made by a minqr without it, and is not resumed."""
    newer = [f"--{name.replace('_', '-')}" for name in sorted(set(given) - set(saved)) if name not in RESUME_MAY_CHANGE]
    if newer:
        raise MinqrError(f"--resume: the run being resumed was made by a minqr without {', '.join(newer)} (its "
                         "checkpoint has no value for them): start it afresh with --overwrite instead of --resume")

    def change(name: str) -> str:
        return f"--{name.replace('_', '-')} {given.get(name)!r} (the run has {saved.get(name)!r})"

    changed = [change(name) for name in sorted(set(saved) | set(given))
               if name not in RESUME_MAY_CHANGE and saved.get(name) != given.get(name)]
    if changed:
        raise MinqrError("--resume: options differ from the run being resumed: " + ", ".join(changed)
                         + ". Give the options of the first run, with --resume added")
