"""Process setup and teardown, rank-0 helpers, logging, seeding and checkpoint I/O.

One process model: a single process is a world of size 1. The collective helpers below are no-ops
when no process group exists, so callers never branch on the world size.
"""
import argparse
import datetime
import logging
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------

# Launchers and the variables they set: (rank, world size, local rank). torchrun and
# torch.distributed.launch set the first; SLURM's srun, OpenMPI's and MPICH/Intel MPI's mpirun the others.
LAUNCHER_ENV = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("SLURM", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("OpenMPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""
    launcher: str = ""

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return dist.is_available() and dist.is_initialized()


def add_dist_args(parser):
    g = parser.add_argument_group("processes")
    g.add_argument("--device", default="auto",
                   help="auto (cuda:LOCAL_RANK when a GPU is visible, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--distributed", action="store_true",
                   help="join a process group; rank, world size and local rank come from the launcher's environment")
    g.add_argument("--dist_backend", default=None, choices=["nccl", "gloo", "mpi"],
                   help="default: nccl on GPUs, gloo on the CPU")
    g.add_argument("--dist_url", default="env://",
                   help="rendezvous: env:// reads MASTER_ADDR/MASTER_PORT, or tcp://HOST:PORT")
    g.add_argument("--dist_timeout", type=float, default=1800, help="seconds a collective may wait")
    g.add_argument("--world_size", type=int, default=None,
                   help="expected number of processes; checked against the launcher's environment")
    # The legacy launcher passes --local-rank (or --local_rank); the environment wins where it has one.
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return g


def launcher_env(args):
    """(launcher, rank, world size, local rank) from the environment, or None for a plain single process."""
    for launcher, rank_key, size_key, local_key in LAUNCHER_ENV:
        if rank_key in os.environ and size_key in os.environ:
            # A batch allocation sets SLURM_/MPI variables for a plain `python` too; only torchrun's
            # variables mean "you are one of N" without --distributed.
            if launcher != "torchrun" and not args.distributed:
                continue
            rank, size = int(os.environ[rank_key]), int(os.environ[size_key])
            local = os.environ.get(local_key)
            local = int(local) if local is not None else (args.local_rank or 0)
            return launcher, rank, size, local
    return None


def init_distributed(args):
    """Pick the device and, under a launcher, join the process group. Returns a Dist."""
    found = launcher_env(args)
    launcher, rank, world, local = found or ("", 0, 1, args.local_rank or 0)
    if args.world_size is not None and args.world_size != world:
        raise UserError(f"--world_size {args.world_size} does not match the {world} process(es) "
                        f"that the environment ({launcher or 'no launcher'}) describes")
    if args.device == "auto":
        device = torch.device(f"cuda:{local % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {args.device} was asked for, but no CUDA GPU is visible")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    ctx = Dist(rank, world, local, device, launcher=launcher)
    # --distributed without any launcher (e.g. a saved config re-run by hand) is simply one process.
    if found is None or not (args.distributed or world > 1):
        return ctx
    if args.dist_url == "env://":
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise UserError(f"{' and '.join(missing)} not set: the {launcher or 'environment'} gives no rendezvous "
                            f"address; export MASTER_ADDR/MASTER_PORT or pass --dist_url tcp://HOST:PORT")
    ctx.backend = args.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
    where = (f"{os.environ.get('MASTER_ADDR')} port {os.environ.get('MASTER_PORT')}" if args.dist_url == "env://"
             else args.dist_url)
    timeout = datetime.timedelta(seconds=args.dist_timeout)
    try:
        dist.init_process_group(ctx.backend, rank=rank, world_size=world, timeout=timeout,
                                device_id=device if ctx.backend == "nccl" else None,
                                **rendezvous(args.dist_url, rank, world, timeout))
    except (RuntimeError, ValueError) as e:  # DistNetworkError and DistStoreError are RuntimeErrors
        text = str(e)
        if "EADDRINUSE" in text or "address already in use" in text.lower():
            raise UserError(f"rendezvous {where} is already in use by another program; expected a free port "
                            f"(set MASTER_PORT or torchrun --master_port)") from e
        raise UserError(f"could not join the process group at {where} as rank {rank} of {world} within "
                        f"--dist_timeout {args.dist_timeout:g} s: {first_line(e)}") from e
    return ctx


def rendezvous(dist_url, rank, world, timeout):
    """init_process_group's rendezvous arguments. After a torchrun restart, the store keys are prefixed with the
    restart count: torchrun keeps its store across restarts, and a new worker could otherwise read the address
    that a dead worker of the previous attempt published, and fail with "connection refused"."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if dist_url != "env://" or attempt is None:
        return {"init_method": dist_url}
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, timeout=timeout, multi_tenant=True)
    return {"store": dist.PrefixStore(f"ailab/attempt_{attempt}", store)}


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor):
    """Sum a tensor over all ranks in place (nothing to do in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def scaled_lr(args, world_size):
    """Linear scaling rule: the per-process LR times the number of processes."""
    return args.lr * world_size if args.lr_scaling == "linear" else args.lr


# ----------------------------------------------------------------------------------------------
# Logging, seeding, entry points
# ----------------------------------------------------------------------------------------------

def setup_logging(ctx, logfile=None):
    """Rank 0 logs INFO to stdout (and `logfile`); other ranks log only warnings and errors, tagged."""
    log = logging.getLogger("ailab")
    log.handlers.clear()
    log.propagate = False
    if ctx.is_main:
        log.setLevel(logging.INFO)
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
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


def run_entry(main, parser, argv=None):
    """Parse flags (config file, --set, command line) and run `main(args)`.

    A UserError becomes one line on stderr and exit code 2.
    """
    import config  # config.py imports this module for UserError
    try:
        args = config.parse_args(parser, argv)
        if args.print_config:
            print(config.to_toml(args, parser), end="")
            return
        main(args)
    except UserError as e:
        rank = os.environ.get("RANK")
        tag = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{tag}error: {e}", file=sys.stderr, flush=True)
        cleanup_distributed()
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


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

def write_atomic(path, payload):
    """Write text or bytes to `path` through a temporary file and a rename, so readers never see half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(payload.encode("utf-8") if isinstance(payload, str) else payload)
    os.replace(tmp, path)


def save_checkpoint(state, path):
    """Write `state` atomically: a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = getattr(e, "strerror", None) or first_line(e)
        raise UserError(f"could not write checkpoint {path} ({reason}; disk full or not writable?); "
                        f"the previous file is untouched") from e
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def load_checkpoint(path):
    """Load a checkpoint with weights_only=True onto the CPU; one clear error for anything else."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
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


MODEL_KEYS = ("model_type", "layers", "numclasses", "output_stride", "head_channels")


def check_compatible(ckpt, args, path):
    """Refuse a checkpoint whose model flags differ from this run's, naming the flag."""
    saved = ckpt["args"]
    for key in MODEL_KEYS:
        if key in saved and getattr(args, key, None) is not None and saved[key] != getattr(args, key):
            raise UserError(f"checkpoint {path} was trained with --{key} {saved[key]}, "
                            f"but this run has --{key} {getattr(args, key)}; drop the flag or use another checkpoint")
