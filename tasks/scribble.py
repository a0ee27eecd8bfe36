"""Scribble supervision: the training modes, their flags and datasets, and the losses of the scribble-supervised
method (the distance maps themselves: data/distance_maps.py).

Annotators draw a few strokes per object and some on the background; every other pixel is IGNORE_INDEX. Training
combines, each with its own weight flag:
  segs    partial cross-entropy on the scribble pixels                                   (--l_segs, --train_path)
  pesudo  label-smoothed cross-entropy on CAM-like pseudo labels                          (--l_pesudo, --pesudo_path)
  lorm    a loss the model computes itself and hands over                                 (--l_lorm)
  ds, dc  entropy of the softmax weighted by a distance map, sum w H / sum w, w = map/255
          ds: high near scribbles; dc: high far from pseudo-label boundaries        (--l_ds, --l_dc, --distancemap_*)
Minimising the weighted entropy makes predictions confident where the weight is high. "pesudo" is the established
spelling of these flags and of the term's name; --pseudo_path and --l_pseudo are accepted as aliases.

Like models/losses.py, every loss leaves out IGNORE_INDEX (and zero-weight) pixels entirely, and a batch with nothing to
learn from gives exactly 0 with a zero, finite gradient, never NaN.
"""
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.distance_maps import DEFAULT_FOLDERS, DEFAULT_LAMBDA_C, DEFAULT_LAMBDA_S, VOC_LAMBDA_C, VOC_LAMBDA_S
from data.transforms import TrainTransform
from data.voc import SegmentationDataset, build_voc, register_dataset
from models import losses
from utils import UserError

log = logging.getLogger("ailab")

DEFAULT_LABEL_SMOOTH = 0.1
ENTROPY_NORMS = ("weight", "paper")
# The maps each training mode loads: target key -> the args attribute that names its folder under --dataset_path,
# or FULL_MASKS for the dataset's own full labels (SegmentationClass/). "Full" trains the scribble term on the full
# masks: the fully supervised upper bound of the same recipe.
FULL_MASKS = "full_masks"
FULL_MASK_FOLDER = "SegmentationClass"
_SOURCES = {"scribble": "train_path", "pseudo": "pesudo_path", "dist_s": "distancemap_s", "dist_c": "distancemap_c"}


def _loads(*keys):
    return {key: _SOURCES[key] for key in keys}


SCRIBBLE_MODES = {
    "ScribbleOnly": _loads("scribble"),
    "PseudoOnly": _loads("pseudo"),
    "ScribblePseudo": _loads("scribble", "pseudo"),
    "ScribblePseudoDs": _loads("scribble", "pseudo", "dist_s"),
    "ScribblePseudoDc": _loads("scribble", "pseudo", "dist_c"),
    "ScribblePseudoDsDc": _loads("scribble", "pseudo", "dist_s", "dist_c"),
    "Full": {"scribble": FULL_MASKS},
}

# Term name -> (weight flag, target key, what that target is). "lorm" has no target: the model returns its value.
TERMS = {
    "segs": ("--l_segs", "scribble", "scribble labels (--train_path)"),
    "pesudo": ("--l_pesudo", "pseudo", "pseudo labels (--pesudo_path)"),
    "lorm": ("--l_lorm", None, "LoRM loss (a *_lorm --model_type returns one)"),
    "ds": ("--l_ds", "dist_s", "scribble distance maps (--distancemap_s)"),
    "dc": ("--l_dc", "dist_c", "boundary distance maps (--distancemap_c)"),
}


# ---------------------------------------------------------------------------------------------
# Losses: logits (N, C, H, W); labels (N, H, W) int64 with IGNORE_INDEX; maps (N, H, W) uint8 or float 0..255.

def _check_shape(what, logits, target):
    if logits.dim() != 4 or tuple(target.shape) != (logits.shape[0], *logits.shape[2:]):
        raise UserError(f"{what} of shape {tuple(target.shape)} does not match logits of shape "
                        f"{tuple(logits.shape)}; expected (N, H, W) for logits (N, C, H, W)")


def partial_ce(logits, scribble):
    """Mean cross-entropy over the scribble pixels only; 0 when there are none."""
    _check_shape("scribble label", logits, scribble)
    scores, labels, keep = losses.labelled_pixels(logits, scribble)
    per_pixel = F.cross_entropy(scores, labels.long(), reduction="none")
    return (per_pixel * keep).sum() / keep.sum().clamp(min=1)


def pseudo_ce(logits, pseudo, label_smooth=DEFAULT_LABEL_SMOOTH):
    """Mean cross-entropy over the labelled pseudo-label pixels against (1 - e) one-hot + e / C; 0 when none.

    Smoothing keeps the network from trusting the noisy pseudo labels completely: per pixel the loss is
    (1 - e) (-log p_y) + e mean_c(-log p_c).
    """
    _check_shape("pseudo label", logits, pseudo)
    scores, labels, keep = losses.labelled_pixels(logits, pseudo)
    per_pixel = F.cross_entropy(scores, labels.long(), reduction="none", label_smoothing=label_smooth)
    return (per_pixel * keep).sum() / keep.sum().clamp(min=1)


def weighted_entropy(logits, dist_map, norm="weight"):
    """sum_p w(p) H(softmax(logits(p))) / Z, w = dist_map / 255; 0 when every weight is 0.

    Z is sum_p w(p) with norm "weight" (a weighted mean of the entropy), or, with norm "paper" as the method's
    code divides, the number of pixels whose w(p) H(p) is not 0 (at least 1). Pixels of weight 0 are multiplied
    by 0 (not indexed out, which would make a GPU wait for the count), so they add nothing and get exactly zero
    gradient.
    """
    _check_shape("distance map", logits, dist_map)
    weight = dist_map.to(device=logits.device, dtype=torch.float32) / 255.0
    log_p = logits.float().log_softmax(1)
    entropy = -(log_p.exp() * log_p).sum(1)
    weighted = weight * entropy
    if norm == "paper":
        return weighted.sum() / torch.count_nonzero(weighted).clamp(min=1)
    return weighted.sum() / weight.sum().clamp(min=1e-12)


# ---------------------------------------------------------------------------------------------
# The criterion

class ScribbleCriterion(nn.Module):
    """Weighted sum of the scribble method's terms; weights is {"segs", "pesudo", "lorm", "ds", "dc"} -> float.

    A missing key weighs 0. Only terms with a non-zero weight are computed. Calling it returns
    (total, {term: detached value}) like losses.Criterion; `target` is a dict that may hold "scribble",
    "pseudo", "dist_s" and "dist_c" tensors, and `lorm_loss` is the model's own LoRM loss.
    """

    def __init__(self, weights, label_smooth=DEFAULT_LABEL_SMOOTH, entropy_norm="weight"):
        super().__init__()
        if entropy_norm not in ENTROPY_NORMS:
            raise UserError(f"--entropy_norm {entropy_norm!r} is unknown; expected one of {', '.join(ENTROPY_NORMS)}")
        self.entropy_norm = entropy_norm
        unknown = sorted(set(weights) - set(TERMS))
        if unknown:
            raise UserError(f"scribble loss weights name unknown terms {unknown}; expected some of {list(TERMS)}")
        self.weights = {}
        for name in TERMS:
            weight = weights.get(name, 0.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                    or weight < 0:
                raise UserError(f"{TERMS[name][0]} {weight!r} is not valid; expected a finite number >= 0 "
                                "(0 turns the term off)")
            if weight:
                self.weights[name] = float(weight)
        if not self.weights:
            raise UserError("every scribble loss weight is 0; expected at least one of "
                            + ", ".join(flag for flag, _, _ in TERMS.values()) + " above 0")
        if isinstance(label_smooth, bool) or not isinstance(label_smooth, (int, float)) \
                or not 0 <= label_smooth < 1:
            raise UserError(f"--label_smooth {label_smooth!r} is not valid; expected a number in [0, 1)")
        self.label_smooth = float(label_smooth)

    def term(self, name, logits, target, lorm_loss):
        flag, key, what = TERMS[name]
        value = lorm_loss if key is None else target.get(key)
        if value is None:
            source = "the model returned no" if key is None else "the batch has no"
            raise UserError(f"{flag} is {self.weights[name]:g} but {source} {what}; provide it or set {flag} 0")
        if name == "segs":
            return partial_ce(logits, value)
        if name == "pesudo":
            return pseudo_ce(logits, value, self.label_smooth)
        if name == "lorm":
            return value
        return weighted_entropy(logits, value, self.entropy_norm)

    def forward(self, logits, target, lorm_loss=None):
        values = {name: self.term(name, logits, target, lorm_loss) for name in self.weights}
        total = sum(self.weights[name] * value for name, value in values.items())
        return total, {name: value.detach().float() for name, value in values.items()}


# ---------------------------------------------------------------------------------------------
# Flags and modes

def add_scribble_args(parser):
    g = parser.add_argument_group("scribble")
    g.add_argument("--train_path", default=DEFAULT_FOLDERS["train_path"],
                   help="folder of scribble label PNGs under --dataset_path (255 = unlabelled)")
    g.add_argument("--pesudo_path", "--pseudo_path", dest="pesudo_path", default=DEFAULT_FOLDERS["pesudo_path"],
                   help="folder of pseudo label PNGs (e.g. from CAMs) under --dataset_path (255 = uncertain)")
    g.add_argument("--distancemap_s", default=DEFAULT_FOLDERS["distancemap_s"],
                   help="folder of uint8 distance maps near scribbles under --dataset_path "
                        "(tools/make_distance_maps.py writes them)")
    g.add_argument("--distancemap_c", default=DEFAULT_FOLDERS["distancemap_c"],
                   help="folder of uint8 distance maps from pseudo-label boundaries under --dataset_path")
    for name, what in (("segs", "partial cross-entropy on scribbles"), ("pesudo", "cross-entropy on pseudo labels"),
                       ("lorm", "the model's LoRM loss"), ("ds", "entropy weighted by --distancemap_s"),
                       ("dc", "entropy weighted by --distancemap_c")):
        flags = [f"--l_{name}"] + (["--l_pseudo"] if name == "pesudo" else [])
        g.add_argument(*flags, dest=f"l_{name}", type=float, default=1.0, help=f"weight of {what}; 0 turns it off")
    g.add_argument("--lorm", default="consensus", choices=["consensus", "paper"],
                   help="LoRM of the *_lorm models: consensus (foreground keys, detached values, 1 - cosine) or "
                        "paper (the method's code: all keys, cosine attention, gamma, squared error)")
    g.add_argument("--entropy_norm", default="weight", choices=list(ENTROPY_NORMS),
                   help="the ds/dc terms' denominator: weight (sum of the map's weights: a weighted mean) or paper "
                        "(the number of pixels with a non-zero weighted entropy, as the method's code divides)")
    g.add_argument("--label_smooth", type=float, default=DEFAULT_LABEL_SMOOTH,
                   help="label smoothing of the pseudo-label cross-entropy, in [0, 1)")
    g.add_argument("--lambda_s", type=float, default=DEFAULT_LAMBDA_S,
                   help=f"distance maps: dist_s falls to 0 at 255/sqrt(lambda_s) px from a scribble; the default "
                        f"suits the built-in 128 px data, use {VOC_LAMBDA_S:g} for VOC-size images")
    g.add_argument("--lambda_c", type=float, default=DEFAULT_LAMBDA_C,
                   help=f"distance maps: dist_c reaches 255 at 255/sqrt(lambda_c) px from a pseudo-label boundary; "
                        f"the default suits the built-in data, use {VOC_LAMBDA_C:g} for VOC-size images")
    return g


def _check_mode(mode):
    if mode not in SCRIBBLE_MODES:
        raise UserError(f"scribble mode '{mode}' is unknown; expected one of {', '.join(SCRIBBLE_MODES)}")
    return SCRIBBLE_MODES[mode]


def mode_folders(args, mode):
    """{target key: folder relative to --dataset_path} of the maps that `mode` loads."""
    return {key: FULL_MASK_FOLDER if source == FULL_MASKS else getattr(args, source)
            for key, source in _check_mode(mode).items()}


def mode_weights(args, mode):
    """The loss weights from the --l_* flags, with the terms whose maps `mode` does not load set to 0.

    --l_lorm is kept as given: its value comes from the model, not from a map.
    """
    loaded = _check_mode(mode)
    return {name: (getattr(args, f"l_{name}") if key is None or key in loaded else 0.0)
            for name, (_, key, _) in TERMS.items()}


def build_scribble_criterion(args, mode, model_has_lorm):
    """The criterion for `mode`; .uses_lorm says whether the model must be given the pseudo labels.

    A model without LoRM cannot supply --l_lorm's term, so the weight is dropped with a note.
    """
    weights = mode_weights(args, mode)
    if weights["lorm"] and not model_has_lorm:
        log.info(f"--l_lorm ignored: model {args.model_type} has no LoRM (the *_lorm models have)")
        weights["lorm"] = 0.0
    elif weights["lorm"] and "pseudo" not in SCRIBBLE_MODES[mode]:
        log.info(f"--l_lorm ignored: --dataset {mode} loads no pseudo labels for LoRM")
        weights["lorm"] = 0.0
    criterion = ScribbleCriterion(weights, args.label_smooth, getattr(args, "entropy_norm", "weight"))
    criterion.uses_lorm = "lorm" in criterion.weights
    return criterion


# ---------------------------------------------------------------------------------------------
# Datasets: one registered name per mode. Training loads the mode's maps; validation the full masks.

WEIGHT_MAPS = ("dist_s", "dist_c")


def scribble_dataset_builder(mode):
    def build(args, root, split, train):
        if not train:
            return build_voc(args, root, split, train=False)
        transform = TrainTransform(args.crop_size, args.scale_range, args.hflip_prob, weight_maps=WEIGHT_MAPS)
        return SegmentationDataset(root, split, transform, args.numclasses, check_contents=True,
                                        maps=mode_folders(args, mode), weight_maps=WEIGHT_MAPS)
    return build


for _mode in SCRIBBLE_MODES:
    register_dataset(_mode)(scribble_dataset_builder(_mode))
