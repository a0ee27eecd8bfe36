"""Errors, logging, seeding, the entry-point wrapper and checkpoint I/O. Processes and collectives: distributed.py."""
import contextlib
import errno
import logging
import os
import random
import sys
import warnings

import numpy as np
import torch

IGNORE_INDEX = 255  # a label value that means "not labelled": no loss, no metric


class RunError(Exception):
    """A reason to stop that the user reads as one line, without a traceback; the process exits with exit_code."""
    exit_code = 1


class UserError(RunError):
    """A problem with the user's input: printed as one line, exit code 2."""
    exit_code = 2


def scaled_lr(args, world_size):
    """Linear scaling rule: the per-process LR times the number of processes."""
    return args.lr * world_size if args.lr_scaling == "linear" else args.lr


# ----------------------------------------------------------------------------------------------
# Logging, seeding, entry points
# ----------------------------------------------------------------------------------------------

def setup_logging(ctx, logfile=None, level="INFO", line_format=None):
    """Rank 0 logs `level` to stdout (and `logfile`); other ranks log only warnings and errors, tagged."""
    log = logging.getLogger("ailab")
    log.handlers.clear()
    log.propagate = False
    if ctx.is_main:
        log.setLevel(level)
        try:
            fmt = logging.Formatter(line_format or "%(asctime)s %(message)s", None if line_format else "%H:%M:%S")
            fmt.format(logging.LogRecord("ailab", logging.INFO, "", 0, "check", None, None))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"--log_format {line_format!r} is not a logging format ({e}); expected e.g. "
                            f"'%(asctime)s %(levelname)s | %(message)s'") from None
        handlers = [logging.StreamHandler(sys.stdout)]
        if logfile:
            os.makedirs(os.path.dirname(logfile) or ".", exist_ok=True)
            handlers.append(logging.FileHandler(logfile))
    else:
        log.setLevel(logging.WARNING)
        fmt = logging.Formatter(f"%(asctime)s [rank {ctx.rank}] %(levelname)s %(message)s", "%H:%M:%S")
        handlers = [logging.StreamHandler(sys.stderr)]
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    return log


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def first_line(error):
    """The first line of an exception's message (or its type name when it has none), for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def link_latest(logdir):
    """Point <parent>/latest at `logdir`, so README commands can say runs/latest/best.pth."""
    parent, name = os.path.split(os.path.abspath(logdir))
    tmp = os.path.join(parent, f".latest-{os.getpid()}")
    try:
        os.symlink(name, tmp)
        os.replace(tmp, os.path.join(parent, "latest"))
    except OSError:  # a filesystem without symlinks: the link is a convenience only
        if os.path.lexists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def replacing(path, durable=False):
    """Yield a temporary name beside `path` (same folder and extension); when the block ends without error, rename
    it over `path`, so a reader sees the old file or the new one, never half of one. On an error the temporary
    file is removed and `path` is untouched. `durable`: also fsync the folder, making the rename survive a power
    cut (the block fsyncs the file's own bytes)."""
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}{os.path.splitext(name)[1]}")  # PIL/OpenCV read the ext
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    if durable:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as e:  # some network and FUSE file systems cannot fsync a folder; the rename is done
            if e.errno not in (errno.EINVAL, errno.ENOTSUP):
                raise
        finally:
            os.close(fd)


def write_atomic(path, payload):
    """Write text or bytes to `path` through a temporary file and a rename, so readers never see half a file."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(payload.encode("utf-8") if isinstance(payload, str) else payload)


def save_checkpoint(state, path):
    """Write `state` atomically and durably: a temporary file in the same folder, fsync, rename over `path`, fsync
    the folder. A crash at any moment leaves either the old file or the new one, never a torn one."""
    try:
        with replacing(path, durable=True) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as a RuntimeError
        reason = getattr(e, "strerror", None) or first_line(e)
        raise UserError(f"could not write checkpoint {path} ({reason}; disk full or not writable?); "
                        f"the previous file is untouched") from e


def link_checkpoint(source, path):
    """Make `path` a second name of the checkpoint just written to `source` (a hard link: the bytes are not written
    twice), swapped in atomically like save_checkpoint. A later save_checkpoint to either name replaces that name
    only. Returns False where the file system has no hard links; the caller then writes the file again."""
    try:
        with replacing(path, durable=True) as tmp:
            os.link(source, tmp)
    except OSError:
        return False
    return True


def torch_load_cpu(path):
    """torch.load(weights_only=True) onto the CPU. torch's note about an unusual pickle protocol is silenced: for a
    foreign or corrupt file it would come on top of the caller's one-line error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path):
    """Load a checkpoint with weights_only=True onto the CPU; one clear error for anything else."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch_load_cpu(path)
    except Exception as e:  # torch raises many types for truncated, corrupt or foreign files
        raise UserError(f"checkpoint {path} could not be read ({first_line(e)}); expected a .pth written by train.py") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        raise UserError(f"{path} is not an ailab checkpoint: expected a dict with 'model' and 'args' entries")
    return ckpt


def unwrap_state_dict(state):
    """Drop the prefixes that DDP (`module.`) and torch.compile (`_orig_mod.`) add to parameter names."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


MODEL_KEYS = ("task", "model_type", "layers", "numclasses", "output_stride", "head_channels", "stem")


def check_compatible(ckpt, args, path):
    """Refuse a checkpoint whose model flags differ from this run's, naming the flag."""
    saved = ckpt["args"]
    for key in MODEL_KEYS:
        if key in saved and getattr(args, key, None) is not None and saved[key] != getattr(args, key):
            raise UserError(f"checkpoint {path} was trained with --{key} {saved[key]}, but this run asks for "
                            f"--{key} {getattr(args, key)}; the model is the checkpoint's: drop the flag, or use "
                            f"another checkpoint")
