"""Test-only plugin: loss `stall_at`, cross-entropy that sleeps AILAB_STALL_SECONDS on its AILAB_STALL_CALL-th call
(1-based) on the rank in AILAB_STALL_RANK, as a rank stuck in a data loader or a driver would; the other ranks
then wait in the next collective. Used with --plugin tests/stall_plugin.py --loss stall_at."""
import os
import time

from models.losses import cross_entropy, register_loss

_calls = [0]


@register_loss("stall_at")
def build_stall_at(args):
    call, rank = int(os.environ.get("AILAB_STALL_CALL", "1")), int(os.environ.get("AILAB_STALL_RANK", "1"))

    def stall_at(logits, target):
        _calls[0] += 1
        if _calls[0] == call and int(os.environ.get("RANK", "0")) == rank:
            time.sleep(float(os.environ.get("AILAB_STALL_SECONDS", "60")))
        return cross_entropy(logits, target)

    return stall_at
