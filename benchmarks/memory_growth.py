"""Memory per epoch of the default run (`python train.py`) over many epochs, and its growth.

    python benchmarks/memory_growth.py --epochs 12
    python benchmarks/memory_growth.py --epochs 12 --extra --workers 0       # other train.py flags, last

train.py records, after every epoch's evaluation, the resident memory (RSS) of the training process and of its
children (the loader workers and their fork server), and on a GPU the allocator's peak and reserved memory: the
rss_mib, workers_rss_mib, max_allocated_mib and reserved_mib columns of summary.csv. This prints them per epoch and
the growth from epoch 2 (after the first evaluation and checkpoint, once every buffer exists) to the last epoch.
"""
import argparse
import os
import sys
import tempfile

from timed_run import summary_rows, timed_run

COLUMNS = ("rss_mib", "workers_rss_mib", "max_allocated_mib", "reserved_mib")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags (put last)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "AILAB_DATA": os.path.join(workdir, "cache")}
        logdir = os.path.join(workdir, "run")
        seconds, best, _ = timed_run([sys.executable, "train.py", "--epochs", str(args.epochs), "--logdir", logdir,
                                      *args.extra], env, logdir, "val_miou")
        rows = summary_rows(logdir)
    columns = [c for c in COLUMNS if rows[0].get(c)]
    print(f"python train.py --epochs {args.epochs} {' '.join(args.extra)}: {seconds:.0f} s, best val mIoU {best:.4f}")
    print("| epoch | " + " | ".join(columns) + " |\n|" + " --- |" * (len(columns) + 1))
    for row in rows:
        print(f"| {row['epoch']} | " + " | ".join(row[c] for c in columns) + " |")
    if len(rows) >= 3:
        for c in columns:
            first, last = float(rows[1][c]), float(rows[-1][c])
            print(f"{c}: epoch 2 {first:.1f} MiB, epoch {rows[-1]['epoch']} {last:.1f} MiB, growth "
                  f"{100 * (last - first) / first:+.1f} %")


if __name__ == "__main__":
    main()
