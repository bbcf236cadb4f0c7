"""When training diverges: a loss, gradient norm or weight that is NaN or infinite stops the run
with a TrainingDiverged that says what, at which step, which checkpoint stays, and what to change
(an absurd loss weight or data margin where there is one, else the learning rate).

The weights are checked too, before anything is saved: a finite loss does not make the step after
it good (a learning rate of inf turns every weight into NaN), and a checkpoint of such weights
would only resume into the same failure.
"""
import math
from pathlib import Path

import torch

from minqr.errors import MinqrError
from minqr.training.config import TrainConfig
from minqr.training.distributed import Processes, local

# A loss weight or pair margin beyond this is what a divergence is blamed on rather than --lr: rewards
# are of order 1, and AdamW's steps do not grow with a weight, so only absurd ones overflow float32.
HUGE_WEIGHT = 1e6


class TrainingDiverged(MinqrError):
    """The loss, the gradient or the weights became NaN or infinite: training stopped, the last
    good checkpoint stays."""


class DivergenceCheck:
    """A run's checks for non-finite numbers. `saved_step` is the step of the checkpoint on disk
    (None before the first), which the run keeps up to date; `pair_margins` the training data's;
    with --fsdp each process holds its shards of the weights only."""

    def __init__(self, out: Path, config: TrainConfig, pair_margins, procs: Processes):
        self.out, self.config, self.procs = out, config, procs
        self.pair_margins = pair_margins or [0.0]
        self.saved_step = None

    def error(self, what: str, step: int) -> TrainingDiverged:
        if self.saved_step is None:
            kept = "No checkpoint was saved before it"
        else:
            kept = f"The last good checkpoint, of step {self.saved_step}, stays in {self.out / 'checkpoint'}"
        return TrainingDiverged(f"training diverged at step {step}: {what}; stopped. {kept}. {self.likely_cause()}")

    def likely_cause(self) -> str:
        """What to change: a loss weight or a data margin far beyond any useful one, else the learning rate."""
        config = self.config
        huge = [f"--{name.replace('_', '-')} {getattr(config, name):g}"
                for name in ("bag_coef", "center_coef", "lm_coef") if getattr(config, name) > HUGE_WEIGHT]
        largest = max(self.pair_margins, key=abs)
        if abs(largest) > HUGE_WEIGHT:
            huge.append(f"the data's pair margins (up to {largest:g}; rewards are of order 1)")
        if huge:
            them = "them" if len(huge) > 1 else "it"
            return f"The likely cause: {' and '.join(huge)}, far too large: lower {them} and train again"
        return f"Lower --lr (now {config.lr:g}) and train again"

    def check_value(self, what: str, value: float, step: int) -> None:
        """A number every process agrees on (the step's loss, the gradient norm) must be finite."""
        if not math.isfinite(value):
            raise self.error(f"{what} is {value}", step)

    def check_weights(self, named: list, step: int) -> None:
        """Every (name, tensor) of `named` must be finite; sharded, on every process (all must call)."""
        bad_here = [float(not torch.isfinite(local(p)).all()) for _, p in named]
        bad_anywhere = self.procs.all_sum(bad_here) if self.config.fsdp else bad_here
        bad = [name for (name, _), count in zip(named, bad_anywhere) if count > 0]
        if bad:
            more = f" and {len(bad) - 1} more tensor{'s' if len(bad) > 2 else ''}" if len(bad) > 1 else ""
            raise self.error(f"the weights are not finite after the optimizer step ({bad[0]}{more})", step)
