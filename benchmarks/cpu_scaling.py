"""Training throughput with 1, 2 and 3 gloo processes on the CPU at a fixed global batch.

    python benchmarks/cpu_scaling.py --procs 1 2 3 --global_batch 12 --repeats 3

Each run is `torchrun --nproc_per_node=N train.py --distributed --batchsize GLOBAL/N` on the built-in data (the
default model), with OMP_NUM_THREADS = max(1, cores // N), so N processes share the machine's cores instead of each
taking them all. The figure of a run is the median of its epochs' images/s (all ranks) after the first epoch; the
table gives the median over repeats and the speed-up over 1 process. This is CPU scaling: processes compete for the
same cores and memory bandwidth, so it says how much the one code path costs when it runs as N processes, not what N
GPUs give.
"""
import argparse
import os
import statistics
import sys
import tempfile

from timed_run import summary_rows, timed_run


def one_run(procs, batch, epochs, workdir, cache, port, extra):
    logdir = os.path.join(workdir, f"n{procs}")
    threads = max(1, (os.cpu_count() or 1) // procs)
    env = {**os.environ, "AILAB_DATA": cache, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_addr=127.0.0.1",
           f"--master_port={port}", "train.py", "--distributed", "--batchsize", str(batch), "--epochs", str(epochs),
           "--logdir", logdir, "--no_progress", *extra]
    seconds, _, _ = timed_run(cmd, env, logdir, "val_miou", quiet_stderr=True)
    rates = [float(row["images_per_s"]) for row in summary_rows(logdir)][1:]
    return statistics.median(rates), seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--global_batch", type=int, default=12, help="divisible by every --procs value")
    p.add_argument("--epochs", type=int, default=3, help="per run; the first is left out")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--port", type=int, default=29641)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags (put last)")
    args = p.parse_args()
    bad = [n for n in args.procs if args.global_batch % n]
    if bad:
        sys.exit(f"--global_batch {args.global_batch} is not divisible by --procs {bad}; expected a common multiple")
    results = {n: [] for n in args.procs}
    with tempfile.TemporaryDirectory() as workdir:
        cache = os.path.join(workdir, "cache")
        for _ in range(args.repeats):
            for n in args.procs:  # interleaved: 1 2 3 1 2 3 ...
                rate, seconds = one_run(n, args.global_batch // n, args.epochs, workdir, cache, args.port, args.extra)
                results[n].append(rate)
                print(f"{n} process(es): {rate:.1f} img/s ({seconds:.0f} s wall)", flush=True)
    base = statistics.median(results[args.procs[0]])
    print(f"\n{os.cpu_count()} cores, global batch {args.global_batch}, median of {args.repeats}:")
    print("| processes | batch per process | img/s (min-max) | vs 1 process |\n| --- | --- | --- | --- |")
    for n, rates in results.items():
        print(f"| {n} | {args.global_batch // n} | {statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f}) "
              f"| {statistics.median(rates) / base:.2f}x |")


if __name__ == "__main__":
    main()
