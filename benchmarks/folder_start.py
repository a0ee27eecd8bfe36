"""Start-up cost of a large image folder: torchvision's ImageFolder scan against the suite's data preparation.

    python benchmarks/folder_start.py [--n 200000] [--classes 10] [--repeats 3] [--root DIR] [--out FILE.md]

Builds root/train/<class>/<i>.png and root/val/<class>/<i>.png (16x16 PNGs, a tenth in val) under a temporary
folder (or `--root`, reused when it already holds the tree), then times, in one process:
  plain   torchvision.datasets.ImageFolder(root/train) and ImageFolder(root/val): a scan, nothing read;
  first   the suite up to where training starts (ClassificationTask.prepare_data + build_datasets: scan, split,
          --image_check header) with an empty check record: every header is read;
  second  the same with the record the first start left: one stat per folder, no image opened.
One untimed pass of all three runs first, so every measurement sees the same warm page cache (directory entries,
inodes and image bytes); the figures compare CPU work, not disk. The order of the three alternates between
repeats, and the table shows the median and range of `--repeats`.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

from core.distributed import Dist  # noqa: E402
from data import check_cache  # noqa: E402
from tasks.classification import ClassificationTask  # noqa: E402


def build_tree(root, n, classes, size=16):
    """n PNGs over `classes` classes, a tenth of them in val; returns the seconds it took (0 when reused)."""
    marker = os.path.join(root, f".complete-{n}-{classes}")
    if os.path.exists(marker):
        return 0.0
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    # 64 distinct images, written as bytes: encoding every file would time OpenCV, not the file system
    encoded = [cv2.imencode(".png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))[1].tobytes()
               for _ in range(64)]
    for split in ("train", "val"):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"class{c:02d}"), exist_ok=True)
    for i in range(n):
        split = "val" if (i // classes) % 10 == 9 else "train"  # every class has a tenth of its images in val
        folder = os.path.join(root, split, f"class{i % classes:02d}")
        with open(os.path.join(folder, f"{i:07d}.png"), "wb") as f:
            f.write(encoded[i % len(encoded)])
    open(marker, "w").close()
    return time.perf_counter() - start


def plain_scan(root):
    train = torchvision.datasets.ImageFolder(os.path.join(root, "train"))
    val = torchvision.datasets.ImageFolder(os.path.join(root, "val"))
    return len(train) + len(val)


def suite_start(root, cache_dir, logdir):
    """What train.py does with the data before its first step (the folder datasets built and checked)."""
    parser = argparse.ArgumentParser()
    ClassificationTask.add_train_args(parser)
    args = parser.parse_args([])
    args.__dict__.update(dataset_path=root, data_cache=cache_dir, logdir=logdir, numclasses=None, dataset="folder",
                         train_split="train", val_split="val", hflip_prob=0.0)
    check_cache._last_read = (None, None, check_cache.Record())  # each start is a new process: nothing read yet
    task = ClassificationTask()
    prepared_root, _ = task.prepare_data(args, Dist())
    train, val = task.build_datasets(args, prepared_root)
    return len(train) + len(val)


def cpu_model():
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "?")
    return f"{name} ({'with' if 'amx' in text else 'without'} AMX), {os.cpu_count()} logical CPUs"


def measure(args, root, work):
    times = {"plain": [], "first": [], "second": []}
    warm_cache = os.path.join(work, "cache-warm")

    def run(name, k):
        cache = warm_cache if name == "second" else os.path.join(work, f"cache-first-{k}")
        start = time.perf_counter()
        count = plain_scan(root) if name == "plain" else suite_start(root, cache, os.path.join(work, f"run-{k}"))
        elapsed = time.perf_counter() - start
        if count != args.n:
            raise SystemExit(f"{name} found {count} images; expected {args.n}")
        return elapsed

    for name in ("plain", "first", "second"):  # untimed: fills the page cache and the warm record
        run(name, "warmup")
    order = ["plain", "first", "second"]
    for k in range(args.repeats):
        for name in (order if k % 2 == 0 else order[::-1]):
            times[name].append(run(name, k))
            print(f"repeat {k + 1}/{args.repeats} {name}: {times[name][-1]:.2f} s", flush=True)
    return times


def report(args, times, built, cpu):
    plain = statistics.median(times["plain"])
    lines = [f"Command: `python benchmarks/folder_start.py --n {args.n} --classes {args.classes} "
             f"--repeats {args.repeats}`",
             f"CPU: {cpu}; torch {torch.__version__}, torchvision {torchvision.__version__}",
             f"Tree: {args.n} 16x16 PNGs in {args.classes} classes, train/ and val/ (a tenth in val)"
             + (f", built in {built:.0f} s" if built else ", reused"),
             "Page cache: warm for every row (one untimed pass of all three first); order alternates per repeat.", "",
             "| start | median s (min-max) | / plain |", "|---|---:|---:|"]
    for name, label in (("plain", "ImageFolder(train) + ImageFolder(val)"),
                        ("first", "suite, first start (empty check record)"),
                        ("second", "suite, second start (record kept)")):
        median = statistics.median(times[name])
        lines.append(f"| {label} | {median:.2f} ({min(times[name]):.2f}-{max(times[name]):.2f}) | "
                     f"{median / plain:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200000, help="images in the tree (train + val)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--root", default=None, help="where the tree is built (and kept); default: a temporary folder")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args()
    if args.n < 10 * args.classes:
        raise SystemExit(f"--n {args.n}: expected at least 10 images per class ({10 * args.classes})")
    work = tempfile.mkdtemp(prefix="folder_start-")
    try:
        root = args.root or os.path.join(work, "tree")
        print(f"building {args.n} images under {root} ...", flush=True)
        built = build_tree(root, args.n, args.classes)
        text = report(args, measure(args, root, work), built, cpu_model())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
