"""--pretrained FILE: initial weights from a local file (or torchvision's, models/weights.py), with a report of what
matched.

The file may hold this model's weights (a train.py checkpoint, or a bare or wrapped state dict, with or
without DDP's `module.` and torch.compile's `_orig_mod.` prefixes) or a torchvision ResNet ImageNet state
dict, which goes into `model.backbone`.
"""
import os

import torch

from utils import UserError, first_line, torch_load_cpu, unwrap_state_dict

# The ImageNet classifier of a torchvision ResNet: expected in such a file, and never part of a backbone.
CLASSIFIER_KEYS = ("fc.weight", "fc.bias")


def read_state_dict(path):
    """The tensor dict inside `path` (weights_only load), unwrapped from a checkpoint if needed."""
    if not os.path.isfile(path):
        raise UserError(f"--pretrained {path} does not exist; expected a local .pth file or torchvision's weights "
                        f"by name (DEFAULT, IMAGENET1K_V1, ResNet50_Weights.IMAGENET1K_V2)")
    try:
        obj = torch_load_cpu(path)
    except Exception as e:  # truncated, corrupt, or pickled classes that weights_only refuses
        raise UserError(f"--pretrained {path} could not be read ({first_line(e)}); expected a state dict or checkpoint") from e
    for key in ("model", "state_dict"):  # a train.py checkpoint, or the common {"state_dict": ...} wrapper
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"--pretrained {path} holds no state dict; expected parameter names mapped to tensors")
    return unwrap_state_dict(obj)


def match(target, state, ignore=()):
    """Compare a file's tensors with a module's state dict: (loadable, missing, unexpected, mismatched)."""
    own = target.state_dict()
    loadable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in state if k in own and own[k].shape != state[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and k not in ignore]
    return loadable, missing, unexpected, mismatched


def load_pretrained(model, path, strict=False, state=None):
    """Load what fits from `path` (or `state`, which `path` then names) into `model` (or its backbone); returns a
    one-line report.

    With `strict`, any missing, unexpected or shape-mismatched tensor is an error instead.
    """
    state = read_state_dict(path) if state is None else unwrap_state_dict(state)
    target, where = model, "model"
    loadable, missing, unexpected, mismatched = match(model, state)
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        # A backbone-only file (torchvision names: conv1.weight, layer1.0...) fits model.backbone better.
        candidate = match(backbone, state, ignore=CLASSIFIER_KEYS)
        if len(candidate[0]) > len(loadable):
            target, where = backbone, "backbone"
            loadable, missing, unexpected, mismatched = candidate
    if not loadable:
        raise UserError(f"--pretrained {path}: none of its {len(state)} tensors fits this model "
                        f"(its names look like {', '.join(list(state)[:3])}); expected this model's weights "
                        f"or a torchvision ResNet state dict of the same depth (--layers)")
    report = (f"pretrained {path} -> {where}: loaded {len(loadable)}/{len(target.state_dict())} tensors; "
              f"missing {len(missing)}{summary(missing)}, unexpected {len(unexpected)}{summary(unexpected)}, "
              f"shape mismatch {len(mismatched)}{summary(mismatched)}")
    if strict and (missing or unexpected or mismatched):
        raise UserError(f"--strict_load: {report}")
    target.load_state_dict(loadable, strict=False)
    return report


def summary(keys, shown=3):
    if not keys:
        return ""
    return " (" + ", ".join(keys[:shown]) + (f", ... {len(keys) - shown} more" if len(keys) > shown else "") + ")"
