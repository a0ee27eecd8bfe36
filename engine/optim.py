"""Optimizer with parameter groups, and the learning-rate schedule.

The LR is a pure function of (step, steps per epoch, flags), with no scheduler state, so a resumed run needs
only its step counter. Per-group LR multipliers live in the groups as "lr_mult", which set_lr applies.
"""
import logging
import math

import torch
import torch.nn as nn

from utils import UserError

log = logging.getLogger("ailab")

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("poly", "cosine", "step", "multistep", "constant")
UPDATE_POLICIES = ("iter", "epoch")
# Scales and shifts of normalised activations: decaying them towards 0 only fights the normalisation.
# _NormBase covers BatchNorm, SyncBatchNorm and InstanceNorm.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def check_optim_args(args, base_lr):
    """Stop with one line naming the flag when an optimizer or schedule flag cannot work."""
    def need(ok, flag, value, expected):
        if not ok:
            raise UserError(f"{flag} {value!r} is not valid; expected {expected}")

    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    need(args.optimizer in OPTIMIZERS, "--optimizer", args.optimizer, "one of " + ", ".join(OPTIMIZERS))
    need(args.lr_scheduler in SCHEDULERS, "--lr_scheduler", args.lr_scheduler, "one of " + ", ".join(SCHEDULERS))
    need(args.lr_update_policy in UPDATE_POLICIES, "--lr_update_policy", args.lr_update_policy, "iter or epoch")
    need(number(args.weight_decay) and args.weight_decay >= 0, "--weight_decay", args.weight_decay, "a number >= 0")
    need(number(args.momentum) and 0 <= args.momentum < 1, "--momentum", args.momentum, "a number in [0, 1)")
    need(number(args.backbone_lr_mult) and args.backbone_lr_mult >= 0, "--backbone_lr_mult", args.backbone_lr_mult,
         "a number >= 0 (0 freezes the backbone's weights)")
    need(number(args.warmup_epochs) and args.warmup_epochs >= 0, "--warmup_epochs", args.warmup_epochs,
         "a number of epochs >= 0")
    need(number(args.warmup_ratio) and 0 <= args.warmup_ratio <= 1, "--warmup_ratio", args.warmup_ratio,
         "a fraction of the LR in [0, 1]")
    need(args.warmup_lr is None or number(args.warmup_lr) and args.warmup_lr >= 0, "--warmup_lr", args.warmup_lr,
         "an LR >= 0")
    need(number(args.poly_power) and args.poly_power >= 0, "--poly_power", args.poly_power, "a number >= 0")
    need(number(args.gamma) and 0 < args.gamma <= 1, "--gamma", args.gamma, "a decay factor in (0, 1]")
    need(number(args.min_lr) and 0 <= args.min_lr, "--min_lr", args.min_lr, "an LR >= 0")
    if args.lr_scheduler in ("poly", "cosine"):
        need(args.min_lr <= base_lr, "--min_lr", args.min_lr, f"at most the LR {base_lr:g} that it is a floor for")
    if args.lr_scheduler == "step":
        need(isinstance(args.step_size, int) and args.step_size >= 1, "--step_size", args.step_size,
             "a whole number of epochs >= 1 with --lr_scheduler step")
    if args.lr_scheduler == "multistep":
        need(bool(args.milestones) and all(isinstance(m, int) and m >= 1 for m in args.milestones),
             "--milestones", args.milestones, "one or more epochs >= 1 with --lr_scheduler multistep")
    # A flag its scheduler ignores is most likely a forgotten --lr_scheduler, so say so rather than ignore it.
    unused = {"--step_size": args.lr_scheduler != "step" and args.step_size is not None,
              "--milestones": args.lr_scheduler != "multistep" and args.milestones is not None,
              "--min_lr": args.lr_scheduler not in ("poly", "cosine") and args.min_lr != 0}
    for flag in (f for f, is_unused in unused.items() if is_unused):
        log.warning(f"{flag} has no effect with --lr_scheduler {args.lr_scheduler}")


def param_groups(model, weight_decay, no_decay_norm_bias=False, backbone_lr_mult=1.0):
    """Parameter groups: backbone vs head (when the backbone's LR differs), decay vs no decay (when norm-layer
    parameters and biases are exempt). Splits that change nothing are not made, so the default is one group
    in model.parameters() order, and a checkpoint of a run without these flags still resumes."""
    backbone = getattr(model, "backbone", None)
    split_backbone = backbone_lr_mult != 1.0 and isinstance(backbone, nn.Module)
    if backbone_lr_mult != 1.0 and not split_backbone:
        log.warning(f"--backbone_lr_mult {backbone_lr_mult:g} has no effect: the model has no .backbone module, "
                    f"so all its parameters get the head's LR")
    in_backbone = {id(p) for p in backbone.parameters()} if split_backbone else set()
    groups, seen = {}, set()
    for module in model.modules():  # the same order as model.parameters()
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:  # shared: the first holder's; frozen: left out
                continue
            seen.add(id(p))
            part = "backbone" if id(p) in in_backbone else "head" if split_backbone else "all"
            exempt = no_decay_norm_bias and (isinstance(module, NORM_LAYERS) or name == "bias")
            key = f"{part}_no_decay" if exempt else part
            if key not in groups:
                groups[key] = {"name": key, "params": [], "weight_decay": 0.0 if exempt else weight_decay,
                               "lr_mult": backbone_lr_mult if part == "backbone" else 1.0}
            groups[key]["params"].append(p)
    return list(groups.values())


def build_optimizer(args, model, lr):
    """--optimizer over param_groups(model); also checks the schedule flags, so a mistake stops before training."""
    check_optim_args(args, lr)
    groups = param_groups(model, args.weight_decay, args.no_decay_norm_bias, args.backbone_lr_mult)
    for group in groups:
        group["lr"] = lr * group["lr_mult"]
    fused = can_fuse(groups)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum, fused=fused)
    return (torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW)(groups, lr=lr, fused=fused)


def can_fuse(groups):
    """Whether torch's fused step (one kernel over all tensors) takes these parameters: floating point, on the CPU
    or CUDA. Without it the CPU steps tensor by tensor: the default model's AdamW step took 57 ms against 14 fused."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])


def load_optimizer_state(optimizer, ckpt, path):
    """Resume the optimizer from a train.py checkpoint, refusing one whose optimizer or groups differ.

    torch would fail with a bare ValueError on other groups, or load another optimizer's state without a word.
    The checkpoint's group settings (weight decay, lr_mult, ...) would also override this run's flags, so this
    run's are put back: the flags given now define the run, as they do for everything else.
    """
    saved_name = ckpt["args"].get("optimizer", "sgd")  # checkpoints from before --optimizer used SGD
    saved_sizes = [len(g["params"]) for g in ckpt["optimizer"]["param_groups"]]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_name != optimizer_name(optimizer) or saved_sizes != sizes:
        raise UserError(f"checkpoint {path} has a {saved_name} optimizer with parameter groups of {saved_sizes} "
                        f"tensors, but this run builds {optimizer_name(optimizer)} with {sizes}; resume with the same "
                        f"--optimizer, --no_decay_norm_bias and --backbone_lr_mult")
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)


def optimizer_name(optimizer):
    return {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}.get(
        type(optimizer), type(optimizer).__name__)


def describe_optimizer(optimizer):
    """One log line: the optimizer and, per group, its size, LR multiplier and weight decay."""
    parts = [f"{g.get('name', i)} {sum(p.numel() for p in g['params']) / 1e6:.3g} M params "
             f"(lr x{g.get('lr_mult', 1.0):g}, weight decay {g['weight_decay']:g})"
             for i, g in enumerate(optimizer.param_groups)]
    return f"optimizer {type(optimizer).__name__}: " + "; ".join(parts)


def lr_at(step, steps_per_epoch, args, base_lr):
    """The LR at global step `step` (from 0) of a run of args.epochs epochs of steps_per_epoch steps.

    Warmup (--warmup_epochs, rounded to steps) rises linearly from --warmup_lr, or --warmup_ratio x base_lr, to
    where the schedule stands when warmup ends. poly and cosine decay from base_lr to --min_lr between the end of
    warmup and the end of the run; step and multistep count their epochs from the start of the run.
    With --lr_update_policy epoch every step of an epoch gets the LR of the epoch's first step.
    """
    steps_per_epoch = max(1, steps_per_epoch)
    if args.lr_update_policy == "epoch":
        step -= step % steps_per_epoch
    warmup = round(args.warmup_epochs * steps_per_epoch)
    if step < warmup:
        start = base_lr * args.warmup_ratio if args.warmup_lr is None else args.warmup_lr
        end = scheduled_lr(warmup, warmup, steps_per_epoch, args, base_lr)
        return start + (end - start) * step / warmup
    return scheduled_lr(step, warmup, steps_per_epoch, args, base_lr)


def scheduled_lr(step, warmup, steps_per_epoch, args, base_lr):
    """The schedule without warmup; `warmup` (steps) is where poly and cosine start to decay."""
    name = args.lr_scheduler
    if name == "constant":
        return base_lr
    if name == "step":  # whole numbers of steps, so a decay lands exactly on an epoch's first step
        return base_lr * args.gamma ** (step // (args.step_size * steps_per_epoch))
    if name == "multistep":
        return base_lr * args.gamma ** sum(step >= m * steps_per_epoch for m in args.milestones)
    total = args.epochs * steps_per_epoch
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if name == "poly":
        shape = (1.0 - progress) ** args.poly_power
    elif name == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise UserError(f"--lr_scheduler {name!r} is not valid; expected one of {', '.join(SCHEDULERS)}")
    return args.min_lr + (base_lr - args.min_lr) * shape


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
