"""Evaluation over sharded data: every rank predicts its shard, the metric is summed over all ranks."""
import itertools
import logging
import sys

import torch
from tqdm import tqdm

from data.unreadable import split_batch

log = logging.getLogger("ailab")


@torch.no_grad()
def evaluate(model, loader, metric, predict, on_prediction=None, limit=None, progress=False):
    """`metric` (the task's) over a ShardSampler loader, summed over all ranks; returns its metrics dict.

    `predict(model, image)` gives class probabilities (N x K, or N x K x H x W at the labels' size).
    `on_prediction(index, probs, image)` is called for each sample with its dataset index, its probabilities
    and its input tensor (CPU). A sample that its loader dropped as unreadable (data/unreadable.py) is logged
    and left out of the metric.
    """
    model.eval()
    order = iter(loader.sampler)
    total = min(len(loader), limit or len(loader))
    batches = tqdm(itertools.islice(loader, limit), total=total, desc="val", file=sys.stdout, dynamic_ncols=True,
                   leave=False, disable=not progress)
    benchmark, sizes = torch.backends.cudnn.benchmark, set()
    try:
        for batch in batches:
            evaluate_batch(model, batch, order, metric, predict, on_prediction, sizes)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    return metric.reduce().compute()


def evaluate_batch(model, batch, order, metric, predict, on_prediction, sizes):
    """One loader batch into `metric`. Once a second input size shows up, cudnn.benchmark goes off until the end of
    the evaluation: autotuning every convolution again for every new size (validation images of many sizes at
    batch 1) would cost far more than it saves."""
    image, target, unreadable = split_batch(batch)
    for item in unreadable:  # left out of the metric; each rank logs its own
        log.warning(f"evaluation skipped image '{item.path}' ({item.reason})")
    # the sampler's order lists the skipped samples too
    left_out = {item.index for item in unreadable}
    indices = [i for i in itertools.islice(order, image.shape[0] + len(unreadable)) if i not in left_out]
    if image.shape[0] == 0:
        return
    sizes.add(tuple(image.shape[2:]))
    if len(sizes) > 1:
        torch.backends.cudnn.benchmark = False
    host = image  # the loader's copy: what on_prediction writes needs no copy back from the device
    image, target = image.to(metric.device, non_blocking=True), target.to(metric.device, non_blocking=True)
    probs = predict(model, image)
    metric.add(probs, target)
    if on_prediction is not None:
        for index, p, im in zip(indices, probs, host):
            on_prediction(index, p, im)
