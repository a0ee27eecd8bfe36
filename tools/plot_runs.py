"""Plot the loss, LR and val mIoU curves of one or more runs from their summary.csv into one PNG.

    python tools/plot_runs.py runs/a runs/b --output curves.png

matplotlib is an optional extra: pip install matplotlib.
"""
import argparse
import csv
import os
import sys

PANELS = (("train_loss", "train loss"), ("lr", "learning rate"), ("val_miou", "val mIoU"))


def read_summary(run):
    path = run if run.endswith(".csv") else os.path.join(run, "summary.csv")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist; expected a run folder with a summary.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"error: {path} has no rows yet")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (or summary.csv files)")
    p.add_argument("--output", default="runs.png", help="PNG to write")
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: tools/plot_runs.py needs matplotlib; pip install matplotlib")
    summaries = {run: read_summary(run) for run in args.runs}
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for ax, (column, title) in zip(axes, PANELS):
        for run, rows in summaries.items():
            points = [(int(r["epoch"]), float(r[column])) for r in rows if r.get(column)]
            ax.plot(*zip(*points), marker="o", label=os.path.basename(os.path.normpath(run)))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
