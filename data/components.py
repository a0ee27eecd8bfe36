"""Datasets registered in seed 001's style, `@DATASETS.register_module()`, and built from the config's keyword
arguments (--dataset_kwargs for training, --val_dataset_kwargs for validation, which defaults to the same).

Any torch Dataset works whose items are what the task trains on: (normalised CHW float image, class index) for
classification, (image, HW int64 mask with 255 = ignore) for segmentation. Class names come from the dataset's
`classes` attribute when it has one, else from --numclasses.
"""
from core.registry import Registry
from utils import UserError

DATASETS = Registry("dataset")


def is_component(name):
    return DATASETS.takes_kwargs(name)


def build(args, split="train"):
    kwargs = args.dataset_kwargs or {}
    if split != "train" and getattr(args, "val_dataset_kwargs", None) is not None:
        return DATASETS.build(args.dataset, args.val_dataset_kwargs, "--val_dataset_kwargs")
    return DATASETS.build(args.dataset, kwargs, "--dataset_kwargs")


def prepare(args):
    """((train, val) datasets, class names); sets args.numclasses from the data when it names its classes."""
    train, val = build(args, "train"), build(args, "val")
    names = [str(n) for n in getattr(train, "classes", None) or []]
    if names and args.numclasses not in (None, len(names)):
        raise UserError(f"--numclasses {args.numclasses} differs from the {len(names)} classes dataset "
                        f"{args.dataset} names; expected {len(names)}")
    args.numclasses = args.numclasses or len(names) or None
    if not args.numclasses:
        raise UserError(f"dataset {args.dataset} has no `classes` attribute; expected --numclasses (num_classes in "
                        f"the model's config)")
    return (train, val), names or [str(i) for i in range(args.numclasses)]
