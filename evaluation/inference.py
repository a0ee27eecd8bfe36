"""Prediction for test.py and infer.py: class probabilities over scales, flips and sliding windows.

Every path returns softmax probabilities at the input's size, so results of any mix of scales, flips and
windows can be averaged: windows are averaged per pixel by how many windows cover it, then flips, then scales.
"""
import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engine.recipe import resolve_amp
from utils import UserError

log = logging.getLogger("ailab")


@dataclass
class PredictOptions:
    scales: Sequence[float] = (1.0,)
    base_size: Optional[int] = None    # the long side that scale 1.0 means; None: the image's own
    flip: bool = False
    sliding: bool = False
    crop_size: int = 512               # window side for sliding
    stride_rate: float = 2 / 3         # window step as a fraction of crop_size
    amp_dtype: Optional[torch.dtype] = None

    def as_dict(self):
        """The settings as plain values, for metrics.json."""
        return {"scales": list(self.scales), "base_size": self.base_size, "flip": self.flip, "sliding": self.sliding,
                "crop_size": self.crop_size if self.sliding else None,
                "stride_rate": self.stride_rate if self.sliding else None,
                "amp_dtype": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else None}

    def describe(self):
        parts = [f"scales {' '.join(f'{s:g}' for s in self.scales)}"
                 + (f" of long side {self.base_size}" if self.base_size else "")]
        if self.flip:
            parts.append("horizontal flip")
        if self.sliding:
            parts.append(f"sliding {self.crop_size} px windows, stride {window_stride(self)} px")
        if self.amp_dtype is not None:
            parts.append(f"autocast {str(self.amp_dtype).replace('torch.', '')}")
        return ", ".join(parts)


def add_inference_args(parser, crop_help="window side in pixels for --sliding"):
    """The prediction flags that test.py and infer.py share."""
    g = parser.add_argument_group("prediction")
    g.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                   help="average over these scales of --base_size, e.g. --scales 0.75 1 1.25")
    g.add_argument("--base_size", type=int, default=None,
                   help="long side in pixels that scale 1 means; default: each image's own size")
    g.add_argument("--flip", action="store_true", help="also predict the mirrored image and average")
    g.add_argument("--sliding", action="store_true", help="predict in overlapping --crop_size windows")
    g.add_argument("--crop_size", type=int, default=None, help=crop_help)
    g.add_argument("--stride_rate", type=float, default=2 / 3,
                   help="window step as a fraction of --crop_size (0 < r <= 1)")
    g.add_argument("--amp", action="store_true", help="run the model under torch.autocast")
    g.add_argument("--amp_dtype", default="bfloat16", choices=["bfloat16", "float16"],
                   help="autocast type; float16 needs CUDA")
    return g


def options_from_args(args, device, default_crop=512):
    """PredictOptions from the shared flags, each checked; `default_crop` is the checkpoint's training crop."""
    if any(not (math.isfinite(s) and s > 0) for s in args.scales):
        raise UserError(f"--scales {' '.join(f'{s:g}' for s in args.scales)}: expected positive numbers")
    for name in ("base_size", "crop_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} {value}: expected a positive number of pixels")
    if not 0 < args.stride_rate <= 1:
        raise UserError(f"--stride_rate {args.stride_rate:g}: expected a fraction in (0, 1]")
    return PredictOptions(scales=tuple(args.scales), base_size=args.base_size, flip=args.flip,
                          sliding=args.sliding, crop_size=args.crop_size or default_crop,
                          stride_rate=args.stride_rate, amp_dtype=resolve_amp(args, device))


# ---------------------------------------------------------------------------------------------
# The prediction itself. Images are normalised float batches N x 3 x H x W; probabilities N x K x H x W.

def resize(x, size):
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def scaled_size(height, width, scale, base_size=None):
    """(h, w) with the long side at scale x base_size (the image's own long side without one), aspect kept."""
    long_side = (base_size or max(height, width)) * scale
    ratio = long_side / max(height, width)
    return max(1, round(height * ratio)), max(1, round(width * ratio))


def window_stride(options):
    return max(1, math.ceil(options.crop_size * options.stride_rate))


def window_starts(length, crop, stride):
    """Window offsets that cover 0..length; the last window ends exactly at the edge (no window hangs over)."""
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop, stride))
    return starts + [length - crop]


def softmax_probs(model, image, options):
    """Softmax of one forward pass, flipped and averaged with --flip. Scores are float32 even under autocast."""
    with autocast(image.device, options.amp_dtype):
        probs = model(image).float().softmax(1)
        if options.flip:
            probs = (probs + model(image.flip(-1)).float().softmax(1).flip(-1)) / 2
    return probs


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def sliding_probs(model, image, options):
    """Average of window predictions per pixel.

    A window that sticks out of the image (or an image smaller than the window) is padded with 0, the mean
    colour after normalising, so the model sees its usual input size; only the window's valid region is kept,
    so the padding never reaches the result.
    """
    n, _, height, width = image.shape
    crop, stride = options.crop_size, window_stride(options)
    total, count = None, torch.zeros(1, 1, height, width, device=image.device)
    for y in window_starts(height, crop, stride):
        for x in window_starts(width, crop, stride):
            window = image[:, :, y:y + crop, x:x + crop]
            valid_h, valid_w = window.shape[-2:]
            window = F.pad(window, (0, crop - valid_w, 0, crop - valid_h))
            probs = softmax_probs(model, window, options)[:, :, :valid_h, :valid_w]
            if total is None:
                total = torch.zeros(n, probs.shape[1], height, width, device=image.device)
            total[:, :, y:y + valid_h, x:x + valid_w] += probs
            count[:, :, y:y + valid_h, x:x + valid_w] += 1
    return total / count


@torch.no_grad()
def predict_probs(model, image, options=None):
    """Class probabilities N x K x H x W for a batch at its own size, averaged over the options' scales,
    flips and windows. The model is called as given (put it in eval mode first)."""
    options = options or PredictOptions()
    height, width = image.shape[-2:]
    total = None
    for scale in options.scales:
        scaled = resize(image, scaled_size(height, width, scale, options.base_size))
        probs = sliding_probs(model, scaled, options) if options.sliding else softmax_probs(model, scaled, options)
        probs = resize(probs, (height, width))
        total = probs if total is None else total + probs
    return total / len(options.scales)


# ---------------------------------------------------------------------------------------------
# What both scripts write about a prediction.

def overlay(image, mask, palette, alpha=0.5):
    """RGB uint8 image blended with the palette colours of its mask; ignore (255) pixels stay as they are."""
    colours = palette[mask].astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha) + colours * alpha
    keep = mask == 255
    out[keep] = image[keep]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def class_fractions(mask, numclasses):
    """Fraction of the mask's pixels in each class (they sum to 1)."""
    counts = np.bincount(mask.ravel(), minlength=numclasses)[:numclasses]
    return (counts / max(mask.size, 1)).tolist()


def read_class_names(path, numclasses):
    """One class name per line of `path` (blank lines skipped); the count must match the model's classes."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"--class_names {path}: cannot read it ({e.strerror or e}); expected a text file "
                        f"with one class name per line")
    if len(names) != numclasses:
        raise UserError(f"--class_names {path} has {len(names)} names; expected {numclasses}, one per line "
                        f"(the checkpoint's model has {numclasses} classes)")
    return names
