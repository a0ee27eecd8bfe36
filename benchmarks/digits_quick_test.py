"""Time the classification quick test (seed 002's "MNIST quick test": ResNet-18 on the built-in digits, two
processes) and read its val top-1, over several seeds.

    python benchmarks/digits_quick_test.py --seeds 0 1 2
    python benchmarks/digits_quick_test.py --default       # `python train.py --task classification` instead
    python benchmarks/digits_quick_test.py --extra --epochs 4                # other settings, same measurement

The digits are written to a fresh cache once before the timed runs (that first write is timed and printed on its
own), so each run's wall time is what a user waits for from `torchrun` to its exit. Prints every run, then the mean,
the spread (min-max) and the median.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

from timed_run import ROOT, timed_run
QUICK_TEST = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1", "--master_port={port}",
              "train.py", "--config", "configs/ddp_quick_test.toml"]
DEFAULT = ["train.py", "--task", "classification"]


def one_run(command, seed, cache, workdir, port, extra):
    env = {**os.environ, "AILAB_DATA": cache}
    logdir = os.path.join(workdir, f"seed{seed}")
    cmd = [sys.executable, *[c.format(port=port) for c in command], "--seed", str(seed), "--logdir", logdir, *extra]
    return timed_run(cmd, env, logdir, "val_top1", quiet_stderr=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--default", action="store_true", help="time the one-process default command instead")
    p.add_argument("--port", type=int, default=29613)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags (put last)")
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    from data import digits
    with tempfile.TemporaryDirectory() as workdir:
        cache = os.path.join(workdir, "cache")
        start = time.perf_counter()
        digits.ensure_digits(cache)
        print(f"writing the digits once: {time.perf_counter() - start:.1f} s", flush=True)
        results = []
        for seed in args.seeds:
            command = DEFAULT if args.default else QUICK_TEST
            seconds, best, last = one_run(command, seed, cache, workdir, args.port, args.extra)
            results.append((seconds, best, last))
            print(f"seed {seed}: {seconds:.1f} s wall, best val top-1 {best:.4f}, last {last:.4f}", flush=True)
    for name, column in (("wall s", 0), ("best val top-1", 1), ("last val top-1", 2)):
        values = [r[column] for r in results]
        print(f"{name}: mean {statistics.mean(values):.4f}, min {min(values):.4f}, max {max(values):.4f}, "
              f"median {statistics.median(values):.4f} over {len(values)} seeds")


if __name__ == "__main__":
    main()
