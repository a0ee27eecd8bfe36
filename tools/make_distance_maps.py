"""Write the distance maps of the scribble method (dist_s near scribbles, dist_c far from pseudo-label boundaries).

    python tools/make_distance_maps.py --dataset_path data/VOC2012 --lambda_s 4 --lambda_c 16 --workers 8

For every scribble label <dataset_path>/<train_path>/<id>.png and its pseudo label <dataset_path>/<pesudo_path>/
<id>.png, writes grayscale uint8 PNGs <dataset_path>/<distancemap_s>/<id>.png and <distancemap_c>/<id>.png with
scribble.distance_maps. Existing outputs are skipped unless --overwrite. Labels are read with PIL as class indices
(OpenCV would expand a palette PNG to colours); each output is written to a temporary file and renamed into place.
"""
import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules

from data.readers import read_label  # noqa: E402
from data.distance_maps import DEFAULT_FOLDERS, MAP_STYLES, VOC_SIDE  # noqa: E402
from utils import UserError, write_atomic  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--dataset_path", required=True, help="dataset root; the folders below are relative to it")
    p.add_argument("--train_path", default=DEFAULT_FOLDERS["train_path"],
                   help="folder of scribble label PNGs (255 = unlabelled)")
    p.add_argument("--pesudo_path", "--pseudo_path", dest="pesudo_path", default=DEFAULT_FOLDERS["pesudo_path"],
                   help="folder of pseudo label PNGs (255 = uncertain)")
    p.add_argument("--distancemap_s", default=DEFAULT_FOLDERS["distancemap_s"],
                   help="output folder of the maps near scribbles")
    p.add_argument("--distancemap_c", default=DEFAULT_FOLDERS["distancemap_c"],
                   help="output folder of the maps from pseudo-label boundaries")
    p.add_argument("--map_style", default="suite", choices=sorted(MAP_STYLES),
                   help="suite: sources are every scribble pixel and every class change or 255 pixel of the pseudo "
                        "label, rounded; paper: as the method's code, foreground scribble pixels and the contour of "
                        "the pseudo label's foreground, truncated, lambdas at VOC scale")
    p.add_argument("--lambda_s", type=float, default=None,
                   help="dist_s falls to 0 at 255/sqrt(lambda_s) px from a scribble; suite: default 64 (128 px "
                        "images; VOC-size: 4); paper: at VOC scale (default e), rescaled by "
                        f"({VOC_SIDE} / the image's longer side)^2")
    p.add_argument("--lambda_c", type=float, default=None,
                   help="dist_c reaches 255 at 255/sqrt(lambda_c) px from a boundary; suite: default 256 (VOC-size: "
                        "16); paper: at VOC scale (default e^6), rescaled likewise")
    p.add_argument("--list", default=None, metavar="FILE",
                   help="split list (one id per line, first column; e.g. ImageSets/Segmentation/train.txt, "
                        "relative to --dataset_path or the current folder); default: every PNG in --train_path")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads")
    p.add_argument("--overwrite", action="store_true", help="rewrite maps that already exist")
    return p


KINDS = {"train_path": "scribble", "pesudo_path": "pseudo"}


def folder(args, name):
    return os.path.join(args.dataset_path, getattr(args, name))


def list_ids(args):
    """Image ids from --list, else from the PNG names in the scribble folder."""
    if args.list is None:
        ids = sorted(n[:-4] for n in os.listdir(folder(args, "train_path")) if n.endswith(".png"))
        where = f"scribble folder '{folder(args, 'train_path')}'"
    else:
        path = next((p for p in (os.path.join(args.dataset_path, args.list), args.list) if os.path.isfile(p)), None)
        if path is None:
            raise UserError(f"--list '{args.list}' does not exist (also looked under --dataset_path); "
                            "expected a file with one image id per line")
        with open(path) as f:
            ids = [os.path.splitext(os.path.basename(line.split()[0]))[0] for line in f if line.strip()]
        where = f"--list '{path}'"
    if not ids:
        raise UserError(f"{where} names no images; expected scribble label PNGs to make distance maps for")
    return ids


def check_inputs(args, ids):
    """Every scribble label and its pseudo label exist and have the same size (read from the PNG headers)."""
    for image_id in ids:
        sizes = []
        for name in KINDS:
            path = os.path.join(folder(args, name), image_id + ".png")
            if not os.path.isfile(path):
                raise UserError(f"'{path}' does not exist; expected a {KINDS[name]} label PNG for image id "
                                f"'{image_id}'")
            try:
                with Image.open(path) as im:
                    sizes.append((im.size, path))
            except OSError as e:
                raise UserError(f"cannot read label '{path}' ({e}); expected a PNG of class indices") from None
        if sizes[0][0] != sizes[1][0]:
            raise UserError(f"'{sizes[0][1]}' is {sizes[0][0][0]}x{sizes[0][0][1]} but '{sizes[1][1]}' is "
                            f"{sizes[1][0][0]}x{sizes[1][0][1]}; expected a scribble and its pseudo label of one size")


def make_one(args, image_id):
    """Write both maps of one image; returns False when they exist and are kept."""
    outputs = [os.path.join(folder(args, name), image_id + ".png") for name in ("distancemap_s", "distancemap_c")]
    if not args.overwrite and all(os.path.isfile(p) for p in outputs):
        return False
    scribble = read_label(os.path.join(folder(args, "train_path"), image_id + ".png"))
    pseudo = read_label(os.path.join(folder(args, "pesudo_path"), image_id + ".png"))
    make = MAP_STYLES[args.map_style][0]
    for path, dist in zip(outputs, make(scribble, pseudo, args.lambda_s, args.lambda_c)):
        ok, png = cv2.imencode(".png", dist)
        if not ok:
            raise UserError(f"could not encode the distance map for '{path}'")
        write_atomic(path, png.tobytes())
    return True


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    make, default_s, default_c = MAP_STYLES[args.map_style]
    args.lambda_s = default_s if args.lambda_s is None else args.lambda_s
    args.lambda_c = default_c if args.lambda_c is None else args.lambda_c
    start = time.perf_counter()
    try:
        if not os.path.isdir(args.dataset_path):
            raise UserError(f"--dataset_path '{args.dataset_path}' does not exist; expected the dataset root folder")
        if args.workers < 1:
            raise UserError(f"--workers {args.workers} is not valid; expected an integer >= 1")
        make([[0]], [[0]], args.lambda_s, args.lambda_c)  # checks the lambdas before any work
        for name in KINDS:
            if not os.path.isdir(folder(args, name)):
                raise UserError(f"--{name} folder '{folder(args, name)}' does not exist; expected a folder of "
                                f"{KINDS[name]} label PNGs")
        ids = list_ids(args)
        check_inputs(args, ids)
        for name in ("distancemap_s", "distancemap_c"):
            os.makedirs(folder(args, name), exist_ok=True)
        written = 0
        pool = ThreadPoolExecutor(args.workers)
        try:
            with tqdm(total=len(ids), desc="distance maps", unit="img") as bar:
                for done in pool.map(lambda i: make_one(args, i), ids):
                    written += done
                    bar.update()
        finally:
            pool.shutdown(cancel_futures=True)  # after an error, start no more images
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"distance maps: {written} written, {len(ids) - written} skipped in {time.perf_counter() - start:.1f} s "
          f"({args.map_style} maps, lambda_s={args.lambda_s:g}, lambda_c={args.lambda_c:g}) -> "
          f"{folder(args, 'distancemap_s')}, "
          f"{folder(args, 'distancemap_c')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
