"""Predict each input image with a checkpoint (segmentation: a palette PNG mask; classification: the top-k classes
in predictions.jsonl), or export the checkpoint's model.

    python infer.py --checkpoint runs/x/best.pth --input img.jpg|folder|'glob*.jpg'|list.txt --output predictions
    python infer.py --checkpoint runs/x/best.pth --input photos --recursive --save_overlay --scales 0.75 1 --flip
    torchrun --nproc_per_node=2 infer.py --distributed --checkpoint runs/x/best.pth --input photos
    python infer.py --checkpoint runs/x/best.pth --export onnx|torchscript [--export_path model.onnx]

Each output keeps the input's path relative to the input folder (or to the folder the inputs share).
Existing outputs are kept unless --overwrite; an unreadable image is reported, skipped and makes the exit code 1.
"""
import csv
import dataclasses
import glob
import io
import json
import os
import sys

import cv2
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

import models
import tasks
import utils
from core import config, distributed
from core.entry import run_entry
from core.registry import add_plugin_arg, import_plugins
from data.loaders import ShardSampler
from data.workers import make_loader
from evaluation import export, inference
from tasks.base import trained_args

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LIST_EXTENSIONS = (".txt", ".lst", ".list")
INPUT_KINDS = "an image, a folder of images, a quoted glob pattern, or a .txt file listing image paths"


def get_args_parser():
    p = config.make_parser(__doc__, entry="infer")
    g = p.add_argument_group("inference")
    g.add_argument("--checkpoint", required=True, help="a .pth written by train.py (model flags come from it)")
    models.add_weights_arg(g)
    g.add_argument("--input", default=None, help=INPUT_KINDS + " (relative list entries: to the list's folder)")
    g.add_argument("--recursive", action="store_true", help="with a folder --input, also take its subfolders")
    g.add_argument("--output", default="predictions", help="folder for the results (the inputs' layout is kept)")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs instead of skipping them")
    g.add_argument("--save_overlay", action="store_true",
                   help="segmentation: also write <name>_overlay.jpg: image and mask blended")
    g.add_argument("--save_probs", action="store_true", help="segmentation: also write <name>_probs.npy: float32 K x H x W")
    g.add_argument("--save_csv", action="store_true", help="also write predictions.csv, one row per image")
    g.add_argument("--topk", type=int, default=None, help="classification: classes per image; default: the checkpoint's")
    g.add_argument("--class_names", default=None, metavar="FILE",
                   help="one class name per line, for predictions.jsonl; default: the checkpoint's")
    g.add_argument("--workers", type=int, default=2, help="image-reading processes")
    add_plugin_arg(g)
    g = p.add_argument_group("export")
    g.add_argument("--export", default=None, choices=sorted(export.EXTENSIONS),
                   help="write the model as a deployable file instead of predicting (no --input needed)")
    g.add_argument("--export_path", default=None, help="default: the checkpoint's path with .onnx or .pt")
    g.add_argument("--export_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="example input size for the export; default: the checkpoint's training crop")
    inference.add_inference_args(p, crop_help="window side for --sliding; default: the checkpoint's training crop")
    models.add_model_args(p, training=False)
    distributed.add_dist_args(p, timeout=300)
    return p


@torch.no_grad()
def main(args):
    import_plugins(args.plugin)
    ctx = distributed.init_distributed(args)
    log = utils.setup_logging(ctx)
    task, model, ckpt, weights = tasks.load_from_checkpoint(args.checkpoint, ctx.device, args)
    trained = trained_args(ckpt)
    if args.export:
        if ctx.is_main:  # one file, one writer
            export_checkpoint(model, task.example_size(trained), args, log, weights)
        distributed.cleanup_distributed()
        return
    if not args.input:
        raise utils.UserError(f"--input is missing; expected {INPUT_KINDS} (or --export to export the model)")
    args.topk = args.topk or getattr(trained, "topk", 5)
    options = task.predict_options(args, trained, ctx.device)
    numclasses = trained.numclasses
    names = (inference.read_class_names(args.class_names, numclasses) if args.class_names
             else ckpt.get("class_names") or [f"class {i}" for i in range(numclasses)])

    # Plan: every input's outputs; inputs whose outputs exist are skipped, so a re-run only does what is missing.
    # Rank 0 alone looks at what exists, before anyone writes: a slower rank would otherwise see the masks
    # a faster one has just written, and the ranks would shard different lists. An input without files of its
    # own (classification) is done when predictions.jsonl has its line.
    jsonl = os.path.join(args.output, "predictions.jsonl")
    paths, base = collect_inputs(args.input, args.recursive, args.output)
    jobs = plan_outputs(paths, base, args, task)
    exists = distributed.broadcast_object(done_inputs(jobs, jsonl) if ctx.is_main else None)
    todo = [job for job, done in zip(jobs, exists) if args.overwrite or not done]
    skipped = len(jobs) - len(todo)
    log.info(f"{len(jobs)} input(s) from {args.input}; {skipped} skipped (outputs exist), {len(todo)} to predict "
             f"on {ctx.world_size} process(es) with the {weights} weights of {args.checkpoint} ({task.name}); "
             f"prediction: {options.describe()}")

    # Each rank reads and predicts its own shard; unreadable images come back as failures, not exceptions.
    images = ImageFiles([job["path"] for job in todo], task.infer_transform(trained), keep_rgb=args.save_overlay)
    sampler = ShardSampler(len(images), ctx.rank, ctx.world_size)
    loader = make_loader(images, None, args.workers, sampler)
    records, failed = [], []
    for item in tqdm(loader, total=len(sampler), desc="predict", file=sys.stdout, dynamic_ncols=True,
                     disable=not (ctx.is_main and sys.stdout.isatty())):
        job = todo[int(item["index"])]
        if item["error"] is not None:
            log.warning(f"skipped {job['path']}: {item['error']}")
            failed.append(job["path"])
            continue
        probs = predict_within_memory(task, model, item["image"].unsqueeze(0).to(ctx.device), options, job, log)
        if probs is None:
            failed.append(job["path"])
            continue
        records.append(task.infer_record(probs, item, job, names, args))

    # One predictions.jsonl (and predictions.csv), written by rank 0 from every rank's records.
    shards = distributed.gather_objects(records)
    n_failed = int(distributed.all_reduce_sum(torch.tensor([len(failed)]))[0])
    if ctx.is_main:
        records = [r for shard in shards for r in shard]
        os.makedirs(args.output, exist_ok=True)
        merged = update_jsonl(jsonl, records)
        if args.save_csv:
            write_csv(os.path.join(args.output, "predictions.csv"), merged)
        log.info(f"wrote {len(records)} {task.outputs} to {args.output} and {len(merged)} records to {jsonl}" + (" and predictions.csv" if args.save_csv else "")
                 + (f"; skipped {skipped} input(s) whose outputs exist (--overwrite replaces them)" if skipped else "")
                 + (f"; {n_failed} input(s) failed" if n_failed else ""))
    distributed.cleanup_distributed()
    if n_failed:
        raise SystemExit(1)


def predict_within_memory(task, model, image, options, job, log):
    """Class probabilities of one image; an image too large for the GPU at full size is predicted again in
    --sliding windows, and one that does not fit even so is logged and counted as failed (None), like an unreadable
    file, so one large photo does not end the job."""
    try:
        return task.predict(model, image, options)[0]
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
    if not options.sliding:
        log.warning(f"{job['path']} ({image.shape[-1]}x{image.shape[-2]}) ran out of GPU memory; predicting it in "
                    f"{options.crop_size} px sliding windows instead")
        try:
            return task.predict(model, image, dataclasses.replace(options, sliding=True))[0]
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    log.warning(f"skipped {job['path']}: out of GPU memory even in sliding windows (try a smaller --crop_size)")
    return None


def export_checkpoint(model, example_size, args, log, weights):
    path = args.export_path or export.default_path(args.checkpoint, args.export)
    if os.path.exists(path) and not args.overwrite:
        raise utils.UserError(f"--export_path {path} exists; pass --overwrite to replace it")
    size = tuple(args.export_size) if args.export_size else tuple(example_size)
    if min(size) < 1:
        raise utils.UserError(f"--export_size {size[0]} {size[1]}: expected positive sizes")
    log.info(f"exporting {args.checkpoint} ({weights} weights) as {args.export} (example input {size[0]}x{size[1]}, H x W)")
    info = export.export_model(model, args.export, path, size)
    shape = "dynamic batch, height and width" if info["dynamic"] else f"fixed input 1x3x{size[0]}x{size[1]}"
    log.info(f"wrote {path}: {shape}; max abs difference from PyTorch {info['max_abs_diff']:.2e}")


# ---------------------------------------------------------------------------------------------
# Inputs and outputs.

def collect_inputs(spec, recursive=False, output=None):
    """(paths, base folder) for an image, a folder, a glob or a list file; the base keeps the output layout."""
    if os.path.isdir(spec):
        paths = folder_images(spec, recursive, output)
        if not paths:
            deeper = [] if recursive else folder_images(spec, True, output)
            raise utils.UserError(f"--input {spec}: no {'/'.join(IMAGE_EXTENSIONS)} image in the folder"
                                  + (f" ({len(deeper)} in its subfolders: add --recursive)" if deeper else ""))
        return paths, spec
    if os.path.isfile(spec) and spec.lower().endswith(LIST_EXTENSIONS):
        paths = read_list(spec)
    elif os.path.isfile(spec):
        return [spec], os.path.dirname(spec)
    elif glob.has_magic(spec):
        paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not paths:
            raise utils.UserError(f"--input {spec}: the glob pattern matches no file; expected {INPUT_KINDS}")
    else:
        raise utils.UserError(f"--input {spec} does not exist; expected {INPUT_KINDS}")
    return paths, os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])


def folder_images(folder, recursive, output=None):
    """Images in `folder` (and its subfolders when recursive), sorted; an output folder inside it is left out,
    so that re-running never takes earlier masks for inputs."""
    skip = os.path.abspath(output) if output else None
    found = []
    for here, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if os.path.abspath(os.path.join(here, d)) != skip) if recursive else []
        found += [os.path.join(here, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def read_list(path):
    """Paths in a list file, one per line; relative ones are taken from the list's folder. Duplicates dropped."""
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        entries = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise utils.UserError(f"--input {path} lists no image; expected one image path per line")
    return list(dict.fromkeys(os.path.normpath(os.path.join(folder, e)) for e in entries))


def plan_outputs(paths, base, args, task):
    """For each input, the files it will write under --output; two inputs may not share an output."""
    jobs, owner = [], {}
    for path in paths:
        stem = os.path.join(args.output, os.path.splitext(os.path.relpath(os.path.abspath(path),
                                                                           os.path.abspath(base)))[0])
        files = task.output_files(stem, args)
        for f in files.values():
            key = os.path.abspath(f)
            if key in owner:
                raise utils.UserError(f"--input: {owner[key]} and {path} would both write {f}; rename one of them "
                                      f"or predict them into different --output folders")
            owner[key] = path
        jobs.append({"path": path, "files": files})
    clash = set(owner) & {os.path.abspath(p) for p in paths}
    if clash:
        raise utils.UserError(f"--output {args.output}: the mask {sorted(clash)[0]} would replace an input image; "
                              f"choose another --output folder")
    return jobs


def done_inputs(jobs, jsonl):
    """Whether each input's outputs exist: its files, or (without files of its own) its line in predictions.jsonl."""
    listed = set(read_jsonl(jsonl)) if any(not job["files"] for job in jobs) else set()
    return [any(os.path.exists(f) for f in job["files"].values()) if job["files"] else job["path"] in listed
            for job in jobs]


class ImageFiles(Dataset):
    """Images by path as {index, image (transform(rgb)), rgb, error}; a file that cannot be read gives
    image=None and the reason in `error`, so one bad file does not stop the loader."""

    def __init__(self, paths, transform, keep_rgb=False):
        self.paths, self.transform, self.keep_rgb = paths, transform, keep_rgb

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        item = {"index": index, "image": None, "rgb": None, "error": None}
        path = self.paths[index]
        try:
            bgr = cv2.imread(path, cv2.IMREAD_COLOR) if os.path.isfile(path) else None
        except Exception as e:  # noqa: BLE001 - a decoder error is one more kind of unreadable file
            bgr, item["error"] = None, f"cannot decode it ({e})"
        if bgr is None:
            item["error"] = item["error"] or ("not a readable image" if os.path.isfile(path) else "no such file")
            return item
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        item["image"] = self.transform(rgb)
        item["rgb"] = rgb if self.keep_rgb else None
        return item


def read_jsonl(path):
    """{input path: record} of an existing predictions.jsonl; damaged lines describe nothing and are dropped."""
    records = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    records[record["path"]] = record
                except (ValueError, KeyError, TypeError):
                    continue
    return records


def update_jsonl(path, records):
    """Merge `records` into predictions.jsonl by input path: earlier lines for other images stay, so the file
    describes every prediction in the folder. Written atomically; returns the merged records in path order."""
    merged = read_jsonl(path)
    merged.update((r["path"], r) for r in records)
    merged = [merged[key] for key in sorted(merged)]
    utils.write_atomic(path, "".join(json.dumps(r) + "\n" for r in merged))
    return merged


def write_csv(path, records):
    """predictions.csv: one row per record, nested values (top-k lists, class fractions) flattened to columns."""
    rows = [flat_row(r) for r in records]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    out = csv.DictWriter(text, columns, lineterminator="\n")
    out.writeheader()
    out.writerows(rows)
    utils.write_atomic(path, text.getvalue())


def flat_row(record, prefix=""):
    row = {}
    for key, value in record.items():
        if isinstance(value, dict):
            row.update(flat_row(value, f"{prefix}{key}_"))
        elif isinstance(value, list):
            for i, entry in enumerate(value, 1):
                row.update(flat_row(entry, f"{prefix}{key}{i}_") if isinstance(entry, dict) else {f"{prefix}{key}{i}": entry})
        else:
            row[prefix + key] = value
    return row


def cli(argv=None):
    """The command line (main.py runs it too)."""
    run_entry(main, get_args_parser(), argv)


if __name__ == "__main__":
    cli()
