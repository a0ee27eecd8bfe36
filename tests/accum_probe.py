"""Run under torchrun (gloo, CPU): count DDP's gradient all-reduces during one epoch of engine.train_one_epoch.

A communication hook wraps the default all-reduce and counts its calls. Writes per rank
the counts for --accum_steps 1 and 2 over the same 5 batches, and a checksum of the final parameters, to OUT_DIR/rank<r>.json (argv[1]).
"""
import json
import os
import sys
from argparse import Namespace

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine import loop as engine  # noqa: E402
from engine import faults  # noqa: E402
from engine import recipe  # noqa: E402
from core import distributed  # noqa: E402
from engine.records import Recorder  # noqa: E402


def epoch_with_accum(accum, ctx):
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                                        torch.nn.Conv2d(8, 4, 1)))
    calls = [0]

    def counting_hook(state, bucket):
        calls[0] += 1
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_hook)
    generator = torch.Generator().manual_seed(100 + ctx.rank)  # each rank its own data, as with a sampler
    batches = [(torch.randn(2, 3, 8, 8, generator=generator), torch.randint(0, 4, (2, 8, 8), generator=generator))
               for _ in range(5)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = Namespace(accum_steps=accum, limit_batches=None, clip_grad_norm=None, channels_last=False, epochs=1,
                     freeze_bn=False, log_interval=0, no_progress=True, nan_policy="stop", max_nan_skips=0)

    def criterion(logits, target):
        loss = torch.nn.functional.cross_entropy(logits, target)
        return loss, {"ce": loss.detach()}

    run = engine.Run(model, criterion, optimizer, recipe.Amp(), faults.Guard(args, handle_signals=False),
                     Recorder(args, distributed.Dist(rank=1), ""), ctx, args, lambda step: 0.1)
    _, steps = engine.train_one_epoch(run, batches, 0, 0)
    checksum = sum(float(p.double().sum()) for p in model.parameters())
    return {"allreduce_calls": calls[0], "updates": steps, "checksum": checksum}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    ctx = distributed.Dist(rank=dist.get_rank(), world_size=dist.get_world_size())
    result = {"rank": ctx.rank, "k1": epoch_with_accum(1, ctx), "k2": epoch_with_accum(2, ctx)}
    with open(os.path.join(sys.argv[1], f"rank{ctx.rank}.json"), "w") as f:  # one file per rank: no interleaving
        json.dump(result, f)
    dist.destroy_process_group()
