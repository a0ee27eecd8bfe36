"""Training losses. A criterion returns (total, {term: value}) so that each term can be logged."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from metrics import IGNORE_INDEX


def cross_entropy(logits, target):
    """Mean cross-entropy over labelled pixels; 0 (not NaN) for a batch that is all ignore."""
    total = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (target != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


class Criterion(nn.Module):
    def __init__(self, terms):
        super().__init__()
        self.terms = terms  # list of (name, weight, function)

    def forward(self, logits, target):
        values = {name: fn(logits, target) for name, _, fn in self.terms}
        total = sum(weight * values[name] for name, weight, _ in self.terms)
        return total, {name: v.detach() for name, v in values.items()}


def build_criterion(args):
    return Criterion([("ce", 1.0, cross_entropy)])
