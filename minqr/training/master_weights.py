"""AdamW on float32 master copies of bfloat16 weights (`--param-dtype bfloat16 --master-weights`).

bfloat16 keeps 8 significant bits: the representable numbers near a weight w lie |w|/256 to
|w|/128 apart, so an update smaller than half that, about |w|/256, rounds back to w and is lost. AdamW moves each
weight by about the learning rate a step, which for fine-tuning (1e-5) is far below 1/256 of most
weights: stored in bf16, many of them would never move. Here the optimizer keeps a float32 copy of
every weight (its master), steps AdamW on the masters, and writes each master's rounding (to
nearest) back into the bf16 weight. Small updates accumulate in the master until they move the
bf16 weight; the forward and backward still run on bf16 weights and activations.

Memory, per parameter: the bf16 weight and gradient (2 + 2 bytes), the float32 master and AdamW's
two float32 moments (4 + 8): 16 bytes, as float32 training. While `step` runs, the masters also
hold a float32 copy of the gradients (4 bytes more), dropped at its end. The gradients themselves
are bf16 and add up in bf16 over the micro-batches of --grad-accum and over DDP's processes.

With --fsdp the sharded float32 parameters are the masters and FSDP2 casts them to bf16 for the
compute (minqr/training/sharding.py, shard_model); this class is for the unsharded model.
"""
import torch


class MasterWeightAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose parameters are float32 copies (the masters) of the given bf16 ones,
    in the same parameter groups (learning rates, weight decay): a learning-rate scheduler and
    `state_dict` see the masters. Use it as AdamW, with one addition: to clip the gradients, clip
    `float32_gradients()` (the masters, holding the gradients in float32), not the model's."""

    def __init__(self, param_groups: list[dict], **adamw_options):
        self.weights = [p for group in param_groups for p in group["params"]]
        master_groups = [{**group, "params": [p.detach().to(torch.float32, copy=True) for p in group["params"]]}
                         for group in param_groups]
        super().__init__(master_groups, **adamw_options)
        self.masters = [m for group in self.param_groups for m in group["params"]]
        # `step` is AdamW's own, on the masters, between two hooks: the gradients in, the rounded
        # weights out. (A `step` overriding AdamW's would run every step hook twice: torch wraps
        # the hooks around the step of each optimizer class, this one's and AdamW's.)
        self.register_step_pre_hook(_gradients_in)
        self.register_step_post_hook(_weights_out)

    def float32_gradients(self) -> list[torch.Tensor]:
        """Give each master a float32 copy of its weight's gradient (exact: float32 holds every
        bf16 number), once a step, and return the masters. Clipping these computes the norm and
        scales the gradients in float32 instead of rounding both to bf16. Call it after the
        backward; `step` calls it too, and a master that already holds its gradient keeps it (the
        clipped one)."""
        for weight, master in zip(self.weights, self.masters):
            if master.grad is None and weight.grad is not None:
                master.grad = weight.grad.float()
        return self.masters

    def masters_by_weight(self) -> dict:
        """Each bf16 weight's float32 master (what a weight average should follow)."""
        return dict(zip(self.weights, self.masters))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The bf16 weights' gradients; the masters hold none between steps."""
        for weight in self.weights:
            if set_to_none:
                weight.grad = None
            elif weight.grad is not None:
                weight.grad.zero_()

    def state_dict(self) -> dict:
        """AdamW's state (moments, step counts, groups) and the masters themselves, which the bf16
        weights cannot give back: a resumed run continues bit for bit."""
        return {**super().state_dict(), "masters": list(self.masters)}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("masters")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for master, saved in zip(self.masters, masters, strict=True):
                master.copy_(saved)


def _gradients_in(optimizer: MasterWeightAdamW, args, kwargs) -> None:
    """Before AdamW's step; `args` are step's, the optimizer first."""
    closure = args[1] if len(args) > 1 else kwargs.get("closure")
    if closure is not None:  # it would recompute the bf16 gradients after they were copied
        raise ValueError("MasterWeightAdamW.step takes no closure")
    optimizer.float32_gradients()


@torch.no_grad()
def _weights_out(optimizer: MasterWeightAdamW, args, kwargs) -> None:
    """After AdamW's step."""
    for weight, master in zip(optimizer.weights, optimizer.masters):
        weight.copy_(master)  # round to nearest
        master.grad = None  # the next step copies the gradients anew
