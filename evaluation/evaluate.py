"""Evaluation over sharded data: every rank predicts its shard, the metric is summed over all ranks."""
import itertools
import sys

import torch
from tqdm import tqdm


@torch.no_grad()
def evaluate(model, loader, metric, predict, on_prediction=None, limit=None, progress=False):
    """`metric` (the task's) over a ShardSampler loader, summed over all ranks; returns its metrics dict.

    `predict(model, image)` gives class probabilities (N x K, or N x K x H x W at the labels' size).
    `on_prediction(index, probs, image)` is called for each sample with its dataset index, its probabilities
    and its input tensor (CPU).
    """
    model.eval()
    order = iter(loader.sampler)
    total = min(len(loader), limit or len(loader))
    batches = tqdm(itertools.islice(loader, limit), total=total, desc="val", file=sys.stdout, dynamic_ncols=True,
                   leave=False, disable=not progress)
    for image, target in batches:
        image, target = image.to(metric.device, non_blocking=True), target.to(metric.device, non_blocking=True)
        probs = predict(model, image)
        metric.add(probs, target)
        if on_prediction is not None:
            for p, im in zip(probs, image):
                on_prediction(next(order), p, im.cpu())
    return metric.reduce().compute()
