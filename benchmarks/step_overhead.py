"""The per-step cost of the suite's training loop (engine.loop.train_one_epoch) over a bare loop, in one process.

    python benchmarks/step_overhead.py                               # train.py's default model and batch
    python benchmarks/step_overhead.py --model tiny                  # a tiny model: the loop's own cost shows
    torchrun --nproc_per_node=2 benchmarks/step_overhead.py --model tiny        # DDP (gloo on CPU, nccl on GPU)

Both loops train the same model, on the same batches (made once and kept on the device, so data loading is out of
the picture), with the same optimizer. They alternate epoch by epoch in one process (suite, bare, suite, bare, ...),
so the machine's drift and the process's memory layout hit both alike; the first pair is a warm-up. Each epoch's time
per step is taken after a device sync; the table gives the medians and the median of the per-pair ratios.

The suite's loop is the real one, with what train.py gives it: the fault guard (stop signals, non-finite losses,
batch-norm snapshot), the progress numbers, the LR function and a Recorder writing TensorBoard and events.jsonl
every --log_interval steps. The bare loop is `zero_grad, forward, loss, backward, step`.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402
import train  # noqa: E402
from core import distributed  # noqa: E402
from engine import faults, recipe  # noqa: E402
from engine import loop as engine  # noqa: E402
from engine.records import Recorder  # noqa: E402


def build_model(kind, args):
    if kind == "tiny":
        return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                   torch.nn.Conv2d(16, args.numclasses, 1))
    return models.build_model(args)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_epoch(model, criterion, optimizer, batches):
    for image, target in batches:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = criterion(model(image), target)
        loss.backward()
        optimizer.step()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", choices=["default", "tiny"])
    p.add_argument("--batch", type=int, default=None, help="default: 8 (default model), 2 (tiny)")
    p.add_argument("--size", type=int, default=None, help="square input side; default: 96 (default model), 32 (tiny)")
    p.add_argument("--steps", type=int, default=None, help="steps per epoch; default: 20 (default model), 200 (tiny)")
    p.add_argument("--pairs", type=int, default=8, help="(suite, bare) epoch pairs after the warm-up pair")
    p.add_argument("--log_interval", type=int, default=10)
    args = p.parse_args()
    tiny = args.model == "tiny"
    batch, size, steps = args.batch or (2 if tiny else 8), args.size or (32 if tiny else 96), args.steps or (
        200 if tiny else 20)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    run_args = train.get_args_parser().parse_args(["--distributed"] * (world > 1) + [
        "--numclasses", "5", "--log_interval", str(args.log_interval), "--no_progress", "--epochs", "1"])
    ctx = distributed.init_distributed(run_args)
    device = ctx.device
    torch.manual_seed(0)
    model = build_model(args.model, run_args).to(device)
    if ctx.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    generator = torch.Generator().manual_seed(ctx.rank)
    batches = [(torch.randn(batch, 3, size, size, generator=generator).to(device),
                torch.randint(0, 5, (batch, size, size), generator=generator).to(device)) for _ in range(steps)]

    def criterion(logits, target):
        loss = torch.nn.functional.cross_entropy(logits, target)
        return loss, {"ce": loss.detach()}

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    with tempfile.TemporaryDirectory() as logdir:
        run_args.logdir = logdir
        recorder = Recorder(run_args, ctx, "")
        run = engine.Run(model, criterion, optimizer, recipe.Amp(), faults.Guard(run_args, handle_signals=False),
                         recorder, ctx, run_args, lambda step: 1e-3)
        times, step = {"suite": [], "bare": []}, 0
        for pair in range(args.pairs + 1):
            for name in ("suite", "bare"):
                sync(device)
                start = time.perf_counter()
                if name == "suite":
                    _, step = engine.train_one_epoch(run, batches, 0, step)
                else:
                    bare_epoch(model, criterion, optimizer, batches)
                sync(device)
                if pair:
                    times[name].append((time.perf_counter() - start) / steps)
        recorder.close()
    if ctx.is_main:
        ratios = [s / b for s, b in zip(times["suite"], times["bare"])]
        print(f"{args.model} model, batch {batch} x {size}x{size}, {steps} steps per epoch, {world} process(es) on "
              f"{device}, {args.pairs} pairs: suite {statistics.median(times['suite']) * 1e3:.3f} ms/step, bare "
              f"{statistics.median(times['bare']) * 1e3:.3f} ms/step, ratio {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f})")
    distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
