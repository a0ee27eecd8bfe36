"""Watching a run: TensorBoard, summary.csv, events.jsonl, optional W&B, prediction grids and a GPU monitor.

Rank 0 owns every sink; on other ranks the Recorder is inert, so callers never branch on the rank.
The GPU monitor is the exception: local rank 0 of each node watches that node's GPUs.
"""
import contextlib
import csv
import json
import logging
import os
import resource
import socket
import threading

import psutil
import torch

log = logging.getLogger("ailab")


def add_monitor_args(parser):
    g = parser.add_argument_group("monitoring")
    g.add_argument("--no_progress", action="store_true",
                   help="plain log lines every --log_interval steps instead of progress bars "
                        "(automatic when stdout is not a terminal)")
    g.add_argument("--tb_dir", default=None, help="TensorBoard folder; default LOGDIR/tb")
    g.add_argument("--vis_interval", type=int, default=1, help="a grid of val predictions every N epochs (0: never)")
    g.add_argument("--vis_images", type=int, default=4, help="images in that grid")
    g.add_argument("--gpu_stats_interval", type=float, default=30.0,
                   help="seconds between GPU utilisation/memory/temperature/power samples (0: off)")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (pip install wandb)")
    g.add_argument("--wandb_project", default="ailab")
    g.add_argument("--wandb_entity", default=None, help="W&B team or user the run belongs to")
    g.add_argument("--wandb_mode", default="offline", choices=["online", "offline", "disabled"],
                   help="offline (default) never needs the network; `wandb sync` uploads later")
    return g


class Recorder:
    """Fan-out of a run's records to TensorBoard, CSV, JSON lines and W&B (rank 0 only)."""

    def __init__(self, args, ctx, config_text):
        self.active = ctx.is_main
        self.writer = self.wandb = None
        if not self.active:
            return
        from torch.utils.tensorboard import SummaryWriter
        self.logdir = args.logdir
        self.writer = SummaryWriter(args.tb_dir or os.path.join(args.logdir, "tb"))
        self.writer.add_text("config", "```toml\n" + config_text + "\n```", 0)
        self.events = open(os.path.join(args.logdir, "events.jsonl"), "a")
        if args.wandb:
            self.wandb = start_wandb(args)

    def scalars(self, values, step):
        if not self.active:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        if self.wandb:
            # W&B wants one increasing step; ours differ per record kind (step, epoch), so they go in as data.
            self.wandb.log({**values, "x_step": step})

    def event(self, record):
        if self.active:
            self.events.write(json.dumps(record) + "\n")
            self.events.flush()

    def epoch_row(self, row):
        """One row of summary.csv; the header is the first row's keys (kept on resume)."""
        if not self.active:
            return
        path = os.path.join(self.logdir, "summary.csv")
        fields = list(row)
        if os.path.exists(path):
            with open(path) as f:
                fields = next(csv.reader(f), fields)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
            if f.tell() == 0:
                w.writeheader()
            w.writerow(row)

    def image(self, tag, image_hwc, step):
        if not self.active:
            return
        self.writer.add_image(tag, image_hwc, step, dataformats="HWC")
        if self.wandb:
            import wandb
            self.wandb.log({tag: wandb.Image(image_hwc), "x_step": step})

    def close(self, hparams=None, metrics=None):
        """Flush and close every sink; later calls do nothing (train.py closes on every way out)."""
        if not self.active:
            return
        self.active = False
        if hparams is not None:
            plain = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
            self.writer.add_hparams(plain, metrics or {}, run_name="hparams")
        self.writer.close()
        self.events.close()
        if self.wandb:
            self.wandb.finish()


def start_wandb(args):
    """Import wandb only when asked; without the package the run goes on without it."""
    try:
        import wandb
    except ImportError:
        log.warning("--wandb: the wandb package is not installed (pip install wandb); continuing without it")
        return None
    return wandb.init(project=args.wandb_project, entity=args.wandb_entity, mode=args.wandb_mode, dir=args.logdir,
                      config={k: v for k, v in vars(args).items()}, name=os.path.basename(args.logdir))


def memory_scalars():
    """This process's memory now, in MiB: resident (RSS) of the process and of its children (loader workers and
    their fork server), and on a GPU the allocator's peak and reserved memory. Recorded every epoch, so a leak
    shows as a rising curve."""
    me = psutil.Process()
    children = me.children(recursive=True)
    workers = 0
    for child in children:
        with contextlib.suppress(psutil.Error):  # a worker may exit between the listing and the reading
            workers += child.memory_info().rss
    out = {"memory/rss_mib": me.memory_info().rss / 2**20, "memory/workers_rss_mib": workers / 2**20}
    if torch.cuda.is_available():
        out.update({"gpu/max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
                    "gpu/reserved_mib": torch.cuda.memory_reserved() / 2**20})
    return out


def peak_memory():
    """Peak resident memory of this process and peak GPU memory allocated, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return rss, gpu


class GpuMonitor:
    """Samples this node's GPUs with gpustat (NVML) every `interval` seconds into TensorBoard, tagged by host."""

    def __init__(self, args, ctx):
        self.thread = None
        if ctx.local_rank != 0 or args.gpu_stats_interval <= 0:
            return
        try:
            import gpustat
            gpustat.new_query()
        except Exception as e:  # no driver, no NVML, no GPU: all mean "nothing to watch"
            log.info(f"GPU monitor off: {' '.join(str(e).split()) or type(e).__name__}")
            return
        from torch.utils.tensorboard import SummaryWriter
        self.host = socket.gethostname()
        self.writer = SummaryWriter(os.path.join(args.tb_dir or os.path.join(args.logdir, "tb"), f"gpu-{self.host}"))
        self.interval, self.stop_event, self.query = args.gpu_stats_interval, threading.Event(), gpustat.new_query
        self.thread = threading.Thread(target=self.run, name="gpu-monitor", daemon=True)
        self.thread.start()
        log.info(f"GPU monitor on: every {self.interval:g} s on {self.host}")

    def run(self):
        step = 0
        while not self.stop_event.wait(self.interval):
            try:
                for gpu in self.query().gpus:
                    prefix = f"gpu/{self.host}/{gpu.index}"
                    for name, value in (("utilization", gpu.utilization), ("memory_used_mib", gpu.memory_used),
                                        ("memory_total_mib", gpu.memory_total), ("temperature", gpu.temperature),
                                        ("power_w", gpu.power_draw)):
                        if value is not None:
                            self.writer.add_scalar(f"{prefix}/{name}", value, step)
            except Exception as e:  # a flaky NVML read must never stop training
                log.warning(f"GPU monitor: {e}")
            step += 1

    def stop(self):
        if self.thread is not None:
            self.stop_event.set()
            self.thread.join(timeout=5)
            self.writer.close()
