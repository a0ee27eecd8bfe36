"""Time the README's first command (`python train.py`, no arguments) and read its best val mIoU.

    python benchmarks/default_run.py --repeats 3

Each repeat starts from an empty data cache, so the time includes generating the built-in data,
exactly as on a fresh machine. Prints every run and the medians.
"""
import argparse
import os
import statistics
import sys
import tempfile

from timed_run import timed_run


def one_run(workdir):
    env = {**os.environ, "AILAB_DATA": os.path.join(workdir, "cache")}
    logdir = os.path.join(workdir, "run")
    return timed_run([sys.executable, "train.py", "--logdir", logdir], env, logdir, "val_miou")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    results = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as workdir:
            seconds, best, last = one_run(workdir)
        results.append((seconds, best, last))
        print(f"run {i + 1}: {seconds:.1f} s wall, best val mIoU {best:.4f}, last {last:.4f}", flush=True)
    print(f"median of {len(results)}: {statistics.median(r[0] for r in results):.1f} s wall, "
          f"best val mIoU {statistics.median(r[1] for r in results):.4f}")


if __name__ == "__main__":
    main()
