"""--pretrained NAME: torchvision's published weights by name, through torchvision's weights API and torch's hub cache.

A NAME is `DEFAULT`, a weights name such as `IMAGENET1K_V1`, or the qualified `ResNet50_Weights.IMAGENET1K_V2`;
anything else is a local file (models/pretrained.py). The architecture comes from the model: a classifier's own
torchvision architecture, a segmentation model's ResNet backbone.

The file is torchvision's: `weights.get_state_dict` downloads it once (with its progress bar) into
`<torch hub dir>/checkpoints` (TORCH_HOME, default ~/.cache/torch) and reads it from there afterwards. Under DDP the
first process of each machine fetches it while the others wait, so a machine downloads it once. Without network and
without the file, the run stops with one line that names the file, the folder and how to put it there.
"""
import os
import re
from urllib.parse import urlparse

import torch

from core.distributed import barrier
from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from utils import UserError, first_line

WEIGHTS_NAME = re.compile(r"(?:[A-Za-z0-9_]+_Weights\.)?[A-Z][A-Z0-9_]*")


def is_weights_name(spec):
    """True for DEFAULT, IMAGENET1K_V1, ResNet50_Weights.IMAGENET1K_V2 (unless a file of that name exists)."""
    return isinstance(spec, str) and bool(WEIGHTS_NAME.fullmatch(spec)) and not os.path.exists(spec)


def resolve(spec, arch, model_type):
    """The torchvision weights enum member that `spec` names for architecture `arch` (None: the model has none)."""
    import torchvision
    if arch is None:
        raise UserError(f"--pretrained {spec}: model {model_type} has no torchvision architecture with published "
                        f"weights; expected a local weights file (a state dict or a train.py checkpoint)")
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError) as e:
        raise UserError(f"--pretrained {spec}: torchvision publishes no weights for {arch} ({first_line(e)}); "
                        f"expected a local weights file") from e
    choices = f"DEFAULT or one of {', '.join(member.name for member in enum)} (e.g. {enum.__name__}.DEFAULT)"
    owner, _, name = spec.rpartition(".")
    if owner and owner != enum.__name__:
        raise UserError(f"--pretrained {spec}: {owner} are not {arch}'s weights; expected {choices}")
    if name == "DEFAULT":
        return enum.DEFAULT
    if name not in enum.__members__:
        raise UserError(f"--pretrained {spec}: {arch} has no weights named {name}; expected {choices}")
    return enum[name]


def cache_file(weights):
    """Where torch's hub keeps `weights` (the file name is the URL's last part, as load_state_dict_from_url has it)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))


def fetch(weights, ctx):
    """The state dict of `weights`: downloaded by the first process of each machine, then read by every process."""
    path = cache_file(weights)
    failure = None
    if ctx.local_rank == 0 and not os.path.isfile(path):
        try:
            weights.get_state_dict(progress=ctx.is_main, map_location="cpu", weights_only=True)
        except Exception as e:  # urllib's URLError/HTTPError, a socket timeout, a full disk, a plugin's block...
            failure = first_line(e)
    barrier()  # every process waits for its machine's download
    if not os.path.isfile(path):
        why = f"could not be downloaded ({failure})" if failure else "was not downloaded by this machine's first process"
        raise UserError(f"--pretrained {weights_label(weights)}: {os.path.basename(path)} is not in torch's hub cache "
                        f"{os.path.dirname(path)} and {why}; expected that file there: download {weights.url} where "
                        f"there is network and copy it into that folder (or point TORCH_HOME at a cache that has "
                        f"hub/checkpoints/{os.path.basename(path)})")
    try:
        return weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file under the expected name
        raise UserError(f"--pretrained {weights_label(weights)}: {path} could not be read ({first_line(e)}); "
                        f"expected torchvision's weights file: delete it so that it downloads again") from e


def weights_label(weights):
    return f"{type(weights).__name__}.{weights.name}"


def preprocessing(weights):
    """(mean, std, resize, crop) the weights were trained with, from their transforms (None where they have none)."""
    try:
        preset = weights.transforms()
    except Exception:  # a preset that needs arguments: no values to offer
        return None, None, None, None
    sides = [getattr(preset, key, None) for key in ("resize_size", "crop_size")]
    resize, crop = [side[0] if isinstance(side, (list, tuple)) and side else side for side in sides]
    mean, std = getattr(preset, "mean", None), getattr(preset, "std", None)
    return (list(mean) if mean is not None else None, list(std) if std is not None else None, resize, crop)


def resolve_normalisation(args, weights=None):
    """--mean/--std left unset (None) take the weights' values, else ImageNet's; the line to log, or None."""
    mean, std, resize, crop = preprocessing(weights) if weights is not None else (None, None, None, None)
    parts = []
    for flag, published, default in (("mean", mean, IMAGENET_MEAN), ("std", std, IMAGENET_STD)):
        origin = f"--{flag}"
        if getattr(args, flag) is None:
            setattr(args, flag, list(published or default))
            origin = "the weights'" if published else "ImageNet's"
        parts.append(f"{flag} {fmt(getattr(args, flag))} ({origin})")
    if weights is None:
        return None
    trained = f"; the weights were trained on {crop} px crops of images resized to {resize} px" if crop else ""
    return f"pretrained {weights_label(weights)}: normalisation " + ", ".join(parts) + trained


def imagenet_normalisation_note(weights=None):
    """For transforms that always normalise with ImageNet's values: whether the weights were trained with them."""
    mean, std, _, _ = preprocessing(weights) if weights is not None else (None, None, None, None)
    if mean is None or std is None:
        return None
    same = [round(v, 4) for v in mean + std] == [round(v, 4) for v in IMAGENET_MEAN + IMAGENET_STD]
    return (f"pretrained {weights_label(weights)}: trained with mean {fmt(mean)}, std {fmt(std)}; the transforms "
            f"normalise with ImageNet's {fmt(IMAGENET_MEAN)}, {fmt(IMAGENET_STD)}" + ("" if same else ", which differ"))


def fmt(values):
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"
