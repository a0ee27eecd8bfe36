"""Evaluate a checkpoint on a split: mIoU, pixel accuracy, per-class IoU, metrics.json and palette PNGs.

    python test.py --checkpoint runs/x/best.pth
    torchrun --nproc_per_node=2 test.py --checkpoint runs/x/best.pth --distributed
"""
import argparse
import json
import os

import config
import data
import models
import utils
import synthetic
from engine import evaluate
from registry import add_plugin_arg, import_plugins


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    config.add_config_args(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--checkpoint", required=True, help="a .pth written by train.py (model flags come from it)")
    g.add_argument("--dataset_path", default=None, help="default: the dataset the checkpoint was trained on")
    g.add_argument("--data_cache", default=os.environ.get("AILAB_DATA", os.path.expanduser("~/.cache/ailab")))
    g.add_argument("--split", default="val", help="list file ImageSets/Segmentation/<split>.txt")
    g.add_argument("--save_path", default=None, help="output folder; default <checkpoint folder>/test-<split>")
    g.add_argument("--no_save_pred", action="store_true", help="write metrics.json only, no prediction PNGs")
    g.add_argument("--batchsize", type=int, default=1, help="images per process per step (>1 needs one image size)")
    g.add_argument("--workers", type=int, default=2)
    add_plugin_arg(g)
    models.add_model_args(p, training=False)
    utils.add_dist_args(p)
    return p


def main(args):
    import_plugins(args.plugin)
    ctx = utils.init_distributed(args)
    log = utils.setup_logging(ctx)
    model, ckpt = models.load_from_checkpoint(args.checkpoint, ctx.device, args)
    trained = ckpt["args"]
    dataset_path = args.dataset_path or trained.get("dataset_path")
    root = synthetic.resolve_root(dataset_path, args.data_cache, ctx)
    numclasses = trained["numclasses"]
    dataset = data.DATASETS.get(trained.get("dataset", "voc"))(argparse.Namespace(**trained), root, args.split,
                                                                 train=False)
    loader = data.build_eval_loader(dataset, args.batchsize, args.workers, ctx.rank, ctx.world_size)
    save_path = args.save_path or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"test-{args.split}")
    pred_dir = os.path.join(save_path, "pred")
    os.makedirs(pred_dir, exist_ok=True)  # every rank writes its own shard of predictions
    log.info(f"evaluating {args.checkpoint} on {root} [{args.split}]: {len(dataset)} images, "
             f"{ctx.world_size} process(es)")

    def save(index, pred):
        height, width = dataset.image_size(index)  # a padded batch makes pred larger than the image
        data.save_palette_png(os.path.join(pred_dir, dataset.ids[index] + ".png"),
                              pred[:height, :width].astype("uint8"))

    metrics = evaluate(model, loader, numclasses, ctx.device, None if args.no_save_pred else save)
    names = ckpt.get("class_names") or data.class_names(root, numclasses)
    if ctx.is_main:
        width = max(len(n) for n in names)
        log.info(f"mIoU {metrics['miou']:.4f}  pixel acc {metrics['acc']:.4f}  "
                 f"mean class acc {metrics['mean_class_acc']:.4f}")
        for name, iou in zip(names, metrics["iou"]):
            log.info(f"  {name:<{width}}  IoU {'   n/a' if iou is None else f'{iou:.4f}'}")
        result = {"checkpoint": os.path.abspath(args.checkpoint), "dataset": root, "split": args.split,
                  "images": len(dataset), "class_names": list(names), **metrics}
        with open(os.path.join(save_path, "metrics.json"), "w") as f:
            json.dump(result, f, indent=1)
        log.info(f"wrote {os.path.join(save_path, 'metrics.json')}"
                 + ("" if args.no_save_pred else f" and {len(dataset)} masks in {pred_dir}"))
    utils.cleanup_distributed()


if __name__ == "__main__":
    utils.run_entry(main, get_args_parser())
