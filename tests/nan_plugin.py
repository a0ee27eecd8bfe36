"""Test-only plugin: loss `nan_at`, cross-entropy except on the calls listed in AILAB_NAN_CALLS (1-based, counted
per process) on the rank in AILAB_NAN_RANK, where it is NaN. Used with --plugin tests/nan_plugin.py --loss nan_at."""
import os

import torch

from models.losses import cross_entropy, register_loss

_calls = [0]


@register_loss("nan_at")
def build_nan_at(args):
    bad_calls = {int(c) for c in os.environ.get("AILAB_NAN_CALLS", "").split(",") if c}
    bad_rank = int(os.environ.get("AILAB_NAN_RANK", "0"))

    def nan_at(logits, target):
        _calls[0] += 1
        loss = cross_entropy(logits, target)
        if _calls[0] in bad_calls and int(os.environ.get("RANK", "0")) == bad_rank:
            return loss * torch.tensor(float("nan"))
        return loss

    return nan_at
