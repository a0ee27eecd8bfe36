"""Test plugin: records every call into torch.distributed's collectives (--plugin tests/collective_probe.py).

Each call appends one JSON line to $AILAB_COLLECTIVE_LOG/rank<RANK>.jsonl: the operation, the file that called it,
the process group's backend, and the device of every tensor it was handed (and of the `device` an object
collective packs its bytes on). tests/test_collectives.py checks that only distributed.py calls them, and that
each tensor was on the device the backend requires.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

OPS = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "gather", "scatter", "reduce",
       "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier",
       "broadcast_object_list", "gather_object", "all_gather_object", "scatter_object_list", "send", "recv")


def _devices(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield str(value.device)
        elif isinstance(value, torch.device):
            yield str(value)
        elif isinstance(value, (list, tuple)):
            yield from _devices(value)


def _wrap(name, op):
    def recorded(*args, **kwargs):
        caller = os.path.relpath(sys._getframe(1).f_code.co_filename)
        record = {"op": name, "caller": caller, "backend": dist.get_backend() if dist.is_initialized() else None,
                  "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
                  "devices": sorted(set(_devices([*args, *kwargs.values()])))}
        path = os.path.join(os.environ["AILAB_COLLECTIVE_LOG"], f"rank{os.environ.get('RANK', '0')}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return op(*args, **kwargs)
    recorded.probed = True
    return recorded


for _name in OPS:
    _op = getattr(dist, _name, None)
    if _op is not None and not getattr(_op, "probed", False):
        setattr(dist, _name, _wrap(_name, _op))
