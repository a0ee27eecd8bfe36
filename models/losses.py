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
    """(P, C) float32 scores, (P,) labels and (P,) float mask of the labelled pixels (not IGNORE_INDEX) among all P.

    Ignored pixels get label 0 and mask 0; each loss multiplies by the mask, so they add nothing and get exactly
    zero gradient. A mask, not boolean indexing: indexing needs the count of kept pixels on the host, which on a
    GPU waits for the device at every step.
    """
    scores = logits.movedim(1, -1).reshape(-1, logits.shape[1]).float()
    target = target.reshape(-1)
    keep = target != IGNORE_INDEX
    return scores, torch.where(keep, target, 0), keep.to(scores.dtype)


def one_hot(labels, classes, dtype):
    """(P, classes) one-hot rows of `labels` in `dtype`. F.one_hot checks the labels' range with a read on the host
    (on the CPU); a comparison with arange needs none."""
    return (labels[:, None] == torch.arange(classes, device=labels.device)).to(dtype)


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
    if weights is not None:
        return WeightedCrossEntropy(weights, smoothing)
    return functools.partial(cross_entropy, label_smoothing=smoothing) if smoothing else cross_entropy


class WeightedCrossEntropy(nn.Module):
    """cross_entropy with --class_weights, kept as a buffer so that moving the criterion to the device moves them
    once, instead of a copy to the device at every step."""

    def __init__(self, weights, label_smoothing=0.0):
        super().__init__()
        self.register_buffer("weight", torch.tensor(weights, dtype=torch.float32))
        self.label_smoothing = label_smoothing

    def forward(self, logits, target):
        return cross_entropy(logits, target, self.label_smoothing, self.weight)


def cross_entropy(logits, target, label_smoothing=0.0, weight=None):
    """Mean cross-entropy over labelled pixels (or samples); 0 (not NaN) for a batch that is all ignore.

    With class weights the mean is over the weights of the labelled targets, as torch's "mean" reduction does.
    The count stays on the device (no boolean indexing, no Python max of a tensor), so a step does not wait for it.
    """
    if weight is not None:
        weight = weight.to(logits.device)  # already there when the criterion was moved (WeightedCrossEntropy)
    total = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum",
                            label_smoothing=label_smoothing)
    keep = target != IGNORE_INDEX
    if weight is None:
        return total / keep.sum().clamp(min=1)
    return total / (weight[torch.where(keep, target, 0)] * keep).sum().clamp(min=1e-12)


@register_loss("bce")
def build_binary_cross_entropy(args):
    return binary_cross_entropy


def binary_cross_entropy(logits, target):
    """One-vs-rest: a sigmoid per class against the one-hot label, averaged over labelled pixels and classes."""
    scores, labels, keep = labelled_pixels(logits, target)
    onehot = one_hot(labels, scores.shape[1], scores.dtype)
    per_pixel = F.binary_cross_entropy_with_logits(scores, onehot, reduction="none").sum(1)
    return (per_pixel * keep).sum() / (keep.sum() * scores.shape[1]).clamp(min=1)


@register_loss("dice")
def build_dice(args):
    return dice


def dice(logits, target, smooth=DICE_SMOOTH):
    """Soft Dice loss on softmax probabilities, 1 - (2|P∩G| + s) / (|P| + |G| + s) per class over the whole batch,
    averaged over the classes present in the labels (an absent class would score a perfect 0 and dilute it)."""
    scores, labels, keep = labelled_pixels(logits, target)
    probs = scores.softmax(1) * keep[:, None]
    onehot = one_hot(labels, probs.shape[1], probs.dtype) * keep[:, None]
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
    scores, labels, keep = labelled_pixels(logits, target)
    log_pt = scores.log_softmax(1).gather(1, labels[:, None]).squeeze(1)
    # For gamma < 1 the derivative of (1 - p)^gamma is infinite at p = 1, which a confident pixel reaches in
    # float32, and 0 x inf is NaN. Clamping just above 0 changes the value by less than 1e-12^gamma x |log p|.
    weight = (1 - log_pt.exp()).clamp(min=1e-12).pow(gamma)
    return -(weight * log_pt * keep).sum() / keep.sum().clamp(min=1)


@register_loss("lovasz")
def build_lovasz(args):
    return lovasz_softmax


def lovasz_softmax(logits, target):
    """Lovász-softmax (Berman et al., 2018): the Lovász extension of the per-class Jaccard loss, evaluated at the
    per-pixel errors |1[y = c] - p_c| over the whole batch, averaged over the classes present in the labels."""
    scores, labels, keep = labelled_pixels(logits, target)
    probs = scores.softmax(1)
    fg = one_hot(labels, probs.shape[1], probs.dtype) * keep[:, None]
    # An ignored pixel's error is 0: it sorts after every mistake and, weighted by its error, adds nothing.
    errors, order = ((fg - probs).abs() * keep[:, None]).sort(0, descending=True)
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
