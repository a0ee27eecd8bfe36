"""Ablation of the scribble method on the built-in data, under the suite's formulation and the method's own
(--lorm paper, --entropy_norm paper, --map_style paper distance maps), over several seeds.

    python benchmarks/scribble_ablation.py --weights paper   # 3 seeds, 8 epochs: 33 runs, about 90 min on 2 cores
    python benchmarks/scribble_ablation.py --seeds 0 1 2 3 --epochs 16 --out ablation.md
    python benchmarks/pretrain_backbone.py --out r18.pth            # then, from those weights:
    python benchmarks/scribble_ablation.py --pretrained r18.pth --rows "+ pseudo labels" "Full supervision"

Every run uses the same model and recipe (MODEL below: lr 0.01 after one warmup epoch; lr 0.02 without warmup
moved a run by up to 0.18 mIoU between seeds). --weights quick is the older setting of scribble_quick.toml, with
the pseudo-label and entropy terms weighed down; --weights paper keeps every term at 1.

Rows add one term at a time: ScribbleOnly; + pseudo labels; + LoRM; + ds; + dc (instead of ds); the full method
(all five terms); Full supervision. ScribbleOnly, + pseudo labels and Full use no formulation-specific part, so
they run once and serve both columns. The paper formulation's maps are written once next to the built-in ones
(distancemap_s_paper/, distancemap_c_paper/). Each cell is mean ± sample std of the best val mIoU over the seeds,
with its share of Full; every run is also written to a CSV next to --out.
"""
import argparse
import concurrent.futures
import csv
import os
import statistics
import subprocess
import sys
import tempfile

from timed_run import ROOT, timed_run

MODEL = ["--model_type", "deeplabv3p_lorm", "--layers", "18", "--crop_size", "96", "--batchsize", "8",
         "--optimizer", "sgd", "--lr", "0.01", "--warmup_epochs", "1", "--workers", "2", "--no_progress"]
WEIGHTS = {"quick": {"l_segs": 1.0, "l_pesudo": 0.5, "l_lorm": 1.0, "l_ds": 0.1, "l_dc": 0.1},  # scribble_quick.toml
           "paper": {"l_segs": 1.0, "l_pesudo": 1.0, "l_lorm": 1.0, "l_ds": 1.0, "l_dc": 1.0}}
# Row: (--dataset, the terms it keeps, whether the formulation matters)
ROWS = {"ScribbleOnly": ("ScribbleOnly", ["segs"], False),
        "+ pseudo labels": ("ScribblePseudo", ["segs", "pesudo"], False),
        "+ LoRM": ("ScribblePseudo", ["segs", "pesudo", "lorm"], True),
        "+ LoRM + ds": ("ScribblePseudoDs", ["segs", "pesudo", "lorm", "ds"], True),
        "+ LoRM + dc": ("ScribblePseudoDc", ["segs", "pesudo", "lorm", "dc"], True),
        "full method": ("ScribblePseudoDsDc", ["segs", "pesudo", "lorm", "ds", "dc"], True),
        "Full supervision": ("Full", ["segs"], False)}
FORMULATIONS = {"suite": ["--lorm", "consensus", "--entropy_norm", "weight"],
                "paper": ["--lorm", "paper", "--entropy_norm", "paper", "--distancemap_s", "distancemap_s_paper",
                          "--distancemap_c", "distancemap_c_paper"]}


def command(row, formulation, weights, seed, args, logdir):
    dataset, terms, _ = ROWS[row]
    flags = [f"--{name}={weights[name] if name[2:] in terms else 0.0}" for name in weights]
    pretrained = ["--pretrained", os.path.abspath(args.pretrained)] if args.pretrained else []
    return [sys.executable, "train.py", *MODEL, "--dataset", dataset, *flags, *FORMULATIONS[formulation],
            *pretrained, "--epochs", str(args.epochs), "--seed", str(seed), "--logdir", logdir]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--weights", choices=sorted(WEIGHTS), default="quick")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW")
    p.add_argument("--out", default=None, help="also write the table (markdown) here, and the runs to OUT.csv")
    p.add_argument("--pretrained", default=None, metavar="FILE",
                   help="start every run from these weights (benchmarks/pretrain_backbone.py writes a backbone)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each with cores / JOBS threads (results do not depend on it)")
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    from data import synthetic
    with tempfile.TemporaryDirectory() as workdir:
        cache = os.path.join(workdir, "cache")
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        env = {**os.environ, "AILAB_DATA": cache, "OMP_NUM_THREADS": str(threads)}
        root = synthetic.ensure_builtin_dataset(cache)
        subprocess.run([sys.executable, "tools/make_distance_maps.py", "--dataset_path", root, "--map_style", "paper",
                        "--distancemap_s", "distancemap_s_paper", "--distancemap_c", "distancemap_c_paper"],
                       cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        grid = [(row, formulation, seed) for row in args.rows
                for formulation in (FORMULATIONS if ROWS[row][2] else ["both"]) for seed in args.seeds]

        def run(index):
            row, formulation, seed = grid[index]
            logdir = os.path.join(workdir, str(index))
            cmd = command(row, "suite" if formulation == "both" else formulation, WEIGHTS[args.weights],
                          seed, args, logdir)
            seconds, best, last = timed_run(cmd, env, logdir, "val_miou", quiet_stderr=True)
            print(f"{row} [{formulation}] seed {seed}: best val mIoU {best:.4f} ({seconds:.0f} s)", flush=True)
            return {"row": row, "formulation": formulation, "seed": seed, "best_miou": best,
                    "last_miou": last, "seconds": round(seconds, 1)}

        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(run, range(len(grid))))
    table = render(runs, args)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
        with open(os.path.splitext(args.out)[0] + ".csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(runs[0]))
            writer.writeheader()
            writer.writerows(runs)


def render(runs, args):
    """Markdown: one row per ablation row, a column per formulation, mean ± std and the share of Full."""
    def cell(row, formulation):
        values = [r["best_miou"] for r in runs if r["row"] == row and r["formulation"] in (formulation, "both")]
        if not values:
            return "", None
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {spread:.3f}", statistics.mean(values)

    full = cell("Full supervision", "suite")[1]
    extra = "" if args.rows == list(ROWS) else " --rows " + " ".join(f'"{r}"' if " " in r else r for r in args.rows)
    start = ", from random init"
    if args.pretrained:
        start = f", from {os.path.basename(args.pretrained)}"
        extra += f" --pretrained {os.path.basename(args.pretrained)}"
    lines = [f"Best val mIoU, mean ± std over seeds {' '.join(map(str, args.seeds))}, {args.epochs} epochs, weights "
             f"'{args.weights}'{start} (python benchmarks/scribble_ablation.py --seeds {' '.join(map(str, args.seeds))} "
             f"--epochs {args.epochs} --weights {args.weights}{extra})", "",
             "| row | suite | of Full | paper | of Full |", "| --- | --- | --- | --- | --- |"]
    for row in args.rows:
        cells = []
        for formulation in FORMULATIONS:
            text, mean = cell(row, formulation)
            cells += [text, f"{mean / full:.0%}" if mean is not None and full else ""]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
