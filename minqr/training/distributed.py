"""Processes: one, or several under torchrun.

Under `torchrun` each process takes its slice of every global batch (minqr/data/batching.py,
`process_micro_batches`), the gradients are averaged over the processes, and the step is the one a
single process computes on the whole batch (minqr/training/loss.py says why the arithmetic
is the same). nccl on GPU, gloo on CPU. Only process 0 writes files and prints.

Two ways to spread the model:
- DistributedDataParallel (the default): every process holds the whole model and optimizer state;
  the gradients are all-reduced.
- FSDP2 (`--fsdp`, minqr/training/sharding.py): each process holds 1/world_size of every
  parameter, gradient and AdamW state. A block's parameters are gathered just before its forward
  and its backward and freed after; its gradients are reduce-scattered. One unit per transformer
  block, the rest (embeddings, final norm, head) in the root unit. That makes every forward a
  collective: all processes must run the same number of them (the evaluation runs every held-out
  batch on every process for that reason), and the checkpoint is written in shards
  (torch.distributed.checkpoint).
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from minqr.device import resolve_device


# How long the processes wait for process 0 to make a file or write a save (wait_for_all): a download
# or a big model's checkpoint can outlast the process group's timeout (10 min with NCCL), and if
# process 0 dies instead, torchrun ends the others' wait by stopping them.
WAIT_TIMEOUT = timedelta(days=1)


@dataclass
class Processes:
    rank: int
    world_size: int
    device: torch.device
    waits: object = None  # a gloo group with WAIT_TIMEOUT, for wait_for_all (None for one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait_for_all(self) -> None:
        """Return once every process has reached this call, however long that takes (WAIT_TIMEOUT)."""
        if self.world_size > 1:
            dist.barrier(group=self.waits)

    @contextmanager
    def main_first(self):
        """Run the block in process 0 first and in the others after it: a download or a file that
        process 0 makes, the others then find in place (and it is announced once)."""
        if not self.is_main:
            self.wait_for_all()
        yield
        if self.is_main:
            self.wait_for_all()

    def broadcast(self, value):
        """Process 0's `value` (any picklable object), in every process."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum each value over the processes (float64, so that counts stay exact)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def all_sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the processes (a new tensor where it was; the tensor itself in one process)."""
        if self.world_size == 1:
            return tensor
        summed = tensor.to(self.device, copy=True)
        dist.all_reduce(summed)
        return summed.to(tensor.device)


def start_processes(device_option: str) -> Processes:
    """Join the process group when launched by torchrun (it sets WORLD_SIZE, RANK, LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_option, int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return Processes(0, 1, device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), world_size, device, dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT))


def stop_processes(procs: Processes, finished: bool = False) -> None:
    if procs.world_size > 1 and dist.is_initialized():
        if finished:
            # Process 0 still saves the model and draws the curves when the others are done. One
            # that tore its gloo connections down then and exited could abort ("terminate called
            # without an active exception"): leave together. Not after an error, where the others
            # may never arrive.
            procs.wait_for_all()
        dist.destroy_process_group()


# ---- tensors that may be sharded -------------------------------------------------------------------
# A DTensor (an FSDP2 parameter or its gradient) is recognised by its methods, not its class: importing
# torch.distributed.tensor would cost most of the 0.75 s that --fsdp runs pay (minqr/training/sharding.py)
# at every start, and only they make one.

def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly sharded) tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly sharded) tensor, in every process (a collective for a DTensor)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
