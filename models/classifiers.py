"""Image classifiers from torchvision, chosen by architecture name, plus loading of local weight files.

Every torchvision classification architecture can be built (randomly initialised; nothing is ever downloaded).
"resnet" is a family alias that takes its depth from `layers`. ResNet-class models (resnet*, resnext*,
wide_resnet*) can swap the ImageNet stem (7x7 stride-2 conv + max-pool) for the 3x3 stride-1 stem used for
small images such as CIFAR, so a 32 px input still reaches the last stage as a 4x4 map rather than 1x1.

torchvision is imported inside the functions: importing it takes over a second, and `--help` should not wait.
"""
import difflib
import os

import torch
from torch import nn

from utils import UserError, first_line, torch_load_cpu

RESNET_DEPTHS = (18, 34, 50, 101, 152)
STEMS = ("auto", "imagenet", "small")
# Architectures that torchvision builds with its ResNet class, and so have `conv1` and `maxpool` to replace.
RESNET_PREFIXES = ("resnet", "resnext", "wide_resnet")
# These two default to auxiliary classifiers (forward returns a namedtuple in training) and warn about
# init_weights when built without weights; with these options they behave like every other classifier.
EXTRA_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
                "inception_v3": {"aux_logits": False, "init_weights": True}}


def classifier_names():
    """Sorted names of torchvision's classification architectures, with the "resnet" family alias."""
    import torchvision
    return sorted(set(torchvision.models.list_models(module=torchvision.models)) | {"resnet"})


def resolve_arch(name, layers):
    """The torchvision architecture name for `name`: "resnet" becomes f"resnet{layers}", others stay as they are."""
    names = classifier_names()
    if name not in names:
        close = difflib.get_close_matches(str(name), names, n=3) or [n for n in names if n.startswith(str(name))][:3]
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise UserError(f"unknown classifier architecture {name!r}{hint}; expected any torchvision classification "
                        f"architecture name, e.g. resnet50, efficientnet_b0, vit_b_16, or resnet with --layers")
    if name == "resnet":
        if layers not in RESNET_DEPTHS:
            raise UserError(f"--layers {layers} is not a ResNet depth; expected one of "
                            + ", ".join(map(str, RESNET_DEPTHS)))
        return f"resnet{layers}"
    return name


def is_resnet_class(arch):
    """Whether torchvision builds `arch` with its ResNet class."""
    return arch.startswith(RESNET_PREFIXES)


def uses_small_stem(arch, stem, image_size):
    """Whether `arch` gets the small-image stem: "small" asks for it, "auto" picks it for ResNets at <= 64 px."""
    if stem not in STEMS:
        raise UserError(f"--stem {stem}: expected one of {', '.join(STEMS)}")
    if stem == "small" and not is_resnet_class(arch):
        raise UserError(f"--stem small does not apply to {arch}; only ResNet-class architectures "
                        f"({', '.join(p + '*' for p in RESNET_PREFIXES)}) support it")
    if stem == "auto":
        return is_resnet_class(arch) and image_size <= 64
    return stem == "small"


def small_stem(model):
    """Replace a ResNet's 7x7 stride-2 conv and max-pool by a 3x3 stride-1 conv, keeping full resolution."""
    old = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits convs
    model.maxpool = nn.Identity()
    return model


def build_classifier(name, num_classes, layers=18, stem="auto", image_size=224):
    """A randomly initialised torchvision classifier with `num_classes` outputs (see the module docstring)."""
    import torchvision
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"--numclasses {num_classes}: expected a whole number of classes, at least 1")
    arch = resolve_arch(name, layers)
    small = uses_small_stem(arch, stem, image_size)
    extra = dict(EXTRA_KWARGS.get(arch, {}))
    if arch.startswith("vit_"):
        patch = int(arch.rsplit("_", 1)[1])  # vit_b_16 -> 16
        if image_size % patch:
            raise UserError(f"image size {image_size} does not suit {arch}; "
                            f"expected a multiple of its patch size {patch}")
        extra["image_size"] = image_size
    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **extra)
    except Exception as e:
        raise UserError(f"could not build {arch} with {num_classes} classes: {first_line(e)}") from e
    return small_stem(model) if small else model


def classifier_head_keys(model):
    """State-dict keys of the final classification layer: the last Linear, or the last Conv2d when there is none."""
    for kind in (nn.Linear, nn.Conv2d):
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, kind)]
        if layers:
            name, layer = layers[-1]
            return [f"{name}.{key}" if name else key for key in layer.state_dict()]
    return []


def read_weights(path):
    """The state dict stored in a local file at `path`, unwrapped and without DDP / torch.compile prefixes."""
    expected = "expected a local torchvision state dict file, or torchvision's weights by name (e.g. DEFAULT)"
    if not os.path.isfile(path):
        raise UserError(f"weights file {path} does not exist; {expected}")
    try:
        obj = torch_load_cpu(path)
    except Exception as e:
        raise UserError(f"weights file {path} could not be read ({first_line(e)}); {expected}") from e
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"weights file {path} holds no state dict; {expected}, parameter names mapped to tensors")
    state = {}
    for key, value in obj.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        state[key] = value
    return state


def first_names(keys):
    """Up to three names and a count of the rest, for a one-line report."""
    keys = list(keys)
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return ", ".join(keys[:3]) + more


def load_classifier_weights(model, path, strict=False, state=None):
    """Copy the tensors in `path` (or `state`, which `path` then names) whose name and shape match into `model`;
    return a one-line report.

    Tensors whose shape differs (a classifier for another class count, conv1 under the small stem) keep their
    initial values; a re-initialised classifier is named. With strict=True any missing, unexpected or mismatched
    tensor raises UserError instead.
    """
    state = read_weights(path) if state is None else state
    own = model.state_dict()
    loadable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in state if k in own and own[k].shape != state[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if not loadable:
        raise UserError(f"weights file {path} has no tensor that matches this model by name and shape; "
                        f"expected a state dict of the same torchvision architecture")
    model.load_state_dict(loadable, strict=False)
    report = f"loaded {len(loadable)} of {len(own)} tensors from {path}"
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            report += f"; {label}: {first_names(keys)}"
    head = [k for k in classifier_head_keys(model) if k.endswith("weight") and k in state and k not in loadable]
    if head:
        report += (f"; the classifier {head[0].rsplit('.', 1)[0]} is re-initialised for {own[head[0]].shape[0]} "
                   f"classes (the weights have {state[head[0]].shape[0]})")
    if strict and (missing or unexpected or mismatched):
        raise UserError(report)
    return report
