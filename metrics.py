"""Segmentation metrics from a confusion matrix that is summed over all ranks before it is read."""
import numpy as np
import torch

from distributed import all_reduce_sum

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Rows are the true class, columns the predicted class; ignore pixels are not counted."""

    def __init__(self, numclasses, device="cpu"):
        self.n = numclasses
        self.mat = torch.zeros(numclasses, numclasses, dtype=torch.int64, device=device)

    def update(self, target, pred):
        keep = (target != IGNORE_INDEX) & (target >= 0) & (target < self.n)
        cells = target[keep].to(torch.int64) * self.n + pred[keep].to(torch.int64)
        self.mat += torch.bincount(cells, minlength=self.n * self.n).view(self.n, self.n)

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
