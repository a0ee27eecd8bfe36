"""Stopping cleanly: SIGTERM/SIGINT and non-finite losses, decided the same way on every rank.

Before every update, each rank contributes its group's loss sum and its stop flag to one all-reduce, so all ranks
take the same branch: stop at a step boundary, skip an update, or go on. Nobody waits
forever for a rank that left: collectives time out after --dist_timeout seconds.
"""
import logging
import math
import signal

import torch

from core.distributed import all_reduce_sum

log = logging.getLogger("ailab")

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + signal number, as a shell reports them


def add_fault_args(group):
    group.add_argument("--nan_policy", default="stop", choices=["stop", "skip"],
                       help="a non-finite loss on any rank: stop (after writing recovery.pth from the last good "
                            "step) or skip that update on every rank")
    group.add_argument("--max_nan_skips", type=int, default=10,
                       help="with --nan_policy skip, stop after this many skipped updates in the run")


class Stop(Exception):
    """Raised on every rank at once; train.py writes recovery.pth at `position` and exits with `exit_code`."""

    def __init__(self, message, epoch, batch, step, exit_code):
        super().__init__(message)
        self.epoch, self.batch, self.step, self.exit_code = epoch, batch, step, exit_code


class Guard:
    """Signal handlers and the per-step agreement. A second Ctrl-C stops at once, without saving."""

    def __init__(self, args, nan_skips=0, handle_signals=True):
        self.policy, self.max_skips, self.nan_skips = args.nan_policy, args.max_nan_skips, nan_skips
        self.signal, self.stop_pending = None, False
        self.buffers, self.snapshot = [], []
        self.previous = {}
        for signum in EXIT_CODES if handle_signals else ():
            self.previous[signum] = signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the save
        self.signal = signal.Signals(signum)
        log.warning(f"{self.signal.name} received: stopping at the next step boundary (Ctrl-C again to quit now)")

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def begin_group(self, buffers):
        """Remember the buffers (batch-norm statistics) before a group's forward passes, to undo a dropped group.
        The copies are made for each new list of buffers (once an epoch) and refilled with one fused copy per group."""
        if buffers is not self.buffers:
            self.buffers, self.snapshot = buffers, [b.detach().clone() for b in buffers]
        elif buffers:
            torch._foreach_copy_(self.snapshot, [b.detach() for b in buffers])

    def agree(self, sums, batches, world_size, terms, lr, epoch, batch, step):
        """After the forward pass of a group's last batch, on every rank: one all-reduce of the group's summed loss and
        terms (`sums`, a device tensor over `batches` batches) with this rank's stop flag, read with one host sync.
        It runs before the backward pass, so a rank that never arrives is reported by this named collective (after
        --dist_timeout), not from inside DDP's gradient all-reduce.

        Returns (mean loss, {term: mean}, dropped), the same on every rank. A sum over ranks and batches is finite
        only when every loss in it is, so `dropped` is True when some rank's loss was not finite and --nan_policy
        skip allows dropping the group (its batch-norm statistics are then rolled back); raises Stop when the run
        must end instead. A stop signal on any rank is remembered in `stop_pending` for after the update."""
        flag = sums.new_full((1,), 0.0 if self.signal is None else 1.0)  # a fill on the device: no host copy to wait on
        values = all_reduce_sum(torch.cat([sums.detach(), flag])).tolist()
        self.stop_pending = self.stop_pending or values[-1] > 0
        count = batches * world_size
        value, term_values = values[0] / count, {k: v / count for k, v in zip(terms, values[1:-1])}
        if math.isfinite(values[0]):
            return value, term_values, False
        with torch.no_grad():
            for b, saved in zip(self.buffers, self.snapshot):
                b.copy_(saved)
        problem = self.non_finite(value, term_values, lr, epoch, batch, step)
        if problem is not None:
            raise problem  # the state is exactly the one after the last good update
        return value, term_values, True

    def stop_for_signal(self, epoch, batch, step):
        name = self.signal.name if self.signal is not None else "a stop signal on another rank"
        code = EXIT_CODES.get(self.signal, EXIT_CODES[signal.SIGTERM])
        return Stop(f"stopped by {name} at epoch {epoch + 1}, batch {batch}, step {step}", epoch, batch, step, code)

    def non_finite(self, value, terms, lr, epoch, batch, step):
        """None to skip this update (counted), or a Stop to raise."""
        detail = (f"loss {value} (terms: {', '.join(f'{k} {float(v):.4g}' for k, v in terms.items())}) at epoch "
                  f"{epoch + 1}, batch {batch}, step {step}, lr {lr:.4g}")
        if self.policy == "skip" and self.nan_skips < self.max_skips:
            self.nan_skips += 1
            log.warning(f"non-finite {detail} on some rank: update skipped on every rank "
                        f"({self.nan_skips}/{self.max_skips} skips)")
            return None
        reason = (f"{self.max_skips} updates already skipped (--max_nan_skips)" if self.policy == "skip"
                  else "--nan_policy stop")
        return Stop(f"non-finite {detail} on some rank; {reason}. Expected a finite loss: lower --lr, add "
                    f"--clip_grad_norm, or check the labels", epoch, batch, step, 2)
