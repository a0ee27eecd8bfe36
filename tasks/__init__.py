"""Tasks: what differs between segmentation and classification (data, models, criterion, metrics, what test.py and
infer.py write, what TensorBoard shows). The entry scripts ask the task for these; they never branch on its name.

A task is a class with the methods of tasks/segmentation.py's SegmentationTask; `get_task(name)` gives an instance.
"""
import argparse

from core.registry import import_plugins, suggest
from tasks.base import trained_args
from tasks.classification import ClassificationTask
from tasks.segmentation import SegmentationTask
from utils import UserError, check_compatible, first_line, load_checkpoint, unwrap_state_dict

TASKS = {task.name: task for task in (SegmentationTask, ClassificationTask)}
DEFAULT_TASK = SegmentationTask.name


def get_task(name):
    if name not in TASKS:
        hint = suggest(str(name), TASKS)
        raise UserError(f"--task {name!r} is unknown; {hint + ' ' if hint else ''}expected one of {', '.join(TASKS)}")
    return TASKS[name]()


def add_task_args(parser):
    """--task, and every task's own training flags (each in its own --help group)."""
    g = parser.add_argument_group("task")
    g.add_argument("--task", default=DEFAULT_TASK, type=task_name, metavar="{" + ",".join(sorted(TASKS)) + "}",
                   help="what to train; flags the task does not use are ignored, and the task sets the defaults "
                        "that differ (model, epochs, LR, ...) unless a flag or config file gives them")
    for task in TASKS.values():
        for group in task.add_train_args(parser):
            group.task = task.name  # config.to_toml leaves out the flags of the tasks a run does not do


def task_name(value):
    """--task's type: a task, with a pointer to main.py for seed 002's train/test/predict."""
    if value in ("train", "test", "predict"):
        raise argparse.ArgumentTypeError(f"{value!r} is an action of main.py (seed 002: main.py --task "
                                         f"train|test|predict); here --task picks the kind of model: "
                                         f"{' or '.join(sorted(TASKS))}")
    if value not in TASKS:
        hint = suggest(value, TASKS)
        raise argparse.ArgumentTypeError(f"{value!r} is unknown; {hint + ' ' if hint else ''}expected one of "
                                         f"{', '.join(sorted(TASKS))}")
    return value


def task_defaults(args):
    """The chosen task's flag defaults (config.parse_args's hook): between the built-in defaults and the rest."""
    return get_task(args.task).defaults


def task_of(ckpt):
    """The task a checkpoint was trained for; checkpoints from before classification are segmentation's."""
    return get_task(ckpt["args"].get("task", DEFAULT_TASK))


def load_from_checkpoint(path, device="cpu", args=None):
    """(task, model in eval mode on `device`, checkpoint dict, "ema" or "raw") from a train.py checkpoint.

    The checkpoint's args name the task and the model; a model flag given in `args` must agree with them.
    `args.weights` picks the EMA weights (train.py --ema_decay) or the raw ones; auto takes the EMA weights when
    there are any.
    """
    ckpt = load_checkpoint(path)
    import_plugins(ckpt["args"].get("plugin"))  # a model from a plugin needs that plugin to be rebuilt
    if args is not None:
        check_compatible(ckpt, args, path)
    weights = getattr(args, "weights", "auto")
    if weights == "ema" and "ema" not in ckpt:
        raise UserError(f"--weights ema: checkpoint {path} holds no EMA weights; expected one trained with "
                        f"--ema_decay")
    weights = "ema" if weights == "auto" and "ema" in ckpt else "raw" if weights == "auto" else weights
    task, trained = task_of(ckpt), trained_args(ckpt)
    model = task.build_model(trained)
    try:
        model.load_state_dict(unwrap_state_dict(ckpt["ema" if weights == "ema" else "model"]))
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit model {trained.model_type} (--layers {trained.layers}): "
                        f"{first_line(e)}") from e
    return task, model.to(device).eval(), ckpt, weights
