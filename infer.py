"""Predict a palette PNG mask for each input image.

    python infer.py --checkpoint runs/x/best.pth --input img.jpg|folder|'glob*.jpg' --output predictions
"""
import argparse
import glob
import os

import cv2
import torch

import config
import data
import models
import utils
from engine import predict
from registry import add_plugin_arg, import_plugins

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    config.add_config_args(p)
    g = p.add_argument_group("inference")
    g.add_argument("--checkpoint", required=True, help="a .pth written by train.py (model flags come from it)")
    g.add_argument("--input", required=True, help="an image, a folder of images, or a quoted glob pattern")
    g.add_argument("--output", default="predictions", help="folder for the masks (input folder layout is kept)")
    add_plugin_arg(g)
    models.add_model_args(p, training=False)
    utils.add_dist_args(p)
    return p


def collect_inputs(spec):
    """(paths, base folder) for an image, a folder or a glob; the base keeps the output layout relative."""
    if os.path.isfile(spec):
        return [spec], os.path.dirname(spec)
    if os.path.isdir(spec):
        paths = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(IMAGE_EXTENSIONS))
        base = spec
    else:
        paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        base = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else ""
    if not paths:
        raise utils.UserError(f"--input {spec}: no image found; expected an image file, a folder of "
                              f"{'/'.join(IMAGE_EXTENSIONS)} files, or a glob pattern that matches some")
    return paths, base


@torch.no_grad()
def main(args):
    import_plugins(args.plugin)
    ctx = utils.init_distributed(args)
    log = utils.setup_logging(ctx)
    paths, base = collect_inputs(args.input)
    model, _ = models.load_from_checkpoint(args.checkpoint, ctx.device, args)
    model.eval()
    mine = paths[ctx.rank::ctx.world_size]  # each image is predicted by exactly one rank
    failed = 0
    for path in mine:
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            log.warning(f"skipped {path}: not a readable image")
            failed += 1
            continue
        tensor = data.to_normalized_tensor(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        mask = predict(model, tensor.unsqueeze(0).to(ctx.device)).argmax(1)[0].to(torch.uint8).cpu().numpy()
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
        out = os.path.join(args.output, os.path.splitext(rel)[0] + ".png")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        data.save_palette_png(out, mask)
    counts = utils.all_reduce_sum(torch.tensor([len(mine) - failed, failed]))
    log.info(f"wrote {int(counts[0])} masks to {args.output}" + (f"; {int(counts[1])} inputs failed" if counts[1] else ""))
    utils.cleanup_distributed()
    if counts[1]:
        raise SystemExit(1)


if __name__ == "__main__":
    utils.run_entry(main, get_args_parser())
