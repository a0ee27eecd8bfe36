"""Training losses. A criterion returns (total, {term: value}) so that each term can be logged."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from metrics import IGNORE_INDEX
from registry import Registry
from utils import UserError

LOSSES = Registry("loss")
register_loss = LOSSES.register


@register_loss("ce")
def build_cross_entropy(args):
    return cross_entropy


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


def parse_loss_spec(spec):
    """'dice:0.5' -> ('dice', 0.5); a bare name weighs 1."""
    name, _, weight = spec.partition(":")
    try:
        return name, float(weight) if weight else 1.0
    except ValueError:
        raise UserError(f"--loss {spec}: weight '{weight}' is not a number; expected NAME or NAME:WEIGHT") from None


def build_criterion(args):
    """The weighted sum of the --loss terms, each looked up in the loss registry."""
    terms = []
    for spec in args.loss:
        name, weight = parse_loss_spec(spec)
        if any(name == t[0] for t in terms):
            raise UserError(f"--loss names '{name}' twice; expected each loss once")
        terms.append((name, weight, LOSSES.get(name)(args)))
    return Criterion(terms)
