"""Training state on disk: what a checkpoint holds, periodic and recovery copies, and where a run resumes.

Every file is written atomically by utils.save_checkpoint. A checkpoint holds the model, optimizer, AMP scaler
and EMA state, the early-stopping counters, the place to resume (`resume_at`: epoch, batch within it, global
optimizer step), the world size and batch layout it was saved with, and every rank's random-generator states,
gathered to rank 0 so that the set is saved in one atomic file.
"""
import glob
import logging
import os
import random
import re

import numpy as np
import torch

from core.config import NOT_SAVED
from core.distributed import all_reduce_sum, broadcast_object, gather_objects
from utils import UserError, check_compatible, link_checkpoint, load_checkpoint, save_checkpoint

log = logging.getLogger("ailab")

RECOVERY, LAST, BEST = "recovery.pth", "last.pth", "best.pth"
# Settings of the machine and the launch, not of the run: a resumed run never takes them from its checkpoint.
MACHINE_FLAGS = {"device", "distributed", "dist_backend", "dist_url", "dist_timeout", "world_size", "local_rank",
                 "data_cache", "resume", "logdir"}


def add_checkpoint_args(group):
    group.add_argument("--resume", default=None, metavar="PATH|auto",
                       help="continue from a checkpoint (mid-epoch for recovery.pth); auto: the newest of "
                            "recovery.pth and last.pth in --logdir, or a fresh start when there is none")
    group.add_argument("--resume_strict", action="store_true",
                       help="refuse to resume with another world size, batch size or --accum_steps")
    group.add_argument("--save_interval", type=int, default=None, metavar="N",
                       help="also keep epoch_XXX.pth every N epochs (last.pth and best.pth are always written)")
    group.add_argument("--keep_last", type=int, default=None, metavar="K",
                       help="keep only the K newest epoch_XXX.pth files")
    group.add_argument("--recovery_interval", type=int, default=None, metavar="STEPS",
                       help="write recovery.pth every N optimizer steps inside an epoch, to resume mid-epoch")
    group.add_argument("--recovery_period", type=float, default=None, metavar="EPOCHS",
                       help="the same in epochs: 0.1 writes recovery.pth every tenth of an epoch")
    group.add_argument("--save_period", type=float, default=None, metavar="EPOCHS",
                       help="write last.pth every EPOCHS: a fraction (0.1) also writes it inside each epoch, a whole "
                            "number N only after every Nth epoch (and the last); default every epoch")
    group.add_argument("--no_save_best", action="store_true", help="do not write best.pth")
    group.add_argument("--no_save_last", action="store_true",
                       help="do not write last.pth (recovery.pth, if any, is then the only resume point)")


# ----------------------------------------------------------------------------------------------
# Random-generator state, as plain values that torch.load(weights_only=True) accepts
# ----------------------------------------------------------------------------------------------

def rng_state(device):
    """This process's generator states: Python, numpy, torch's CPU generator and, on a GPU, that GPU's only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    """Restore rng_state(device)'s states; the CUDA one goes to this process's GPU."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # saved before: every visible GPU's state; this process used the one it runs on
        cuda = cuda[device.index] if device.type == "cuda" and device.index is not None and device.index < len(cuda) \
            else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def gather_rng_states(device):
    """Every rank's generator states in rank order on rank 0 (None elsewhere); a collective call."""
    return gather_objects(rng_state(device))


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def save_on_rank0(ctx, state, paths):
    """Rank 0 writes `state` to the first path and links the others to it; every rank learns whether that worked,
    so all stop together."""
    error = None
    if ctx.is_main and paths:
        try:
            save_checkpoint(state, paths[0])
            for path in paths[1:]:
                if not link_checkpoint(paths[0], path):
                    save_checkpoint(state, path)
        except UserError as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise UserError(error)


def periodic_name(epoch):
    return f"epoch_{epoch:03d}.pth"


def check_save_args(args):
    """The checkpoint periods, checked before anything runs."""
    if args.recovery_interval and args.recovery_period:
        raise UserError(f"--recovery_interval {args.recovery_interval} and --recovery_period {args.recovery_period:g} "
                        f"both set how often recovery.pth is written; expected one of them")
    for name in ("recovery_period", "save_period"):
        value = getattr(args, name)
        if value is not None and not (value > 0 and (value < 1 or float(value).is_integer())):
            raise UserError(f"--{name} {value:g}: expected a fraction of an epoch in (0, 1) or a whole number of "
                            f"epochs")
    if args.no_save_last and args.save_period:
        raise UserError("--save_period says how often last.pth is written, and --no_save_last not to write it; "
                        "expected one of them")


def steps_every(period, steps_per_epoch):
    """Optimizer steps between writes for a period in epochs (a fraction of an epoch is rounded, at least 1)."""
    return max(1, round(period * steps_per_epoch)) if period else None


def saved_at_epoch_end(args, epoch, last_epoch):
    """The files written after `epoch` (1-based), besides best.pth: last.pth and any epoch_XXX.pth."""
    period = args.save_period
    last = not args.no_save_last and (not period or period < 1 or epoch % int(period) == 0 or epoch == last_epoch)
    periodic = args.save_interval and epoch % args.save_interval == 0
    return ([LAST] if last else []) + ([periodic_name(epoch)] if periodic else [])


def prune_periodic(logdir, keep_last):
    """Delete all but the `keep_last` newest epoch_XXX.pth files; last.pth, best.pth, recovery.pth stay."""
    found = sorted((int(m.group(1)), path) for path in glob.glob(os.path.join(logdir, "epoch_*.pth"))
                   if (m := re.fullmatch(r"epoch_(\d+)\.pth", os.path.basename(path))))
    for _, path in found[:max(0, len(found) - keep_last)]:
        os.remove(path)


# ----------------------------------------------------------------------------------------------
# Reading: which checkpoint, and where in it to continue
# ----------------------------------------------------------------------------------------------

def resume_position(ckpt):
    """(epoch, batch, step) to continue at; checkpoints from before recovery files resume at the next epoch."""
    at = ckpt.get("resume_at") or {"epoch": ckpt["epoch"] + 1, "batch": 0, "step": None}
    return at["epoch"], at["batch"], at["step"]


_loaded = {}


def load_once(path):
    """load_checkpoint, read from disk once for flag parsing and main: the first call keeps what it loaded, the
    next call for the same unchanged file hands it over and forgets it, so a large checkpoint is not held in memory
    for the whole run."""
    stat = os.stat(path) if os.path.isfile(path) else None
    key = (os.path.abspath(path), stat and (stat.st_mtime_ns, stat.st_size))
    if key in _loaded:
        return _loaded.pop(key)
    _loaded[key] = load_checkpoint(path)
    return _loaded[key]


def find_resume(resume, logdir):
    """(path, checkpoint) to resume from, or (None, None). `auto` picks the furthest of recovery.pth and
    last.pth in `logdir` (by position, not by file time) and is a fresh start when neither exists."""
    if resume is None:
        return None, None
    if resume != "auto":
        return resume, load_once(resume)
    if logdir is None:
        return None, None
    found = [(path, load_once(path)) for path in (os.path.join(logdir, n) for n in (RECOVERY, LAST))
             if os.path.isfile(path)]
    if not found:
        return None, None
    return max(found, key=lambda item: resume_position(item[1])[:2])


def agree_on_resume(resume, path, ckpt):
    """Every process must resume the same position: where --logdir is a folder of each machine's own, `--resume
    auto` finds a checkpoint on one machine and none on another, and the processes would train different weights
    (or wait on each other for ever). One broadcast and one all-reduce tell every process whether all agree;
    if not, all stop with the same line. Nothing to agree on without --resume."""
    if resume is None:
        return
    mine = list(resume_position(ckpt)) if ckpt is not None else None
    first, first_path = broadcast_object((mine, path))  # rank 0's
    others = int(all_reduce_sum(torch.full((1,), float(mine != first))).tolist()[0])
    if others:
        what = f"resumes {first_path} at epoch {first[0] + 1}, batch {first[1]}" if first else "finds nothing to resume"
        raise UserError(f"--resume {resume}: rank 0 {what}, but {others} process(es) see another "
                        f"checkpoint or none; expected every machine to see the same checkpoint (--logdir on a "
                        f"folder shared between machines, or the same files in each machine's folder)")


def resume_logdir(resume, logdir):
    """The run folder: --logdir, else the folder of a --resume checkpoint path (None: a new folder is named)."""
    return logdir if logdir is not None or resume in (None, "auto") else os.path.dirname(os.path.abspath(resume))


# What a checkpoint saved before a setting existed was trained with (segmentation's defaults were then sgd and ce).
TRAINED_BEFORE = {"optimizer": "sgd", "loss": ["ce"]}


def saved_settings(args):
    """The resumed checkpoint's settings, as flag defaults for this run (config.parse_args's hook); None when
    there is nothing to resume. Machine and launch flags stay this run's own."""
    _, ckpt = find_resume(args.resume, resume_logdir(args.resume, args.logdir))
    if ckpt is None:
        return None
    return {**TRAINED_BEFORE, **{k: v for k, v in ckpt["args"].items() if k not in MACHINE_FLAGS}}


def check_settings(ckpt, args, path):
    """Refuse a model flag that contradicts the checkpoint; return the other settings this run changes, as
    'flag: saved -> now' texts for the log (e.g. --epochs to extend a run)."""
    check_compatible(ckpt, args, path)
    saved = ckpt["args"]
    return [f"--{key} {saved[key]} -> {value}" for key, value in sorted(vars(args).items())
            if key in saved and key not in MACHINE_FLAGS | NOT_SAVED and saved[key] != value]


def plan_resume(ckpt, path, args, ctx, steps_per_epoch, strict):
    """(epoch, batch, step, exact) for this run. With the same world size, batch size and accumulation the
    position is exact; otherwise the consumed share of the epoch is kept, rounded down to a whole update."""
    epoch, batch, step = resume_position(ckpt)
    saved = (ckpt.get("world_size", ctx.world_size), ckpt["args"].get("batchsize", args.batchsize),
             ckpt["args"].get("accum_steps", 1))
    now = (ctx.world_size, args.batchsize, args.accum_steps)
    if saved == now and step is not None:
        return epoch, batch, step, True
    change = ", ".join(f"{name} {a} -> {b}" for name, a, b in zip(("world size", "batch size", "accum_steps"),
                                                                    saved, now) if a != b)
    if strict and change:
        raise UserError(f"--resume_strict: checkpoint {path} was saved with {change.replace(' -> ', ', this run has ')}; "
                        f"expected the same world size, --batchsize and --accum_steps")
    samples = batch * saved[0] * saved[1]
    batch = samples // (ctx.world_size * args.batchsize)
    batch -= batch % args.accum_steps
    if change:
        log.warning(f"resuming {path} with {change}: model and optimizer state carry over, but the exact sample "
                    f"order and per-rank random state of the interrupted epoch cannot be reproduced")
    return epoch, batch, epoch * steps_per_epoch + batch // args.accum_steps, False
