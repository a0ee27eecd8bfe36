"""No hidden host syncs in the training step. On a GPU, an op that needs a value on the host (`.item()`, `nonzero`,
boolean-mask indexing, a tensor made from Python data inside the step) makes the host wait for the device. Run on
the CPU under a TorchDispatchMode that records every aten op, a few real training steps (engine.loop with
train.py's model, criterion, optimizer, fault guard and EMA) must call none of them: the loop's one planned read per
update is a `.tolist()` of the all-reduced loss, which does not pass through the dispatcher."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tasks
import train
from core import config, distributed
from engine import faults, recipe
from engine import loop as engine
from engine.optim import build_optimizer
from engine.records import Recorder

SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
           "aten.lift_fresh.default", "aten.bincount.default", "aten.unique_consecutive.default",
           "aten._unique2.default"}
MASK_INDEXING = {"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default"}


class SyncOps(TorchDispatchMode):
    """Records the ops that would wait for a GPU, by name (boolean-mask indexing as 'mask indexing (op)')."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in SYNCING:
            self.found.append(name)
        elif name in MASK_INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                           for i in (args[1] if len(args) > 1 else ()) or ()):
            self.found.append(f"mask indexing ({name})")
        return func(*args, **(kwargs or {}))


def batches(task, n, size, classes, generator):
    if task == "classification":
        return [(torch.randn(4, 3, size, size, generator=generator),
                 torch.randint(0, classes, (4,), generator=generator)) for _ in range(n)]
    out = []
    for _ in range(n):
        target = torch.randint(0, classes, (2, size, size), generator=generator)
        target[:, :4] = 255  # ignored pixels, as crops padded at the border have
        if task == "scribble":  # scribbles (mostly unlabelled), pseudo labels and both distance maps
            scribble = torch.full_like(target, 255)
            scribble[:, size // 2] = target[:, size // 2]
            target = {"scribble": scribble, "pseudo": target,
                      "dist_s": torch.randint(0, 256, (2, size, size), generator=generator, dtype=torch.uint8),
                      "dist_c": torch.randint(0, 256, (2, size, size), generator=generator, dtype=torch.uint8)}
        out.append((torch.randn(2, 3, size, size, generator=generator), target))
    return out


@pytest.mark.parametrize("flags", [
    [],  # the default segmentation model, ce + dice
    ["--task", "classification", "--model_type", "resnet18", "--image_size", "32", "--numclasses", "3",
     "--class_weights", "1", "2", "0.5"],
    ["--loss", "ce", "focal:0.5", "lovasz:0.5", "bce:0.2"],
    ["--model_type", "deeplabv3p_lorm", "--dataset", "ScribblePseudoDsDc", "--l_lorm", "0.1"],
], ids=["segmentation", "classification-class-weights", "segmentation-other-losses", "scribble-lorm"])
def test_training_steps_call_no_op_that_waits_for_the_device(tmp_path, flags):
    args = config.parse_args(train.get_args_parser(), [*flags, "--ema_decay", "0.9", "--log_interval", "1000",
                                                       "--no_progress", "--epochs", "1", "--logdir", str(tmp_path)],
                             task_defaults=tasks.task_defaults)
    if args.numclasses is None:
        args.numclasses = 5
    task = tasks.get_task(args.task)
    torch.manual_seed(0)
    model = task.build_model(args)
    criterion = task.build_criterion(args, model)
    optimizer = build_optimizer(args, model, args.lr)
    ema = recipe.build_ema(model, args.ema_decay)
    ctx = distributed.Dist()
    recorder = Recorder(args, ctx, "")
    run = engine.Run(model, criterion, optimizer, recipe.Amp(), faults.Guard(args, handle_signals=False), recorder,
                     ctx, args, lambda step: args.lr, on_update=lambda step, done: ema.update_parameters(model))
    kind = "scribble" if args.dataset.startswith("Scribble") else args.task
    data = batches(kind, 4, 32, args.numclasses, torch.Generator().manual_seed(0))
    engine.train_one_epoch(run, data[:1], 0, 0)  # warm-up: first-call set-up is not the step
    with SyncOps() as ops:
        engine.train_one_epoch(run, data[1:], 0, 1)
    recorder.close()
    assert ops.found == [], sorted(set(ops.found))
