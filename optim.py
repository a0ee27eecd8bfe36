"""Optimizer and learning-rate schedule. The LR is a pure function of the step, so resuming needs only the step."""
import math

import torch


def build_optimizer(args, model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)


def lr_at(step, total_steps, base_lr, warmup_steps=0, warmup_ratio=0.1, power=0.9):
    """Linear warmup from warmup_ratio*base_lr, then poly decay to 0 at total_steps."""
    if step < warmup_steps:
        return base_lr * (warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * math.pow(1.0 - progress, power)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
