"""Training-recipe switches around the model and the optimizer step: mixed precision, freezing, SyncBN,
channels-last, torch.compile with a fallback, an EMA of the weights, early stopping and determinism.

Each is a flag that a config file can set; train.py applies them in this order:
build -> pretrained weights -> freeze -> SyncBN -> channels-last -> EMA copy -> DDP -> compile.
"""
import contextlib
import copy
import fnmatch
import logging
import os
import platform
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from utils import UserError, first_line

log = logging.getLogger("ailab")


def add_recipe_args(parser):
    g = parser.add_argument_group("recipe")
    g.add_argument("--amp", action="store_true", help="mixed precision with torch.autocast")
    g.add_argument("--amp_dtype", default="bfloat16", choices=["bfloat16", "float16"],
                   help="bfloat16 needs no loss scaling (CPU, Ampere and newer GPUs); float16 uses a GradScaler, "
                        "whose state is checkpointed, and needs CUDA (on the CPU it falls back to bfloat16)")
    g.add_argument("--accum_steps", type=int, default=1,
                   help="accumulate gradients over K batches per optimizer update; the LR schedule counts updates")
    g.add_argument("--clip_grad_norm", type=float, default=None, metavar="MAX",
                   help="clip the global gradient norm to MAX before each update (after unscaling under AMP)")
    g.add_argument("--sync_bn", action="store_true",
                   help="SyncBatchNorm across processes (CUDA and DDP only; ignored with a note otherwise)")
    g.add_argument("--channels_last", action="store_true", help="NHWC memory format for the model and its inputs")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training model; falls back to eager with a warning if compiling fails")
    g.add_argument("--ema_decay", type=float, default=None, metavar="D",
                   help="keep an exponential moving average of the weights (e.g. 0.999), evaluate it every epoch "
                        "and save it as 'ema' in checkpoints; best.pth and early stopping then follow the EMA")
    g.add_argument("--early_stop_patience", type=int, default=None, metavar="N",
                   help="stop after N epochs without a val mIoU gain of more than --early_stop_min_delta")
    g.add_argument("--early_stop_min_delta", type=float, default=0.0)
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms where torch has them (a warning names the ops without), "
                        "cudnn.benchmark off; without it cudnn.benchmark is on")
    g.add_argument("--pretrained", default=None, metavar="NAME|FILE",
                   help="initial weights: torchvision's published weights by name (DEFAULT, IMAGENET1K_V1, "
                        "ResNet50_Weights.IMAGENET1K_V2; a classifier's whole network, a segmentation model's ResNet "
                        "backbone), fetched into torch's hub cache (TORCH_HOME); or a local file: a train.py "
                        "checkpoint or state dict of this model, or a torchvision ResNet state dict for the "
                        "backbone. A --resume checkpoint wins over it")
    g.add_argument("--strict_load", action="store_true",
                   help="stop if --pretrained leaves any tensor missing, unexpected or of another shape")
    g.add_argument("--freeze", nargs="+", default=None, metavar="PATTERN",
                   help="freeze parameters whose names match a glob, e.g. 'backbone.layer1*' 'backbone.conv1*'")
    return g


def check_recipe_args(args):
    def need(ok, message):
        if not ok:
            raise UserError(message)
    need(args.accum_steps >= 1, f"--accum_steps {args.accum_steps} is not valid; expected an integer >= 1")
    need(args.clip_grad_norm is None or args.clip_grad_norm > 0,
         f"--clip_grad_norm {args.clip_grad_norm} is not valid; expected a positive number")
    need(args.ema_decay is None or 0 < args.ema_decay < 1,
         f"--ema_decay {args.ema_decay} is not valid; expected a number between 0 and 1 (e.g. 0.999)")
    need(args.early_stop_patience is None or args.early_stop_patience >= 1,
         f"--early_stop_patience {args.early_stop_patience} is not valid; expected an integer >= 1")
    need(args.early_stop_min_delta >= 0,
         f"--early_stop_min_delta {args.early_stop_min_delta} is not valid; expected a number >= 0")


# ----------------------------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------------------------

@dataclass
class Amp:
    """Autocast settings and the gradient scaler. Disabled, both are no-ops, so the step has one code path."""
    dtype: torch.dtype = None          # None: float32
    device_type: str = "cpu"
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def describe(self):
        if self.dtype is None:
            return "float32"
        return f"autocast {str(self.dtype).replace('torch.', '')}" + (
            " with a GradScaler" if self.scaler.is_enabled() else " (no loss scaling needed)")


def native_bf16(device):
    """True where `device` has bfloat16 arithmetic; where it would be emulated, bfloat16 autocast is slower than float32.

    CPUs: x86 needs AMX or AVX512-BF16 (oneDNN's bf16 path otherwise converts through float32 on plain AVX512 and
    is many times slower); other CPUs (Arm) ask oneDNN. GPUs: bfloat16 without emulation (Ampere and newer).
    """
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            try:
                return torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # torch before 2.3 has no including_emulation and does not count emulation
                return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True  # mps, xpu, ...: autocast there is the backend's own concern
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        cpu = getattr(torch, "cpu", None)
        checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        if all(checks):
            return any(check() for check in checks)
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_amp(args, device):
    """The autocast dtype for --amp on `device`, or None (float32): bfloat16 where it is native, else float16 on
    GPUs (with the GradScaler setup_amp adds) and float32 on CPUs. Each fallback says why in one line."""
    if not args.amp:
        return None
    device = torch.device(device)
    dtype = torch.float16 if args.amp_dtype == "float16" else torch.bfloat16
    if dtype == torch.float16 and device.type != "cuda":
        log.warning(f"--amp_dtype float16 needs CUDA, this runs on {device.type}; trying bfloat16 instead")
        dtype = torch.bfloat16
    if dtype == torch.bfloat16 and not native_bf16(device):
        if device.type == "cuda":  # before Ampere: float16 is native there, and needs the GradScaler
            log.warning("--amp: running float16 with a GradScaler: this GPU has no native bfloat16 (it would be "
                        "emulated, slower than float32)")
            return torch.float16
        log.warning("--amp: running in float32: this CPU has no bfloat16 arithmetic (AMX or AVX512-BF16), where "
                    "autocast would emulate it several times slower (benchmarks/amp_cpu.py measures it)")
        return None
    return dtype


def setup_amp(args, device):
    dtype = resolve_amp(args, device)
    # Only float16 has the narrow exponent range that makes small gradients underflow without scaling.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return Amp(dtype, device.type, scaler)


# ----------------------------------------------------------------------------------------------
# Model transformations
# ----------------------------------------------------------------------------------------------

def freeze(model, patterns):
    """requires_grad=False for parameters whose names match any glob; returns (tensors, elements) frozen."""
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise UserError(f"--freeze {pattern!r} matches no parameter; names look like "
                            f"{', '.join(names[:3])}, ..., {names[-1]}")
    tensors = elements = 0
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            p.requires_grad_(False)
            tensors, elements = tensors + 1, elements + p.numel()
    return tensors, elements


def convert_sync_bn(model, ctx):
    """SyncBatchNorm under DDP on CUDA; elsewhere the model is returned unchanged with a note saying why."""
    if not ctx.distributed:
        log.info("--sync_bn ignored: a single process has no other batch statistics to synchronise")
        return model
    if ctx.device.type != "cuda":
        log.warning(f"--sync_bn ignored: SyncBatchNorm needs CUDA devices, this runs on {ctx.device.type}; "
                    f"batch norm statistics stay per process")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


class CompileFallback(nn.Module):
    """torch.compile(model), or the eager model if compiling fails at the first call (with a warning).

    Compilation happens lazily inside the first forward, so that is where a missing compiler or an
    unsupported op shows up. The compiled wrapper is not registered as a submodule, so parameter and
    state-dict names stay the eager model's.
    """

    def __init__(self, model, backend="inductor"):
        super().__init__()
        self.eager = model
        object.__setattr__(self, "compiled", torch.compile(model, backend=backend))
        self.failed = False

    def no_sync(self):
        """DDP's no_sync() when the compiled model is DDP, so gradient accumulation skips the all-reduce."""
        return self.eager.no_sync() if hasattr(self.eager, "no_sync") else contextlib.nullcontext()

    def forward(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as e:
                # Tracing and compiling (a first call, or a recompile for a new input shape) fail before the frame
                # runs, so running it eagerly repeats nothing, DDP's pre-forward work included. Anything else (a
                # CUDA out-of-memory, a bad input) propagates: re-running would put this rank's collectives out of
                # step with the others'.
                self.failed = True
                log.warning(f"--compile: torch.compile failed ({first_line(e)[:200]}); training continues in eager mode")
        return self.eager(*args, **kwargs)


class Ema(nn.Module):
    """An exponential moving average of a model's weights and buffers (batch-norm statistics), kept in `module`.

    After each update: one fused lerp of the floating-point tensors towards the model's, one fused copy of the
    integer ones (batch norm's num_batches_tracked). The first update copies, as torch's AveragedModel does; which
    update is the first is a Python flag, not a counter tensor, so an update never waits for the device."""

    def __init__(self, model, decay):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.fresh = decay, True

    @torch.no_grad()
    def update_parameters(self, model):
        pairs = list(zip([*self.module.parameters(), *self.module.buffers()], [*model.parameters(), *model.buffers()]))
        floats = [(e, m.detach()) for e, m in pairs if e.is_floating_point()]
        others = [(e, m.detach()) for e, m in pairs if not e.is_floating_point()]
        if floats:
            ema, current = map(list, zip(*floats))
            if self.fresh:
                torch._foreach_copy_(ema, current)
            else:
                torch._foreach_lerp_(ema, current, 1.0 - self.decay)
        if others:
            torch._foreach_copy_(*map(list, zip(*others)))
        self.fresh = False


def build_ema(model, decay):
    """An Ema of `model` (on its device), updated after each optimizer step."""
    return Ema(model, decay)


def load_ema(ema, state):
    ema.module.load_state_dict(state)
    ema.fresh = False  # not a fresh average: the next update blends instead of copying


def ema_state(ema):
    """The EMA's weights under the model's own names, so test.py/infer.py can load them as a model."""
    return ema.module.state_dict()


# ----------------------------------------------------------------------------------------------
# Early stopping and determinism
# ----------------------------------------------------------------------------------------------

class EarlyStopping:
    """Counts epochs since the monitored metric last rose by more than min_delta; patience None never stops."""

    def __init__(self, patience=None, min_delta=0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.best_epoch, self.bad_epochs = None, 0, 0

    def update(self, value, epoch):
        """Record epoch `epoch`'s metric; True when training should stop after it."""
        if self.best is None or value > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return self.patience is not None and self.bad_epochs >= self.patience

    def reason(self, name="val mIoU"):
        return (f"early stopping: {name} has not risen by more than {self.min_delta:g} for {self.bad_epochs} "
                f"epochs (--early_stop_patience {self.patience}); best {self.best:.4f} at epoch {self.best_epoch}")

    def state_dict(self):
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state):
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


def setup_determinism(deterministic, device):
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible matrix products; set before the first CUDA call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a few CUDA kernels (e.g. bilinear upsampling backward) have no deterministic version;
        # torch names them in a warning instead of stopping the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = not deterministic and device.type == "cuda"
