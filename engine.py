"""The two loops every entry script shares: one training epoch, and evaluation over sharded data."""
import itertools
import logging
import math
import time

import torch

from metrics import ConfusionMatrix
from optim import set_lr
from utils import UserError, all_reduce_sum

log = logging.getLogger("ailab")


def set_train_mode(model, freeze_bn=False):
    """train() for the model; with freeze_bn, batch-norm layers keep their running statistics (eval mode)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def train_one_epoch(model, criterion, optimizer, loader, lr_fn, epoch, step, ctx, args):
    """Train one epoch; returns (metrics averaged over all ranks, global step after the epoch)."""
    set_train_mode(model, args.freeze_bn)
    sums = torch.zeros(2, dtype=torch.float64)  # loss sum, batch count
    seen, start = 0, time.perf_counter()
    n = min(len(loader), args.limit_batches or len(loader))
    for i, (image, target) in enumerate(itertools.islice(loader, n)):
        image = image.to(ctx.device, non_blocking=True)
        target = target.to(ctx.device, non_blocking=True)
        lr = lr_fn(step)
        set_lr(optimizer, lr)
        loss, terms = criterion(model(image), target)
        value = loss.item()
        if not math.isfinite(value):
            raise UserError(f"loss is {value} at epoch {epoch}, step {i + 1}/{n} (lr {lr:.4g}); "
                            f"expected a finite loss: lower --lr or check the labels")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        seen += image.shape[0]
        sums += torch.tensor([value, 1.0], dtype=torch.float64)
        if args.log_interval and ((i + 1) % args.log_interval == 0 or i + 1 == n):
            rate = seen * ctx.world_size / (time.perf_counter() - start)
            log.info(f"epoch {epoch + 1}/{args.epochs} [{i + 1}/{n}] loss {value:.4f} lr {lr:.5f} "
                     f"{rate:.1f} img/s")
    all_reduce_sum(sums)
    return {"loss": (sums[0] / sums[1].clamp(min=1)).item(), "lr": lr_fn(step - 1) if step else 0.0,
            "time": time.perf_counter() - start, "images_per_s": seen * ctx.world_size / (time.perf_counter() - start)}, step


def predict(model, image):
    """Class scores for a batch at the input's size. Multi-scale, flip and sliding window plug in here."""
    return model(image)


@torch.no_grad()
def evaluate(model, loader, numclasses, device, on_prediction=None, limit=None):
    """Confusion-matrix metrics over a ShardSampler loader, summed over all ranks.

    `on_prediction(index, pred)` is called for each image with its dataset index and predicted mask.
    """
    model.eval()
    cm = ConfusionMatrix(numclasses, device)
    order = iter(loader.sampler)
    for image, target in itertools.islice(loader, limit):
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        pred = predict(model, image).argmax(1)
        cm.update(target, pred)
        if on_prediction is not None:
            for p in pred:
                on_prediction(next(order), p.cpu().numpy())
    return cm.reduce().compute()
