"""float32 against bfloat16 autocast on this CPU, model by model: what `--amp` would buy (or cost) here.

    python benchmarks/amp_cpu.py                              # train.py's default model, unet, ResNet-18 classifier
    python benchmarks/amp_cpu.py --models unet --pairs 5

Each model trains (forward, loss, backward, SGD step) and evaluates (forward under no_grad) on the same random
batches, in float32 and under `torch.autocast("cpu", dtype=torch.bfloat16)`, alternating fp32 and bf16 in one process
so that the machine's drift hits both alike; the first pair is a warm-up. The table gives the median milliseconds per
step, the median of the per-pair ratios bf16/fp32 (below 1: bf16 is faster) and their range.

The first lines name the CPU and what train.py's `--amp` decides on it (engine.recipe.native_bf16): bfloat16 where
the CPU has bfloat16 arithmetic (AMX or AVX512-BF16), float32 elsewhere, where oneDNN would emulate it. This script
times bfloat16 either way, so that the decision can be checked against a measurement on any machine.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tasks  # noqa: E402
import train  # noqa: E402
from core import config  # noqa: E402
from engine import recipe  # noqa: E402

# name: (train.py flags, input side, batch)
MODELS = {
    "default": (["--numclasses", "5"], 128, 8),
    "unet": (["--model_type", "unet", "--numclasses", "5"], 128, 8),
    "resnet18-cls": (["--task", "classification", "--model_type", "resnet18", "--numclasses", "10",
                      "--image_size", "64"], 64, 32),
}


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return "unknown CPU"


def build(name):
    flags, size, batch = MODELS[name]
    args = config.parse_args(train.get_args_parser(), flags, task_defaults=tasks.task_defaults)
    task = tasks.get_task(args.task)
    torch.manual_seed(0)
    model = task.build_model(args)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 3, size, size, generator=generator)
    target_shape = (batch,) if args.task == "classification" else (batch, size, size)
    target = torch.randint(0, args.numclasses, target_shape, generator=generator)
    return model, image, target


def timed(fn, steps):
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps * 1e3


def measure(name, pairs, steps):
    """{(phase, dtype): [ms per step per pair]} for one model."""
    model, image, target = build(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    times = {(phase, dtype): [] for phase in ("train", "eval") for dtype in ("fp32", "bf16")}

    def step(dtype):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = torch.nn.functional.cross_entropy(model(image).float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return run

    def evaluate(dtype):
        @torch.no_grad()
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                model(image)
        return run

    for pair in range(pairs + 1):
        for dtype in ("fp32", "bf16"):
            model.train()
            train_ms = timed(step(dtype), steps)
            model.eval()
            eval_ms = timed(evaluate(dtype), steps)
            if pair:  # the first pair warms up oneDNN's kernel caches for both dtypes
                times["train", dtype].append(train_ms)
                times["eval", dtype].append(eval_ms)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--pairs", type=int, default=3, help="(fp32, bf16) pairs after the warm-up pair")
    p.add_argument("--steps", type=int, default=3, help="steps timed per phase and dtype in each pair")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    native = recipe.native_bf16(torch.device("cpu"))
    print(f"CPU: {cpu_name()}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"bfloat16 arithmetic: AMX {torch.cpu._is_amx_tile_supported()}, AVX512-BF16 "
          f"{torch.cpu._is_avx512_bf16_supported()}; train.py --amp here runs "
          f"{'autocast bfloat16' if native else 'float32 (bfloat16 would be emulated)'}")
    print(f"{args.pairs} pairs of {args.steps} steps; ms per step, median (range); ratio bf16/fp32 median (range)")
    print(f"{'model':<14} {'phase':<6} {'fp32 ms':>22} {'bf16 ms':>22} {'bf16/fp32':>22}")
    for name in args.models:
        times = measure(name, args.pairs, args.steps)
        for phase in ("train", "eval"):
            fp32, bf16 = times[phase, "fp32"], times[phase, "bf16"]
            ratios = [b / f for b, f in zip(bf16, fp32)]
            print(f"{name:<14} {phase:<6} {spread(fp32):>22} {spread(bf16):>22} {spread(ratios, '.2f'):>22}",
                  flush=True)


def spread(values, fmt=".1f"):
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


if __name__ == "__main__":
    main()
