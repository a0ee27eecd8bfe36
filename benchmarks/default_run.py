"""Time the README's first command (`python train.py`, no arguments) and read its val mIoU and per-class IoU.

    python benchmarks/default_run.py --repeats 3
    python benchmarks/default_run.py --repeats 3 --extra --epochs 10      # other train.py flags, last

Each repeat starts from an empty data cache, so the time includes generating the built-in data, exactly as on a
fresh machine. Prints every run (its wall time, its best epoch's mIoU and that epoch's lowest class IoU), then the
medians, against the goal: mIoU >= 0.70 with every class >= 0.5 IoU, in <= 90 s wall on 2 cores.
"""
import argparse
import os
import statistics
import sys
import tempfile

from timed_run import summary_rows, timed_run


def one_run(workdir, extra):
    """(wall seconds, best val mIoU, {class: IoU} at that epoch)."""
    env = {**os.environ, "AILAB_DATA": os.path.join(workdir, "cache")}
    logdir = os.path.join(workdir, "run")
    seconds, _, _ = timed_run([sys.executable, "train.py", "--logdir", logdir, *extra], env, logdir, "val_miou")
    best = max(summary_rows(logdir), key=lambda row: float(row["val_miou"]))
    ious = {k[len("val_iou_"):]: float(v) for k, v in best.items() if k.startswith("val_iou_") and v}  # "": absent
    return seconds, float(best["val_miou"]), ious


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags (put last)")
    args = p.parse_args()
    results = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as workdir:
            seconds, miou, ious = one_run(workdir, args.extra)
        results.append((seconds, miou, min(ious.values())))
        print(f"run {i + 1}: {seconds:.1f} s wall, best val mIoU {miou:.4f}; class IoU "
              + ", ".join(f"{k} {v:.3f}" for k, v in ious.items()), flush=True)
    seconds, miou, lowest = (statistics.median(r[k] for r in results) for k in range(3))
    met = seconds <= 90 and miou >= 0.7 and lowest >= 0.5
    print(f"median of {len(results)}: {seconds:.1f} s wall, best val mIoU {miou:.4f}, lowest class IoU {lowest:.4f} "
          f"(goal: <= 90 s, >= 0.70, >= 0.5: {'met' if met else 'not met'})")


if __name__ == "__main__":
    main()
