"""An exponential moving average of the weights (`--ema-window`), the model that is evaluated and saved.

Why: a mixture head's N kinds are each learnt from about 1/N of the labels, along directions the
labels barely constrain (docs/objectives.md#spread-or-scale: a wider spread within a group and a larger reward
scale label pairs almost alike). The last iterate of stochastic training sits somewhere in that
flat valley, moved by the last batches; the average of the iterates sits nearer its middle.
Measured on the synthetic task (mixture, 3,000 steps, a window of 1/3): the coverage error fell on
all six runs (docs/objectives.md#what-it-took).

The average starts as a copy of the weights and follows them from the end of the warm-up on:
    average <- decay · average + (1 − decay) · weights        after every optimizer step,
with decay = 1 − 1/(window · total steps): its time constant is that share of the run (1,000
steps of 3,000 at the default 1/3, decay 0.999), so a short run averages over few steps and a
long one over many. It is kept in float32 whatever the weights' precision (a bf16 average would
round away the (1 − decay) part).
Evaluation swaps it into the model (`swapped_in`), and the saved model is the average. Under
--fsdp the weights are sharded DTensors and so are their averages: each process averages its own
shards, and the checkpoint writes them as shards too.
"""
from contextlib import contextmanager

import torch


class WeightAverage:
    """The exponential moving average of `model`'s trainable parameters (module docstring)."""

    def __init__(self, model: torch.nn.Module, decay: float, start_step: int, sources: dict | None = None):
        """`sources` (optional) maps a weight to the tensor to average in its place: the float32
        master of a bf16 weight (--master-weights), finer than the weight's rounding."""
        if not 0 <= decay < 1:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.decay, self.start_step = decay, start_step
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.weights = [p for _, p in named]
        self.sources = [sources[p] if sources else p for p in self.weights]
        self.averages = [s.detach().to(torch.float32, copy=True) for s in self.sources]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After the optimizer step that ends step `step` (counted from 1): a copy during the
        warm-up, the moving average after it."""
        decay = self.decay if step > self.start_step else 0.0
        for average, source in zip(self.averages, self.sources):
            average.lerp_(source.detach().float(), 1 - decay)  # average + (1 - decay) (source - average)

    @contextmanager
    def swapped_in(self):
        """The model holds the averages inside the block (rounded to its precision), its own weights
        again after it."""
        saved = [weight.detach().clone() for weight in self.weights]
        self.copy_into_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for weight, own in zip(self.weights, saved):
                    weight.copy_(own)

    @torch.no_grad()
    def copy_into_model(self) -> None:
        for weight, average in zip(self.weights, self.averages):
            weight.copy_(average)

    def named_averages(self) -> list[tuple[str, torch.Tensor]]:
        return [(f"the average of {name}", average) for name, average in zip(self.names, self.averages)]

    def state_dict(self) -> dict:
        """The averages by parameter name (sharded DTensors under --fsdp, which
        torch.distributed.checkpoint writes as shards)."""
        return dict(zip(self.names, self.averages))

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for name, average in zip(self.names, self.averages):
            average.copy_(state[name])
