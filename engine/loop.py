"""One training epoch, the same for every task, world size and recipe."""
import contextlib
import itertools
import logging
import sys
import time

import torch
from tqdm import tqdm

from core.distributed import all_reduce_sum
from engine.optim import set_lr

log = logging.getLogger("ailab")


def set_train_mode(model, freeze_bn=False):
    """train() for the model; with freeze_bn, batch-norm layers keep their running statistics (eval mode)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def show_progress(ctx, args):
    """Bars on rank 0 in a terminal; plain log lines under CI, in files, or with --no_progress."""
    return ctx.is_main and not args.no_progress and sys.stdout.isatty()


def updates_per_epoch(batches, accum_steps):
    """Optimizer updates in an epoch of `batches` batches: a short last group still updates."""
    return -(-batches // accum_steps)


def to_device(target, device):
    """A label tensor, or a dict of per-pixel maps (scribble supervision), on `device`."""
    if isinstance(target, dict):
        return {name: t.to(device, non_blocking=True) for name, t in target.items()}
    return target.to(device, non_blocking=True)


def forward_loss(model, criterion, image, target):
    """(loss, terms) of one batch. A criterion with `uses_lorm` gets the LoRM loss that a LoRM model returns
    when it is given the batch's pseudo labels; every other model and criterion see (logits, target)."""
    if getattr(criterion, "uses_lorm", False):
        logits, lorm_loss = model(image, target["pseudo"])
        return criterion(logits, target, lorm_loss)
    return criterion(model(image), target)


def train_one_epoch(model, criterion, optimizer, loader, lr_fn, epoch, step, ctx, args, recorder, amp, guard,
                    first_batch=0, on_update=None):
    """Train one epoch, from batch `first_batch` when resuming mid-epoch; returns (metrics averaged over all
    ranks, global step after the epoch).

    `step` counts optimizer updates, so with --accum_steps K the LR schedule advances once per K batches.
    Each group of K batches (the last one may be shorter) sums the gradients of loss / group size, which
    equals one batch K times larger; DDP all-reduces only on the batch that completes a group (no_sync()).
    `on_update(step, batches_done)` runs after every optimizer update (EMA, recovery checkpoints).
    `guard` (faults.Guard) makes every rank agree on stop signals (acted on after the group's update) and on
    non-finite losses (the group is dropped, batch-norm statistics included).
    """
    set_train_mode(model, args.freeze_bn)
    n = min(first_batch + len(loader), args.limit_batches or first_batch + len(loader))
    accum = args.accum_steps
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bar = tqdm(total=n, initial=first_batch, desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stdout,
               dynamic_ncols=True, leave=False, disable=not show_progress(ctx, args))
    sums, smoothed, seen, data_wait, skip_group, stop_pending = None, None, 0, 0.0, False, False
    buffers = list(model.buffers())
    terms, lr = {}, lr_fn(step)
    start = ready = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for i, (image, target) in enumerate(itertools.islice(loader, max(0, n - first_batch)), start=first_batch):
        data_wait += time.perf_counter() - ready
        image = image.to(ctx.device, non_blocking=True,
                         memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
        target = to_device(target, ctx.device)
        group_start = i - i % accum
        group_size = min(accum, n - group_start)
        updates = (i + 1) % accum == 0 or i + 1 == n
        if i == group_start:
            lr = lr_fn(step)
            set_lr(optimizer, lr)
            # Forward passes change batch-norm statistics; a group that is dropped must not leave its trace.
            snapshot = [b.detach().clone() for b in buffers]
        with contextlib.nullcontext() if updates or not hasattr(model, "no_sync") else model.no_sync():
            with amp.autocast():
                loss, terms = forward_loss(model, criterion, image, target)
            value = loss.item()
            non_finite, stop = guard.agree(value)
            stop_pending = stop_pending or stop
            if non_finite:
                with torch.no_grad():
                    for b, saved in zip(buffers, snapshot):
                        b.copy_(saved)
                problem = guard.non_finite(value, terms, lr, epoch, group_start, step)
                if problem is not None:
                    raise problem  # the state is exactly the one after the last good update
                skip_group = True
                optimizer.zero_grad(set_to_none=True)  # drop the group's gradients on every rank
            elif not skip_group:
                amp.scaler.scale(loss / group_size).backward()
        if updates:
            if not skip_group:
                if args.clip_grad_norm:
                    amp.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_norm_(params, args.clip_grad_norm)
                amp.scaler.step(optimizer)
                amp.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step, skip_group = step + 1, False
            if on_update is not None:
                on_update(step, i + 1)
            if stop_pending:  # a step boundary: every rank stops here, with this update applied
                raise guard.stop_for_signal(epoch, i + 1, step)
        seen += image.shape[0]
        if not non_finite:
            values = torch.tensor([value, *terms.values(), 1.0], dtype=torch.float64)
            sums = values if sums is None else sums + values
            smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        ready = time.perf_counter()
        rate, wait = seen * ctx.world_size / (ready - start), data_wait / (ready - start)
        bar.set_postfix_str(f"loss {smoothed or 0:.4f} lr {lr:.2e} {rate:.1f} img/s data {wait:.0%}", refresh=False)
        bar.update()
        if args.log_interval and ((i + 1) % args.log_interval == 0 or i + 1 == n) and not non_finite:
            if bar.disable:
                log.info(f"epoch {epoch + 1}/{args.epochs} [{i + 1}/{n}] loss {smoothed:.4f} lr {lr:.5f} "
                         f"{rate:.1f} img/s data wait {wait:.0%}")
            record = {"train/loss": value, **{f"train/loss_{name}": float(v) for name, v in terms.items()},
                      "train/lr": lr, "train/images_per_s": rate, "train/data_wait": wait}
            recorder.scalars(record, step)
            recorder.event({"epoch": epoch + 1, "step": step, "time": time.time(), **record})
    bar.close()
    if sums is None:  # nothing left of this epoch (resumed at its end), or every update skipped
        sums = torch.zeros(len(terms) + 2, dtype=torch.float64)
    all_reduce_sum(sums)
    means = (sums[:-1] / sums[-1].clamp(min=1)).tolist()
    elapsed = time.perf_counter() - start
    return {"loss": means[0], "terms": dict(zip(terms, means[1:])), "lr": lr_fn(step - 1),
            "time": elapsed, "images_per_s": seen * ctx.world_size / elapsed, "data_wait": data_wait / elapsed}, step
