"""Training losses. A criterion returns (total, {term: value}) so that each term can be logged.

Every loss leaves out pixels labelled IGNORE_INDEX: they add nothing to the value and get no gradient. A batch
that is all ignore (a crop inside a border region) gives 0, not NaN, so it cannot poison the weights.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.registry import Registry, check_no_kwargs
from utils import IGNORE_INDEX, UserError

LOSSES = Registry("loss")
register_loss = LOSSES.register

FOCAL_GAMMA = 2.0  # the default of --focal_gamma, and what a caller without that flag gets
# Keeps Dice finite and smooth for a class with few pixels; 1 is small next to a batch's pixel count.
DICE_SMOOTH = 1.0


def labelled_pixels(logits, target):
    """(P, C) float32 scores and (P,) labels of the P pixels that are not IGNORE_INDEX.

    Indexing (rather than multiplying by a mask) means ignored pixels take no part in the arithmetic at all,
    so their gradient is exactly zero even where their scores are extreme.
    """
    keep = target != IGNORE_INDEX
    return logits.movedim(1, -1)[keep].float(), target[keep]


def mean_over_present(per_class, counts):
    """Mean of per-class losses over the classes that have labelled pixels; 0 when none has."""
    present = counts > 0
    return (per_class * present).sum() / present.sum().clamp(min=1)


@register_loss("ce")
def build_cross_entropy(args):
    """--label_smoothing and --class_weights (classification flags; segmentation runs have neither)."""
    smoothing = getattr(args, "label_smoothing", 0.0) or 0.0
    weights = getattr(args, "class_weights", None)
    if not 0 <= smoothing < 1:
        raise UserError(f"--label_smoothing {smoothing!r}: expected a number in [0, 1)")
    if weights is not None and (min(weights) < 0 or not all(map(math.isfinite, weights)) or sum(weights) <= 0):
        raise UserError(f"--class_weights {' '.join(map(str, weights))}: expected finite weights >= 0, not all 0")
    if not smoothing and weights is None:
        return cross_entropy
    return functools.partial(cross_entropy, label_smoothing=smoothing,
                             weight=None if weights is None else torch.tensor(weights, dtype=torch.float32))


def cross_entropy(logits, target, label_smoothing=0.0, weight=None):
    """Mean cross-entropy over labelled pixels (or samples); 0 (not NaN) for a batch that is all ignore.

    With class weights the mean is over the weights of the labelled targets, as torch's "mean" reduction does.
    """
    if weight is not None:
        weight = weight.to(logits.device)
    total = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum",
                            label_smoothing=label_smoothing)
    labelled = target[target != IGNORE_INDEX]
    count = labelled.numel() if weight is None else weight[labelled].sum()
    return total / max(count, 1e-12) if weight is not None else total / max(count, 1)


@register_loss("bce")
def build_binary_cross_entropy(args):
    return binary_cross_entropy


def binary_cross_entropy(logits, target):
    """One-vs-rest: a sigmoid per class against the one-hot label, averaged over labelled pixels and classes."""
    scores, labels = labelled_pixels(logits, target)
    onehot = F.one_hot(labels, scores.shape[1]).to(scores.dtype)
    return F.binary_cross_entropy_with_logits(scores, onehot, reduction="sum") / max(scores.numel(), 1)


@register_loss("dice")
def build_dice(args):
    return dice


def dice(logits, target, smooth=DICE_SMOOTH):
    """Soft Dice loss on softmax probabilities, 1 - (2|P∩G| + s) / (|P| + |G| + s) per class over the whole batch,
    averaged over the classes present in the labels (an absent class would score a perfect 0 and dilute it)."""
    scores, labels = labelled_pixels(logits, target)
    probs = scores.softmax(1)
    onehot = F.one_hot(labels, probs.shape[1]).to(probs.dtype)
    overlap = (probs * onehot).sum(0)
    sizes = probs.sum(0) + onehot.sum(0)
    return mean_over_present(1 - (2 * overlap + smooth) / (sizes + smooth), onehot.sum(0))


@register_loss("focal")
def build_focal(args):
    gamma = getattr(args, "focal_gamma", FOCAL_GAMMA)
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
        raise UserError(f"--focal_gamma {gamma!r} is not valid; expected a number >= 0 (0 is plain cross-entropy)")
    return functools.partial(focal, gamma=float(gamma))


def focal(logits, target, gamma=FOCAL_GAMMA):
    """Multi-class focal loss -(1 - p_t)^gamma log p_t, averaged over labelled pixels."""
    scores, labels = labelled_pixels(logits, target)
    log_pt = scores.log_softmax(1).gather(1, labels[:, None]).squeeze(1)
    # For gamma < 1 the derivative of (1 - p)^gamma is infinite at p = 1, which a confident pixel reaches in
    # float32, and 0 x inf is NaN. Clamping just above 0 changes the value by less than 1e-12^gamma x |log p|.
    weight = (1 - log_pt.exp()).clamp(min=1e-12).pow(gamma)
    return -(weight * log_pt).sum() / max(labels.numel(), 1)


@register_loss("lovasz")
def build_lovasz(args):
    return lovasz_softmax


def lovasz_softmax(logits, target):
    """Lovász-softmax (Berman et al., 2018): the Lovász extension of the per-class Jaccard loss, evaluated at the
    per-pixel errors |1[y = c] - p_c| over the whole batch, averaged over the classes present in the labels."""
    scores, labels = labelled_pixels(logits, target)
    probs = scores.softmax(1)
    fg = F.one_hot(labels, probs.shape[1]).to(probs.dtype)
    errors, order = (fg - probs).abs().sort(0, descending=True)
    fg = fg.gather(0, order)
    # Add the pixels to the set of mistakes in order of decreasing error; each one's weight is how much the
    # Jaccard loss 1 - |fg minus mistakes| / |fg or mistakes| grows when it joins. Ties may fall in any order:
    # the extension's value does not depend on it.
    n_fg = fg.sum(0)
    jaccard = 1 - (n_fg - fg.cumsum(0)) / (n_fg + (1 - fg).cumsum(0))  # denominator >= 1 from the first pixel
    growth = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return mean_over_present((errors * growth).sum(0), n_fg)


class Criterion(nn.Module):
    def __init__(self, terms):
        super().__init__()
        self.terms = terms  # list of (name, weight, function)
        # A registered loss class is a module: keep it in the tree, so that .to(device) moves its buffers.
        self.classes = nn.ModuleList([fn for _, _, fn in terms if isinstance(fn, nn.Module)])

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
        kwargs = (getattr(args, "loss_kwargs", None) or {}).get(name, {})
        if LOSSES.takes_kwargs(name):  # a class registered with LOSSES.register_module(), built from --loss_kwargs
            terms.append((name, weight, LOSSES.build(name, kwargs, f"--loss_kwargs {name}")))
            continue
        check_no_kwargs(kwargs, f"--loss_kwargs {name}", f"loss {name}")
        terms.append((name, weight, LOSSES.get(name)(args)))
    return Criterion(terms)
