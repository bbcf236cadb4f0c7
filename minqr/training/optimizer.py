"""AdamW with its parameter groups, and the learning-rate schedule: linear warm-up, then a cosine
decay to 0."""
import math

import torch

from minqr.models.reward import RewardModel
from minqr.training.config import TrainConfig
from minqr.training.master_weights import MasterWeightAdamW


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to the peak, then cosine decay towards 0 (`step` counts from 0)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: RewardModel, config: TrainConfig, device: torch.device,
                   master_weights: bool = False) -> torch.optim.AdamW:
    """AdamW over the model's parameters in three groups; with `master_weights`, on float32 copies
    of them (minqr/training/master_weights.py)."""
    # Decay pulls weights towards 0: right for matrices, wrong for biases and layer-norm gains
    # (whose neutral value is 1), which are the 1-dimensional parameters. The head has its own
    # learning rate and decay (--head-lr-scale, --head-weight-decay): its N rows must move apart,
    # which decay works against.
    head = model.score.weight
    params = [p for p in model.parameters() if p.requires_grad and p is not head]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
              {"params": [head], "weight_decay": config.head_weight_decay, "lr": config.lr * config.head_lr_scale}]
    adamw = MasterWeightAdamW if master_weights else torch.optim.AdamW
    return adamw(groups, lr=config.lr, fused=device.type == "cuda")
