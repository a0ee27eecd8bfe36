"""Evaluate a checkpoint on a split at the images' original size: mIoU, pixel accuracy, mean class accuracy,
frequency-weighted IoU, per-class IoU and Dice; metrics.json, a confusion-matrix PNG and palette PNG masks.

    python test.py --checkpoint runs/x/best.pth
    python test.py --checkpoint runs/x/best.pth --scales 0.75 1 1.25 --flip --sliding --crop_size 96
    torchrun --nproc_per_node=2 test.py --checkpoint runs/x/best.pth --distributed
"""
import argparse
import json
import os

import cv2
import numpy as np

import config
import data
import distributed
import inference
import models
import synthetic
import utils
from engine import evaluate
from registry import add_plugin_arg, import_plugins


def get_args_parser():
    p = config.make_parser(__doc__)
    g = p.add_argument_group("evaluation")
    g.add_argument("--checkpoint", required=True, help="a .pth written by train.py (model flags come from it)")
    models.add_weights_arg(g)
    g.add_argument("--dataset_path", default=None, help="default: the dataset the checkpoint was trained on")
    g.add_argument("--data_cache", default=os.environ.get("AILAB_DATA", os.path.expanduser("~/.cache/ailab")))
    g.add_argument("--split", default="val", help="list file ImageSets/Segmentation/<split>.txt")
    g.add_argument("--save_path", default=None, help="output folder; default <checkpoint folder>/test-<split>")
    g.add_argument("--no_save_pred", action="store_true", help="write metrics.json only, no prediction PNGs")
    g.add_argument("--save_overlay", action="store_true", help="also write image+mask overlays to overlay/")
    g.add_argument("--class_names", default=None, metavar="FILE",
                   help="one class name per line; default: the names stored in the checkpoint")
    g.add_argument("--batchsize", type=int, default=1, help="images per process per step (>1 needs one image size)")
    g.add_argument("--workers", type=int, default=2)
    add_plugin_arg(g)
    inference.add_inference_args(p, crop_help="window side for --sliding; default: the checkpoint's training crop")
    models.add_model_args(p, training=False)
    distributed.add_dist_args(p, timeout=300)
    return p


def main(args):
    import_plugins(args.plugin)
    ctx = distributed.init_distributed(args)
    log = utils.setup_logging(ctx)
    model, ckpt, weights = models.load_from_checkpoint(args.checkpoint, ctx.device, args)
    trained = ckpt["args"]
    options = inference.options_from_args(args, ctx.device, trained.get("crop_size") or 512)
    numclasses = trained["numclasses"]
    root = synthetic.resolve_root(args.dataset_path or trained.get("dataset_path"), args.data_cache, ctx)
    dataset = data.DATASETS.get(trained.get("dataset", "voc"))(argparse.Namespace(**trained), root, args.split,
                                                                 train=False)
    if args.class_names:
        names = inference.read_class_names(args.class_names, numclasses)
    else:
        names = ckpt.get("class_names") or data.class_names(root, numclasses)
    if args.batchsize > 1:
        check_one_size(dataset, args)
    loader = data.build_eval_loader(dataset, args.batchsize, args.workers, ctx.rank, ctx.world_size)

    save_path = args.save_path or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"test-{args.split}")
    pred_dir, overlay_dir = os.path.join(save_path, "pred"), os.path.join(save_path, "overlay")
    os.makedirs(save_path, exist_ok=True)  # every rank writes the masks of its own shard
    log.info(f"evaluating {args.checkpoint} ({weights} weights) on {root} [{args.split}]: {len(dataset)} images, "
             f"{ctx.world_size} process(es); prediction: {options.describe()}")

    def save(index, pred, image):
        name = str(dataset.ids[index]) if hasattr(dataset, "ids") else f"{index:06d}"
        mask = pred.astype(np.uint8)
        os.makedirs(os.path.dirname(os.path.join(pred_dir, name)), exist_ok=True)
        data.save_palette_png(os.path.join(pred_dir, name + ".png"), mask)
        if args.save_overlay:
            os.makedirs(os.path.dirname(os.path.join(overlay_dir, name)), exist_ok=True)
            blend = inference.overlay(denormalize(image), mask, data.VOC_PALETTE)
            cv2.imwrite(os.path.join(overlay_dir, name + ".jpg"), cv2.cvtColor(blend, cv2.COLOR_RGB2BGR))

    metrics = evaluate(model, loader, numclasses, ctx.device, None if args.no_save_pred else save, options=options)

    if ctx.is_main:
        log.info(f"mIoU {metrics['miou']:.4f}  pixel acc {metrics['acc']:.4f}  "
                 f"mean class acc {metrics['mean_class_acc']:.4f}  fwIoU {metrics['fwiou']:.4f}")
        for line in class_table(names, metrics):
            log.info(line)
        per_class = {n: {"iou": i, "dice": d, "acc": a}
                     for n, i, d, a in zip(names, metrics["iou"], metrics["dice"], metrics["class_acc"])}
        result = {"checkpoint": os.path.abspath(args.checkpoint), "weights": weights, "dataset": root, "split": args.split,
                  "images": len(dataset), "processes": ctx.world_size, "class_names": list(names),
                  "prediction": {"scales": list(options.scales), "base_size": options.base_size,
                                 "flip": options.flip, "sliding": options.sliding,
                                 "crop_size": options.crop_size if options.sliding else None,
                                 "stride_rate": options.stride_rate if options.sliding else None,
                                 "amp_dtype": str(options.amp_dtype).replace("torch.", "") if options.amp_dtype
                                 else None},
                  **metrics, "per_class": per_class}
        utils.write_atomic(os.path.join(save_path, "metrics.json"), json.dumps(result, indent=1).encode())
        cv2.imwrite(os.path.join(save_path, "confusion.png"), draw_confusion(np.array(metrics["confusion"]), names))
        log.info(f"wrote metrics.json and confusion.png to {save_path}"
                 + ("" if args.no_save_pred else f", {len(dataset)} masks to {pred_dir}")
                 + (f", overlays to {overlay_dir}" if args.save_overlay and not args.no_save_pred else ""))
    distributed.cleanup_distributed()


# ---------------------------------------------------------------------------------------------
# Helpers, in the order main uses them.

def check_one_size(dataset, args):
    """A batch of several images is one tensor, so they must share a size; padding them would change the scores."""
    if not hasattr(dataset, "image_size"):
        return
    sizes = sorted({dataset.image_size(i) for i in range(len(dataset))})
    if len(sizes) > 1:
        shown = " and ".join(f"{w}x{h}" for h, w in sizes[:2])
        raise utils.UserError(f"--batchsize {args.batchsize} needs images of one size, but split '{args.split}' "
                              f"has {len(sizes)} sizes (e.g. {shown}, WxH); use --batchsize 1")


def denormalize(image, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD):
    """Normalised 3xHxW tensor -> RGB uint8 HxWx3, for overlays."""
    rgb = image.numpy().transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)


def class_table(names, metrics):
    """Aligned per-class lines: name, IoU, Dice, accuracy; 'n/a' for a class absent from labels and predictions."""
    width = max(len("class"), *(len(n) for n in names))

    def cell(value):
        return f"{'n/a':>7}" if value is None else f"{value:7.4f}"

    lines = [f"  {'class':<{width}}  {'IoU':>7}  {'Dice':>7}  {'acc':>7}"]
    for name, iou, dice, acc in zip(names, metrics["iou"], metrics["dice"], metrics["class_acc"]):
        lines.append(f"  {name:<{width}}  {cell(iou)}  {cell(dice)}  {cell(acc)}")
    return lines


def draw_confusion(confusion, names):
    """Row-normalised confusion matrix as a BGR image: rows are the true class, columns the prediction."""
    k = len(names)
    cell = max(14, min(56, 900 // max(k, 1)))
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1
    label_w = max(cv2.getTextSize(n, font, scale, thick)[0][0] for n in names) + 12
    title_h = 28
    top, left = title_h + label_w, title_h + label_w
    image = np.full((top + k * cell + 8, left + k * cell + 8, 3), 255, np.uint8)

    rows = confusion.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(rows > 0, confusion / np.maximum(rows, 1), np.nan)
    colours = cv2.applyColorMap(np.nan_to_num(share * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)
    for i in range(k):
        for j in range(k):
            y, x = top + i * cell, left + j * cell
            colour = (200, 200, 200) if np.isnan(share[i, j]) else tuple(int(c) for c in colours[i, j])
            cv2.rectangle(image, (x, y), (x + cell - 1, y + cell - 1), colour, -1)
            if cell >= 36 and not np.isnan(share[i, j]):
                text = f"{share[i, j]:.2f}"
                (tw, th), _ = cv2.getTextSize(text, font, 0.4, 1)
                ink = (0, 0, 0) if share[i, j] > 0.6 else (255, 255, 255)  # viridis is light at the top
                cv2.putText(image, text, (x + (cell - tw) // 2, y + (cell + th) // 2), font, 0.4, ink, 1,
                            cv2.LINE_AA)

    for i, name in enumerate(names):  # true classes down the left side
        (tw, th), _ = cv2.getTextSize(name, font, scale, thick)
        cv2.putText(image, name, (left - tw - 6, top + i * cell + (cell + th) // 2), font, scale, (0, 0, 0), thick,
                    cv2.LINE_AA)
    # Predicted classes along the top: draw the names on a horizontal strip, then turn it upright.
    strip = np.full((k * cell, label_w, 3), 255, np.uint8)
    for j, name in enumerate(names):
        th = cv2.getTextSize(name, font, scale, thick)[0][1]
        cv2.putText(strip, name, (6, j * cell + (cell + th) // 2), font, scale, (0, 0, 0), thick,
                    cv2.LINE_AA)
    image[title_h:top, left:left + k * cell] = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    centre = (k * cell - cv2.getTextSize("predicted", font, 0.55, 1)[0][0]) // 2
    cv2.putText(image, "predicted", (left + max(centre, 0), title_h - 9), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    axis = np.full((title_h, k * cell, 3), 255, np.uint8)
    centre = (k * cell - cv2.getTextSize("true", font, 0.55, 1)[0][0]) // 2
    cv2.putText(axis, "true", (max(centre, 0), title_h - 9), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    image[top:top + k * cell, :title_h] = cv2.rotate(axis, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return image


if __name__ == "__main__":
    utils.run_entry(main, get_args_parser())
