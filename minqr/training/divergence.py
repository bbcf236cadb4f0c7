"""When training diverges: a loss, gradient norm or weight that is NaN or infinite stops the run
with a TrainingDiverged that says what, at which step, which checkpoint stays, and what to change.

The weights are checked too, before anything is saved: a finite loss does not make the step after
it good (a learning rate of inf turns every weight into NaN), and a checkpoint of such weights
would only resume into the same failure.
"""
import math
from pathlib import Path

import torch

from minqr.errors import MinqrError
from minqr.training.distributed import Processes, local


class TrainingDiverged(MinqrError):
    """The loss, the gradient or the weights became NaN or infinite: training stopped, the last
    good checkpoint stays."""


class DivergenceCheck:
    """A run's checks for non-finite numbers. `saved_step` is the step of the checkpoint on disk
    (None before the first), which the run keeps up to date; `sharded` (--fsdp): each process holds
    its shards of the weights only."""

    def __init__(self, out: Path, lr: float, procs: Processes, sharded: bool):
        self.out, self.lr, self.procs, self.sharded = out, lr, procs, sharded
        self.saved_step = None

    def error(self, what: str, step: int) -> TrainingDiverged:
        if self.saved_step is None:
            kept = "No checkpoint was saved before it"
        else:
            kept = f"The last good checkpoint, of step {self.saved_step}, stays in {self.out / 'checkpoint'}"
        return TrainingDiverged(f"training diverged at step {step}: {what}; stopped. {kept}. "
                                f"Lower --lr (now {self.lr:g}) and train again")

    def check_value(self, what: str, value: float, step: int) -> None:
        """A number every process agrees on (the step's loss, the gradient norm) must be finite."""
        if not math.isfinite(value):
            raise self.error(f"{what} is {value}", step)

    def check_weights(self, named: list, step: int) -> None:
        """Every (name, tensor) of `named` must be finite; sharded, on every process (all must call)."""
        bad_here = [float(not torch.isfinite(local(p)).all()) for _, p in named]
        bad_anywhere = self.procs.all_sum(bad_here) if self.sharded else bad_here
        bad = [name for (name, _), count in zip(named, bad_anywhere) if count > 0]
        if bad:
            more = f" and {len(bad) - 1} more tensor{'s' if len(bad) > 2 else ''}" if len(bad) > 1 else ""
            raise self.error(f"the weights are not finite after the optimizer step ({bad[0]}{more})", step)
