"""Processes: one, or several under torchrun.

Under `torchrun` each process takes its slice of every global batch (minqr/data/batching.py,
`process_micro_batches`), DistributedDataParallel averages the gradients, and the step is the one a
single process computes on the whole batch (minqr/training/objective.py says why the arithmetic
is the same). nccl on GPU, gloo on CPU. Only process 0 writes files and prints.
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minqr.device import resolve_device


@dataclass
class Processes:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextmanager
    def main_first(self):
        """Run the block in process 0 first and in the others after it: a download or a file that
        process 0 makes, the others then find in place (and it is announced once)."""
        if not self.is_main:
            dist.barrier()
        yield
        if self.is_main and self.world_size > 1:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum each value over the processes (float64, so that counts stay exact)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def start_processes(device_option: str) -> Processes:
    """Join the process group when launched by torchrun (it sets WORLD_SIZE, RANK, LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_option, int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return Processes(0, 1, device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), world_size, device)


def stop_processes(procs: Processes, finished: bool = False) -> None:
    if procs.world_size > 1 and dist.is_initialized():
        if finished:
            # Process 0 still saves the model and draws the curves when the others are done. One
            # that tore its gloo connections down then and exited could abort ("terminate called
            # without an active exception"): leave together. Not after an error, where the others
            # may never arrive.
            dist.barrier()
        dist.destroy_process_group()
