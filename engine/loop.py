"""One training epoch, the same for every task, world size and recipe."""
import contextlib
import itertools
import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm import tqdm

from core.distributed import all_reduce_sum
from data.unreadable import split_batch
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


@dataclass
class Run:
    """What every epoch of one training run shares; train.py builds it once.

    `lr_fn(step)` is the LR of an optimizer step; `on_update(step, batches_done)` runs after every update (EMA,
    recovery checkpoints); `guard` (faults.Guard) makes every rank agree on stop signals and non-finite losses.
    """
    model: torch.nn.Module
    criterion: Callable
    optimizer: torch.optim.Optimizer
    amp: object
    guard: object
    recorder: object
    ctx: object
    args: object
    lr_fn: Callable
    on_update: Optional[Callable] = None


def train_one_epoch(run, loader, epoch, step, first_batch=0):
    """Train one epoch, from batch `first_batch` when resuming mid-epoch; returns (metrics averaged over all
    ranks, global step after the epoch).

    `step` counts optimizer updates, so with --accum_steps K the LR schedule advances once per K batches.
    Each group of K batches (the last one may be shorter) sums the gradients of loss / group size, which
    equals one batch K times larger; DDP all-reduces only on the batch that completes a group (no_sync()).

    The host waits for the device once per update, not once per batch: the group's loss and terms are summed on
    the device, and one all-reduce of them (with each rank's stop flag) after the group's last forward pass tells
    every rank the same three things: the mean loss over ranks for the log, whether any rank's loss was not finite
    (the group is then dropped, run.guard), and whether any rank was asked to stop (acted on after the update).
    """
    model, optimizer, amp, guard, ctx, args = run.model, run.optimizer, run.amp, run.guard, run.ctx, run.args
    set_train_mode(model, args.freeze_bn)
    n = min(first_batch + len(loader), args.limit_batches or first_batch + len(loader))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bar = tqdm(total=n, initial=first_batch, desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stdout,
               dynamic_ncols=True, leave=False, disable=not show_progress(ctx, args))
    progress = Progress(ctx.world_size)
    buffers = list(model.buffers())
    terms, lr, sums = {}, run.lr_fn(step), None
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(itertools.islice(loader, max(0, n - first_batch)), start=first_batch):
        progress.data_ready()
        image, target, unreadable = split_batch(batch)
        if unreadable:  # logged by the rank that met them; only rank 0 prints, but every rank logs warnings
            progress.skip(unreadable, epoch, ctx.rank)
        image = image.to(ctx.device, non_blocking=True,
                         memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
        target = to_device(target, ctx.device)
        group_start = i - i % args.accum_steps
        group_size = min(args.accum_steps, n - group_start)
        updates = (i + 1) % args.accum_steps == 0 or i + 1 == n
        if i == group_start:  # a new group of accumulated batches: its LR, and what to undo if it is dropped
            lr = run.lr_fn(step)
            set_lr(optimizer, lr)
            guard.begin_group(buffers)
        # forward; at a group's last batch, one all-reduce and one host sync decide for every rank; backward
        with contextlib.nullcontext() if updates or not hasattr(model, "no_sync") else model.no_sync():
            with amp.autocast():
                loss, terms = forward_loss(model, run.criterion, image, target)
            if image.shape[0] == 0:  # every image unreadable: this rank adds nothing, but still joins DDP's reduce
                loss, terms = loss.nan_to_num(0.0), {k: v.nan_to_num(0.0) for k, v in terms.items()}
            batch_sums = torch.stack([loss.detach().float(), *(t.detach().float() for t in terms.values())])
            sums = batch_sums if i == group_start else sums + batch_sums
            dropped = False
            if updates:
                value, term_values, dropped = guard.agree(sums, group_size, ctx.world_size, terms, lr, epoch,
                                                          group_start, step)
            if not dropped:  # (earlier batches of a dropped group went through backward: their gradients go below)
                amp.scaler.scale(loss / group_size).backward()
        if updates:
            if not dropped:
                if args.clip_grad_norm:
                    amp.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_norm_(params, args.clip_grad_norm)
                amp.scaler.step(optimizer)
                amp.scaler.update()
            optimizer.zero_grad(set_to_none=True)  # a dropped group's gradients go on every rank
            step += 1
            if run.on_update is not None:
                run.on_update(step, i + 1)
            if guard.stop_pending:  # a step boundary: every rank stops here, with this update applied
                raise guard.stop_for_signal(epoch, i + 1, step)
            if not dropped:
                progress.add(group_size, value, term_values)
        progress.count(image.shape[0])
        bar.update()
        if updates:
            bar.set_postfix_str(progress.postfix(lr), refresh=False)
            every = args.log_interval  # a line each time the count of batches passes a multiple of it
            if every and ((i + 1) // every > group_start // every or i + 1 == n) and not dropped:
                log_step(run, progress, bar, epoch, i + 1, n, step, value, term_values, lr)
    bar.close()
    # One collective per epoch: the images skipped on all ranks (each rank logged its own as it met them).
    skipped = int(all_reduce_sum(torch.full((1,), float(progress.skipped), device=ctx.device)).tolist()[0])
    return {**progress.summary(terms, run.lr_fn(step - 1)), "skipped_images": skipped}, step


class Progress:
    """Running numbers of an epoch: loss sums for the epoch means, a smoothed loss, images/s and data wait.

    The losses it is given are already means over ranks (faults.Guard.agree), so its sums are the same on every
    rank and the epoch means need no collective."""

    def __init__(self, world_size):
        self.world_size, self.sums, self.smoothed, self.seen, self.data_wait = world_size, None, None, 0, 0.0
        self.skipped = 0
        self.start = self.ready = time.perf_counter()

    def data_ready(self):
        self.data_wait += time.perf_counter() - self.ready

    def skip(self, unreadable, epoch, rank):
        """Images this rank dropped from a batch because they could not be read."""
        for item in unreadable:
            self.skipped += 1
            log.warning(f"skipped image '{item.path}' ({item.reason}) on rank {rank}, epoch {epoch + 1}: "
                        f"{self.skipped} skipped on this rank this epoch")

    def count(self, batch_size):
        """A batch was trained on (this rank's share of it)."""
        self.seen += batch_size
        self.ready = time.perf_counter()

    def add(self, batches, value, terms):
        """The mean loss (over ranks and the `batches` batches of an update) and its terms {name: mean}."""
        values = [value * batches, *(v * batches for v in terms.values()), batches]
        self.sums = values if self.sums is None else [a + b for a, b in zip(self.sums, values)]
        self.smoothed = value if self.smoothed is None else 0.9 * self.smoothed + 0.1 * value

    def rate(self):
        """(images/s over all ranks, fraction of the time spent waiting for data)."""
        elapsed = self.ready - self.start
        return self.seen * self.world_size / elapsed, self.data_wait / elapsed

    def postfix(self, lr):
        rate, wait = self.rate()
        return f"loss {self.smoothed or 0:.4f} lr {lr:.2e} {rate:.1f} img/s data {wait:.0%}"

    def summary(self, terms, lr):
        """The epoch's means (zeros when nothing was left of the epoch or every update was skipped)."""
        sums = self.sums or [0.0] * (len(terms) + 2)
        means = [s / max(sums[-1], 1) for s in sums[:-1]]
        elapsed = time.perf_counter() - self.start
        return {"loss": means[0], "terms": dict(zip(terms, means[1:])), "lr": lr, "time": elapsed,
                "images_per_s": self.seen * self.world_size / elapsed, "data_wait": self.data_wait / elapsed}


def log_step(run, progress, bar, epoch, done, n, step, value, terms, lr):
    """A log line (without a progress bar) and the step's records."""
    rate, wait = progress.rate()
    if bar.disable:
        log.info(f"epoch {epoch + 1}/{run.args.epochs} [{done}/{n}] loss {progress.smoothed:.4f} lr {lr:.5f} "
                 f"{rate:.1f} img/s data wait {wait:.0%}")
    record = {"train/loss": value, **{f"train/loss_{name}": float(v) for name, v in terms.items()},
              "train/lr": lr, "train/images_per_s": rate, "train/data_wait": wait}
    run.recorder.scalars(record, step)
    run.recorder.event({"epoch": epoch + 1, "step": step, "time": time.time(), **record})
