"""What every task shares: how a metrics dict becomes records, and the shape of a task.

A task's metric returns one flat dict. Every record is derived from it, so a metric added there shows up in the
log line, summary.csv, TensorBoard, events.jsonl and metrics.json without another edit:
  - a float is a scalar: `val/<key>` in TensorBoard, `val_<key>` in summary.csv (and in the log line when the
    task gives it a label);
  - a list with one value per class is per-class: `val/<key>/<class name>`, `val_<key>_<class name>`;
  - anything else (counts, the confusion matrix) goes to metrics.json and the checkpoint only.
"""
import argparse
import logging

from utils import UserError

log = logging.getLogger("ailab")
# Names other trainers give the headline metrics (seed 002's `metrics`); "accuracy" is the task's own.
METRIC_ALIASES = {"precision": "macro_precision", "recall": "macro_recall", "f1": "macro_f1", "iou": "miou"}


def scalars(metrics):
    """The float entries of a metrics dict, in its order."""
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def per_class(metrics, class_names):
    """{key: [values]} of the entries that hold one value (or None) per class."""
    k = len(class_names)
    return {key: value for key, value in metrics.items()
            if isinstance(value, list) and len(value) == k and all(v is None or isinstance(v, float) for v in value)}


def headline(metrics, labels):
    """'mIoU 0.6480, pixel acc 0.9123, ...': the scalars the task labels for log lines (the records have them all)."""
    return ", ".join(f"{labels[k]} {v:.4f}" for k, v in scalars(metrics).items() if k in labels)


def shown_metrics(names, task, args):
    """{metric: label} of the epoch log line: --metrics (checked against the task's metrics), else the task's."""
    if not names:
        return task.labels
    known = list(task.metric_names(args))
    shown = {}
    for name in names:
        key = task.accuracy if name == "accuracy" else METRIC_ALIASES.get(name, name)
        if key not in known:
            raise UserError(f"--metrics {name!r} is not a {task.name} metric; expected accuracy, "
                            f"{', '.join(k for k in METRIC_ALIASES if METRIC_ALIASES[k] in known)} or one of "
                            f"{', '.join(known)}")
        shown[key] = task.labels.get(key, key.replace("_", " "))
    return shown


def record_scalars(metrics, class_names, prefix="val"):
    """TensorBoard scalars of a metrics dict: val/<key> and val/<key>/<class>."""
    out = {f"{prefix}/{k}": v for k, v in scalars(metrics).items()}
    for key, values in per_class(metrics, class_names).items():
        out.update({f"{prefix}/{key}/{name}": v for name, v in zip(class_names, values) if v is not None})
    return out


def record_row(metrics, class_names, prefix="val"):
    """summary.csv columns of a metrics dict: val_<key> and val_<key>_<class> (empty where undefined)."""
    row = {f"{prefix}_{k}": f"{v:.6f}" for k, v in scalars(metrics).items()}
    for key, values in per_class(metrics, class_names).items():
        row.update({f"{prefix}_{key}_{name}": "" if v is None else f"{v:.6f}" for name, v in zip(class_names, values)})
    return row


def trained_args(ckpt):
    """The settings a checkpoint was trained with, as a namespace."""
    return argparse.Namespace(**ckpt["args"])
