"""What train.py's loop costs over a bare PyTorch loop: the same model, data, loader, optimizer and batch.

    python benchmarks/loop_overhead.py --repeats 3 --epochs 3
    python benchmarks/loop_overhead.py --extra --model_type unet --crop_size 128     # other train.py flags, last

The two runs alternate (train.py, bare, train.py, bare, ...), each a fresh process, so drift of the machine (other
load, clocks) hits both alike. Each run reports the training time of every epoch; the first epoch (worker start,
allocator warm-up) is left out, and a run's figure is the median of the rest per optimizer step. The table gives
every pair, then the median over pairs of the step time ratio train.py / bare. Evaluation and checkpointing are
not part of either figure: they happen between epochs, outside the timed training loop.

The bare loop builds everything with the suite's own functions and train.py's flag defaults (so the data, the
augmentation, the loader and the model are the same), then runs `zero_grad, forward, loss, backward, step` and
nothing else: no LR schedule, no progress, no loss read-back, no collectives, no fault checks.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from timed_run import ROOT, summary_rows


def bare_loop(argv):
    """Train like train.py with `argv`'s flags but with nothing around the step; prints one line per epoch."""
    sys.path.insert(0, ROOT)
    import torch

    import tasks
    import train
    from core import distributed
    from data.loaders import build_train_loader
    from engine.optim import build_optimizer
    from step_overhead import bare_epoch, sync

    args = train.get_args_parser().parse_args(argv)
    ctx = distributed.init_distributed(args)
    task = tasks.get_task(args.task)
    root, _ = task.prepare_data(args, ctx)
    train_set, _ = task.build_datasets(args, root)
    loader, sampler = build_train_loader(train_set, args.batchsize, args.workers, ctx.rank, ctx.world_size,
                                         args.seed, collate_fn=task.train_collate(args))
    torch.manual_seed(args.seed)
    model = task.build_model(args).to(ctx.device)
    criterion = task.build_criterion(args, model).to(ctx.device)
    optimizer = build_optimizer(args, model, args.lr)  # train.py's: --optimizer, its groups, the base LR
    model.train()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        on_device = ((image.to(ctx.device, non_blocking=True), target.to(ctx.device, non_blocking=True))
                     for image, target in loader)
        bare_epoch(model, criterion, optimizer, on_device)
        sync(ctx.device)
        print(f"epoch {epoch + 1} steps {len(loader)} seconds {time.perf_counter() - start:.4f}", flush=True)


def suite_run(flags, workdir, env):
    """Step times (s) of epochs 2.. of `python train.py FLAGS`, from its summary.csv."""
    logdir = os.path.join(workdir, "suite")
    subprocess.run([sys.executable, "train.py", *flags, "--logdir", logdir], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = summary_rows(logdir)
    steps = steps_per_epoch(os.path.join(logdir, "train.log"))
    return [float(row["epoch_time"]) / steps for row in rows[1:]]


def bare_run(flags, env):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--bare", *flags], cwd=ROOT, env=env,
                         check=True, capture_output=True, text=True).stdout
    times = [line.split() for line in out.splitlines() if line.startswith("epoch ")]
    return [float(t[5]) / int(t[3]) for t in times[1:]]


def steps_per_epoch(log_path):
    """Batches per training epoch, from the data line of train.py's log."""
    with open(log_path) as f:
        for line in f:
            if "steps per epoch" in line:
                return int(line.split("; ")[-1].split()[0])
    raise RuntimeError(f"no 'steps per epoch' line in {log_path}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--bare":
        return bare_loop(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="pairs of runs (train.py, bare)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is left out")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags (put last)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "AILAB_DATA": os.path.join(workdir, "cache")}
        flags = ["--epochs", str(args.epochs), "--lr_scheduler", "constant", "--warmup_epochs", "0",
                 "--log_interval", "0", "--no_progress", *args.extra]
        pairs = []
        print("| pair | train.py ms/step | bare ms/step | ratio |\n| --- | --- | --- | --- |", flush=True)
        for r in range(args.repeats):
            suite = statistics.median(suite_run(flags, workdir, env))
            bare = statistics.median(bare_run(flags, env))
            pairs.append((suite, bare))
            print(f"| {r + 1} | {suite * 1e3:.1f} | {bare * 1e3:.1f} | {suite / bare:.3f} |", flush=True)
        ratios = [s / b for s, b in pairs]
        print(f"\nmedian over {len(pairs)} pairs: train.py {statistics.median(s for s, _ in pairs) * 1e3:.1f} ms/step, "
              f"bare {statistics.median(b for _, b in pairs) * 1e3:.1f} ms/step, ratio {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
