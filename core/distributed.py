"""Processes: the launcher's environment, the process group, and every collective the suite calls.

One process model: a single process is a world of size 1, and every collective below is a no-op without a
process group, so callers never branch on the world size. This is the only module that talks to
torch.distributed (tests/test_collectives.py checks that).

Collectives run on the group's communication device. NCCL serves CUDA tensors only, so under NCCL a caller's
CPU tensor (a flag, a loss sum, a count) is copied to `cuda:LOCAL_RANK`, reduced there, and copied back; under
gloo everything stays where it is. Callers pass tensors on any device and get them back on the same device.
One backend per group, rather than `cpu:gloo,cuda:nccl`: a second backend would open a second set of
connections on every machine (with its own network-interface and timeout settings to get right on a cluster),
and would let a CPU tensor slip through on GPU jobs unnoticed.
"""
import argparse
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from core import config
from utils import RunError, UserError, first_line

# Launchers and the variables they set: (rank, world size, local rank, local world size), in the order they are
# looked for. torchrun and torch.distributed.launch first: they may run inside an MPI or SLURM job. MPI before
# SLURM: mpirun inside an sbatch allocation leaves SLURM_PROCID=0 (the batch step's) in every process it starts.
LAUNCHER_ENV = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("OpenMPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("SLURM", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
)

# Under NCCL, collectives run on this process's GPU; under gloo (and MPI) on the CPU. Set by init_distributed.
_comm_device = torch.device("cpu")
# This process's rank on its machine, for what one process per machine does (files in the data cache).
_local_rank = 0


class CollectiveError(RunError):
    """A collective that failed or outwaited --dist_timeout: another rank is stuck or gone. One line, exit 1."""


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""
    launcher: str = ""
    local_world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return is_initialized()


def is_local_main():
    """True in the process that writes this machine's shared files (local rank 0)."""
    return _local_rank == 0


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def add_dist_args(parser, timeout=1800):
    g = parser.add_argument_group("processes")
    g.add_argument("--device", default="auto",
                   help="auto (cuda:LOCAL_RANK when a GPU is visible, else cpu), cpu, cuda (= cuda:LOCAL_RANK) or "
                        "cuda:N (one process per node only)")
    g.add_argument("--distributed", action="store_true",
                   help="join a process group; rank, world size and local rank come from the launcher's environment")
    g.add_argument("--dist_backend", default=None, choices=["nccl", "gloo", "mpi"],
                   help="default: nccl on GPUs, gloo on the CPU")
    g.add_argument("--dist_url", default="env://",
                   help="rendezvous: env:// reads MASTER_ADDR/MASTER_PORT, or tcp://HOST:PORT")
    g.add_argument("--dist_timeout", type=float, default=timeout,
                   help="seconds a collective may wait for the other processes before the job stops")
    g.add_argument("--world_size", type=int, default=None,
                   help="expected number of processes; checked against the launcher's environment")
    # The legacy launcher passes --local-rank (or --local_rank); the environment wins where it has one.
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return g


def launcher_env(args):
    """(launcher, rank, world size, local rank, local world size or None) from the environment, or None for a
    plain single process."""
    for launcher, rank_key, size_key, local_key, local_size_key in LAUNCHER_ENV:
        if rank_key in os.environ and size_key in os.environ:
            # A batch allocation sets SLURM_/MPI variables for a plain `python` too; only torchrun's
            # variables mean "you are one of N" without --distributed.
            if launcher != "torchrun" and not args.distributed:
                continue
            rank, size = int(os.environ[rank_key]), int(os.environ[size_key])
            local = os.environ.get(local_key)
            local = int(local) if local is not None else (args.local_rank or 0)
            local_size = os.environ.get(local_size_key, "")
            return launcher, rank, size, local, int(local_size) if local_size.isdigit() else None
    return None


def gpu_index(local_rank, visible, distributed):
    """The GPU of this process among the `visible` ones: LOCAL_RANK when that many are visible, 0 when exactly one is
    (SLURM's --gpus-per-task, Kubernetes: one GPU per process), else UserError, never two ranks on one GPU by
    wrapping around."""
    if not distributed:
        return 0
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise UserError(f"LOCAL_RANK {local_rank} has no GPU of its own: {visible} GPU(s) are visible to it "
                    f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); expected at least "
                    f"LOCAL_RANK+1 = {local_rank + 1} visible GPUs, or exactly one per process")


def pick_device(spec, local_rank, local_world_size, distributed, visible=None):
    """The compute device for this process from --device: auto, cpu, cuda (each process its own GPU, gpu_index) or
    cuda:N. `visible`: the number of visible GPUs (default: torch's count)."""
    visible = torch.cuda.device_count() if visible is None else visible
    if spec == "auto":
        return torch.device("cuda", gpu_index(local_rank, visible, distributed)) if visible else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise UserError(f"--device {spec}: {first_line(e)}; expected auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if device.index is not None and distributed and (local_world_size or 1) > 1 and visible > 1:
            raise UserError(f"--device {spec} names one GPU, but {local_world_size} processes run on this node and "
                            f"would all use it; expected --device cuda (each process takes cuda:LOCAL_RANK)")
        if not visible:
            raise UserError(f"--device {spec} was asked for, but no CUDA GPU is visible")
        if device.index is None:
            device = torch.device("cuda", gpu_index(local_rank, visible, distributed) if distributed
                                  else torch.cuda.current_device())
        if device.index >= visible:
            raise UserError(f"--device resolves to {device}, but only {visible} GPU(s) are visible "
                            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                            f"expected one process per GPU")
    return device


def init_distributed(args):
    """Pick the device and, under a launcher, join the process group. Returns a Dist."""
    global _comm_device, _local_rank
    found = launcher_env(args)
    launcher, rank, world, local, local_world = found or ("", 0, 1, args.local_rank or 0, 1)
    _local_rank = local
    if args.world_size is not None and args.world_size != world:
        raise UserError(f"{config.given_as(args, 'world_size')} does not match the {world} process(es) "
                        f"that the environment ({launcher or 'no launcher'}) describes")
    joining = found is not None and (args.distributed or world > 1)
    device = pick_device(args.device, local, local_world, joining)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    ctx = Dist(rank, world, local, device, launcher=launcher, local_world_size=local_world or 1)
    # --distributed without any launcher (e.g. a saved config re-run by hand) is simply one process.
    if not joining:
        return ctx
    if args.dist_url == "env://":
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise UserError(f"{' and '.join(missing)} not set: the {launcher or 'environment'} gives no rendezvous "
                            f"address; export MASTER_ADDR/MASTER_PORT or pass --dist_url tcp://HOST:PORT")
    ctx.backend = args.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
    if ctx.backend == "nccl" and device.type != "cuda":
        raise UserError(f"--dist_backend nccl needs a CUDA device, but this process runs on {device}; "
                        f"expected --dist_backend gloo for CPU processes")
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
    _comm_device = comm_device(ctx.backend, device)
    return ctx


def comm_device(backend, device):
    """Where collectives of a `backend` group run for a process computing on `device`: NCCL needs that GPU,
    gloo and MPI take CPU tensors (gloo takes CUDA ones too, but the CPU is its native side)."""
    return device if backend == "nccl" else torch.device("cpu")


def rendezvous(dist_url, rank, world, timeout):
    """init_process_group's rendezvous arguments. Under torchrun, the process group's keys go under a prefix that
    names the attempt: torchrun's store outlives a restart of the workers, and a new worker could otherwise read
    the address a dead worker of an earlier attempt had published, and fail with "connection refused".

    The attempt is counted in the store by each rank itself: the n-th start of every rank is the n-th attempt.
    TORCHELASTIC_RESTART_COUNT cannot serve: each node's agent counts only its own failures, so after a worker
    dies on one node of a multi-node job, the other node's workers restart with the old count and the two
    halves would wait for each other under different prefixes."""
    if dist_url != "env://" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return {"init_method": dist_url}
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, timeout=timeout, multi_tenant=True)
    attempt = store.add(f"ailab/starts/world{world}/rank{rank}", 1)
    return {"store": dist.PrefixStore(f"ailab/attempt_{attempt}", store)}


def cleanup_distributed():
    if is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Collectives: the only calls into torch.distributed's communication functions.
# ----------------------------------------------------------------------------------------------

def _run(what, collective, *args, **kwargs):
    """Call a collective; a failure (a peer gone, --dist_timeout passed) becomes one line naming the operation."""
    try:
        return collective(*args, **kwargs)
    except (RuntimeError, ValueError) as e:  # DistBackendError and friends are RuntimeErrors
        raise CollectiveError(f"{what} across {dist.get_world_size()} processes failed on rank {dist.get_rank()}: "
                              f"{first_line(e)[:300]}; another rank is stuck or has stopped (collectives wait at "
                              f"most --dist_timeout seconds)") from e


def all_reduce_sum(tensor):
    """Sum a tensor over all ranks in place, on whatever device it lives; returns it."""
    if is_initialized():
        on_comm = tensor.to(_comm_device)
        _run(f"all_reduce of a {tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')} tensor",
             dist.all_reduce, on_comm, op=dist.ReduceOp.SUM)
        if on_comm is not tensor:
            tensor.copy_(on_comm)
    return tensor


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    _run(f"broadcast of a {type(obj).__name__} from rank 0", dist.broadcast_object_list, box, src=0,
         device=_comm_device)
    return box[0]


def gather_objects(obj):
    """Every rank's picklable `obj` in rank order on rank 0 (None on the others); [obj] in a single process."""
    if not is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    _run(f"gather of a {type(obj).__name__} to rank 0", dist.gather_object, obj, out, dst=0)
    return out


def broadcast_tensors(tensors):
    """Overwrite `tensors` (e.g. a model's buffers) with rank 0's values, one message per dtype and device."""
    if not is_initialized():
        return
    groups = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for (dtype, _), group in groups.items():
        flat = _flatten_dense_tensors([t.detach() for t in group]).to(_comm_device)
        _run(f"broadcast of {len(group)} {str(dtype).replace('torch.', '')} tensors from rank 0",
             dist.broadcast, flat, src=0)
        for t, value in zip(group, _unflatten_dense_tensors(flat, group)):
            t.detach().copy_(value)


def barrier():
    if is_initialized():
        _run("barrier", dist.barrier)
