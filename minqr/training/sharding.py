"""FSDP2 (`--fsdp`): the model sharded over the processes, and its state written and read as shards.

Each process holds 1/world_size of every parameter, gradient and AdamW state (minqr/training/
distributed.py says how the processes share the work). The checkpoint of a sharded run keeps the
model, optimizer and weight average as torch.distributed.checkpoint shards in `checkpoint/shards/`,
one file per process (minqr/training/resume.py keeps the rest), and the saved model is gathered
whole on process 0.

Only runs with --fsdp import this module (minqr/training/loop.py): FSDP and torch.distributed.checkpoint
take about 0.75 s to import, which every other run and command would pay at its start.
"""
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from minqr.errors import MinqrError
from minqr.training.checkpoint_check import read_shard_index
from minqr.training.resume import SHARDS_DIR, START_AFRESH


def shard_model(model, compute_dtype: torch.dtype | None = None) -> None:
    """Shard a RewardModel in place over the process group with FSDP2: one unit per block, then the
    root. The training and evaluation enter the model through `pair_states`, not `forward`, so that
    method is registered to gather the root's parameters (embeddings, final norm, head) as forward
    does. The training's response-bag layer (minqr/training/loss.py), which is called outside the
    model's methods, is a unit of its own, gathered when it is called.

    With `compute_dtype` (bfloat16 for --master-weights) the sharded parameters, their gradients and
    AdamW's state stay in the model's float32 (they are the master weights); each unit gathers its
    parameters cast to compute_dtype for the forward and backward, and the gradients are reduced and
    kept in float32 (FSDP2's MixedPrecisionPolicy)."""
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype \
        else MixedPrecisionPolicy()
    for block in model.transformer.blocks:
        fully_shard(block, mp_policy=policy)
    if getattr(model, "response_bag", None) is not None:
        fully_shard(model.response_bag, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    register_fsdp_forward_method(model, "pair_states")


def reshard(model) -> None:
    """Drop every FSDP2 unit's gathered parameters, so that the next forward gathers the shards
    anew. Needed after writing into the shards between forwards (the weight average swapped in for
    an evaluation, and out again): the root unit keeps what it gathered through a forward that no
    backward follows, and would compute with that."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state_dict(model) -> dict:
    """The model's whole state dict on process 0's CPU (and {} in the others); a collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---- the state as shards -------------------------------------------------------------------------

def save_shards(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, average=None) -> None:
    """The model, optimizer and weight average (if any) of a sharded (FSDP2) run into folder/shards:
    each process writes its own shards (a collective: every process calls it, with the same folder)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    averages = {} if average is None else {"average": average.state_dict()}
    dcp.save({"model": model_state, "optimizer": optimizer_state, **averages}, checkpoint_id=Path(folder) / SHARDS_DIR)


class _ShardReader(dcp.FileSystemReader):
    """torch.distributed.checkpoint's reader, but its index is read without running code (it is a
    pickle: checkpoint_check.read_shard_index)."""

    def read_metadata(self, *args, **kwargs):
        metadata = read_shard_index(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _ShardPlanner(dcp.DefaultLoadPlanner):
    """The default plan, but the values stored as pickles (AdamW's hyper-parameters) are read with
    torch.load(weights_only=True) first, which refuses any that would run code."""

    def load_bytes(self, read_item, value) -> None:
        torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)


def load_shards(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, average=None) -> None:
    """Undo `save_shards` into a model sharded, an optimizer and an average made as when they were
    saved. What cannot be read is a MinqrError that names the shards' folder."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if average is not None:
        state["average"] = average.state_dict()  # its tensors, which dcp.load fills in place
    shards = Path(folder) / SHARDS_DIR
    try:
        dcp.load(state, storage_reader=_ShardReader(shards), planner=_ShardPlanner())
    except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
        detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise MinqrError(f"--resume: the shards in {shards} cannot be read ({detail}); {START_AFRESH}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
