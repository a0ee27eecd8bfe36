"""Metrics of both tasks, from counts that are summed over all ranks before they are read.

Evaluation shards never pad (data.loaders.ShardSampler), so every sample is counted exactly once for any number
of processes. compute() returns one flat dict (see tasks/base.py for how records are derived from it).
"""
import numpy as np
import torch

from core.distributed import all_reduce_sum
from utils import IGNORE_INDEX


def class_map(scores, dim=1):
    """The index of the highest score along `dim` (the first one on a tie, as argmax). torch.max's indices, not
    argmax: on the CPU, argmax over a dimension that is not the last is 7-10x slower (15-20 against 2 ms for
    8 x 5 x 128 x 128 probabilities, which made it most of the confusion matrix's cost)."""
    return scores.max(dim).indices


class ConfusionMatrix:
    """Rows are the true class, columns the predicted class; ignore pixels are not counted."""

    def __init__(self, numclasses, device="cpu"):
        self.n, self.device = numclasses, torch.device(device)
        self.mat = torch.zeros(numclasses, numclasses, dtype=torch.int64, device=device)

    def add(self, probs, target):
        """Count a batch: probabilities N x K x H x W, labels N x H x W."""
        self.update(target, class_map(probs))

    def update(self, target, pred):
        """Count labels and predictions of one shape; a label outside 0..K-1 (IGNORE_INDEX) is not counted. Pixels
        are counted in place (an extra bin for the ignored ones), without gathering the kept ones first."""
        n = self.n
        keep = (target != IGNORE_INDEX) & (target >= 0) & (target < n)
        cells = torch.where(keep, target.to(torch.int64) * n + pred.to(torch.int64), n * n)
        self.mat += torch.bincount(cells.flatten(), minlength=n * n + 1)[:n * n].view(n, n)

    def reduce(self):
        """Sum the counts of every rank, so every rank then reads the same, complete matrix."""
        all_reduce_sum(self.mat)
        return self

    def compute(self):
        m = self.mat.double().cpu().numpy()
        tp, gt, pred = np.diag(m), m.sum(1), m.sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = tp / (gt + pred - tp)      # NaN for a class absent from both labels and predictions
            dice = 2 * tp / (gt + pred)
            class_acc = tp / gt
        seen = gt > 0
        return {
            "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
            "acc": float(tp.sum() / max(m.sum(), 1.0)),
            "mean_class_acc": float(np.nanmean(class_acc)) if np.isfinite(class_acc).any() else 0.0,
            "fwiou": float((gt[seen] / gt.sum() * iou[seen]).sum()) if seen.any() else 0.0,
            "iou": listed(iou),
            "dice": listed(dice),
            "class_acc": listed(class_acc),
            "pixels": int(m.sum()),
            "confusion": self.mat.cpu().tolist(),
        }


def listed(values):
    """Per-class values as plain floats, None where undefined (a class absent everywhere)."""
    return [None if np.isnan(v) else float(v) for v in values]


class ClassificationMetrics:
    """Top-1 and top-k accuracy, per-class precision, recall and F1 with macro and weighted means, and the
    confusion matrix of a classifier. k is capped at the number of classes."""

    def __init__(self, numclasses, device="cpu", topk=5):
        self.n, self.device, self.k = numclasses, torch.device(device), max(1, min(topk, numclasses))
        self.confusion = ConfusionMatrix(numclasses, device)
        self.topk_hits = torch.zeros(1, dtype=torch.int64, device=device)

    def add(self, probs, target):
        """Count a batch: probabilities N x K, labels N."""
        self.confusion.update(target, class_map(probs))
        top = probs.topk(self.k, dim=1).indices
        self.topk_hits += (top == target[:, None]).any(1).sum()

    def reduce(self):
        self.confusion.reduce()
        all_reduce_sum(self.topk_hits)
        return self

    def compute(self):
        m = self.confusion.mat.double().cpu().numpy()
        tp, support, predicted = np.diag(m), m.sum(1), m.sum(0)
        total = max(m.sum(), 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(predicted > 0, tp / predicted, 0.0)  # a class never predicted has precision 0
            recall = np.where(support > 0, tp / support, np.nan)      # undefined for a class with no samples
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        present = support > 0
        f1 = np.where(present, f1, np.nan)
        precision = np.where(present | (predicted > 0), precision, np.nan)
        weights = support / total

        def macro(values):
            return float(np.nanmean(values[present])) if present.any() else 0.0

        def weighted(values):
            return float(np.nansum(values[present] * weights[present])) if present.any() else 0.0

        return {"top1": float(tp.sum() / total), f"top{self.k}": float(self.topk_hits.item() / total),
                "macro_precision": macro(precision), "macro_recall": macro(recall), "macro_f1": macro(f1),
                "weighted_precision": weighted(precision), "weighted_recall": weighted(recall),
                "weighted_f1": weighted(f1),
                "precision": listed(precision), "recall": listed(recall), "f1": listed(f1),
                "support": [int(s) for s in support], "samples": int(m.sum()), "topk": self.k,
                "confusion": self.confusion.mat.cpu().tolist()}

