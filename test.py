"""Evaluate a checkpoint on a split; the checkpoint says which task it is.

Segmentation, at the images' original size: mIoU, pixel accuracy, mean class accuracy, frequency-weighted IoU,
per-class IoU and Dice, and palette PNG masks. Classification: top-1, top-k, per-class precision, recall and F1
with macro and weighted means, and misclassified.csv. Both write metrics.json and a confusion-matrix PNG.

    python test.py --checkpoint runs/x/best.pth
    python test.py --checkpoint runs/x/best.pth --scales 0.75 1 1.25 --flip --sliding --crop_size 96
    torchrun --nproc_per_node=2 test.py --checkpoint runs/x/best.pth --distributed
"""
import functools
import json
import os

import cv2
import numpy as np

import models
import tasks
import utils
from core import config, distributed
from data import components
from core.entry import run_entry
from core.registry import add_plugin_arg, import_plugins
from data.dali import add_loader_args, describe as describe_loader, loader_builders
from evaluation import inference, report
from evaluation.evaluate import evaluate
from tasks.base import headline, trained_args


def get_args_parser():
    p = config.make_parser(__doc__, entry="test")
    g = p.add_argument_group("evaluation")
    g.add_argument("--checkpoint", required=True, help="a .pth written by train.py (model flags come from it)")
    models.add_weights_arg(g)
    g.add_argument("--dataset_path", default=None, help="default: the dataset the checkpoint was trained on")
    g.add_argument("--data_cache", default=os.environ.get("AILAB_DATA", os.path.expanduser("~/.cache/ailab")))
    g.add_argument("--split", default="val", help="segmentation: list file ImageSets/Segmentation/<split>.txt; "
                                                   "classification: train, val or test of the run's split")
    g.add_argument("--save_path", default=None, help="output folder; default <checkpoint folder>/test-<split>")
    g.add_argument("--no_save_pred", action="store_true", help="segmentation: metrics.json only, no prediction PNGs")
    g.add_argument("--topk", type=int, default=None, help="classification: top-k accuracy; default: the checkpoint's")
    g.add_argument("--save_overlay", action="store_true", help="also write image+mask overlays to overlay/")
    g.add_argument("--class_names", default=None, metavar="FILE",
                   help="one class name per line; default: the names stored in the checkpoint")
    g.add_argument("--batchsize", type=int, default=None,
                   help="images per process per step; default 1 for segmentation (>1 needs one image size), the "
                        "checkpoint's --val_batchsize for classification")
    g.add_argument("--workers", type=int, default=2)
    add_loader_args(g)
    add_plugin_arg(g)
    inference.add_inference_args(p, crop_help="window side for --sliding; default: the checkpoint's training crop")
    models.add_model_args(p, training=False)
    distributed.add_dist_args(p, timeout=300)
    return p


def main(args):
    import_plugins(args.plugin)
    ctx = distributed.init_distributed(args)
    log = utils.setup_logging(ctx)
    task, model, ckpt, weights = tasks.load_from_checkpoint(args.checkpoint, ctx.device, args)
    trained = trained_args(ckpt)
    args.topk = args.topk or getattr(trained, "topk", 5)
    run_dir = os.path.dirname(os.path.abspath(args.checkpoint))
    options = task.predict_options(args, trained, ctx.device)
    args.batchsize = args.batchsize or task.test_batchsize(trained)
    numclasses = trained.numclasses
    if components.is_component(getattr(trained, "dataset", None)):  # registered in seed 001's style
        root, dataset = trained.dataset, components.build(trained, args.split)
    else:
        root = task.resolve_eval_root(trained, args, ctx)
        dataset = task.eval_dataset(trained, root, args.split, run_dir)
    if args.class_names:
        names = inference.read_class_names(args.class_names, numclasses)
    else:
        names = ckpt.get("class_names") or [f"class {i}" for i in range(numclasses)]
    if args.batchsize > 1:
        check_one_size(dataset, args)
    build_eval_loader = loader_builders(args, ctx, task.name)[1]
    loader = build_eval_loader(dataset, args.batchsize, args.workers, ctx.rank, ctx.world_size,
                               collate_fn=task.eval_collate)

    save_path = args.save_path or os.path.join(run_dir, f"test-{args.split}")
    os.makedirs(save_path, exist_ok=True)  # every rank may write outputs of its own shard
    log.info(f"evaluating {args.checkpoint} ({task.name}, {weights} weights) on {root} [{args.split}]: "
             f"{len(dataset)} images, {ctx.world_size} process(es); prediction: {options.describe()}")
    log.info(describe_loader(args, ctx))
    writer = task.test_writer(args, dataset, names, save_path)
    metrics = evaluate(model, loader, task.new_metric(numclasses, ctx.device, args),
                       functools.partial(task.predict, options=options), writer)
    written = writer.finish(metrics)  # a collective call

    if ctx.is_main:
        log.info(headline(metrics, task.labels).replace(", ", "  "))
        columns = task.per_class_table(names, metrics)
        for line in report.class_table(names, columns):
            log.info(line)
        result = {"checkpoint": os.path.abspath(args.checkpoint), "task": task.name, "weights": weights,
                  "dataset": root, "split": args.split, "images": len(dataset), "processes": ctx.world_size,
                  "class_names": list(names), "prediction": options.as_dict(), **metrics,
                  "per_class": {n: {title.lower(): values[i] for title, values in columns}
                                for i, n in enumerate(names)}}
        utils.write_atomic(os.path.join(save_path, "metrics.json"), json.dumps(result, indent=1).encode())
        cv2.imwrite(os.path.join(save_path, "confusion.png"),
                    report.draw_confusion(np.array(metrics["confusion"]), names))
        log.info(f"wrote metrics.json and confusion.png to {save_path}{written}")
    distributed.cleanup_distributed()


def check_one_size(dataset, args):
    """A batch of several images is one tensor, so they must share a size; padding them would change the scores."""
    if not hasattr(dataset, "image_size"):
        return
    sizes = sorted({dataset.image_size(i) for i in range(len(dataset))})
    if len(sizes) > 1:
        shown = " and ".join(f"{w}x{h}" for h, w in sizes[:2])
        raise utils.UserError(f"--batchsize {args.batchsize} needs images of one size, but split '{args.split}' "
                              f"has {len(sizes)} sizes (e.g. {shown}, WxH); use --batchsize 1")


def cli(argv=None):
    """The command line (main.py runs it too)."""
    run_entry(main, get_args_parser(), argv)


if __name__ == "__main__":
    cli()
