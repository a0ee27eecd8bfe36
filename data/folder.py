"""Classification data sources: an ImageFolder tree (root/<class>/.../<image>) or a list file of `path label`
lines, a stable stratified train/val(/test) split saved as JSON, an up-front readability check, and the Dataset.

A sample is a (relative path with forward slashes, class index) pair; paths are relative to the data root.
"""
import hashlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import torch
from PIL import Image

from core.distributed import barrier, is_local_main
from data import check_cache
from data.cls_transforms import to_tensor
from data.unreadable import Unreadable
from utils import UserError, first_line, replacing

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_NAMES = ("train", "val", "test")
FULL_CHECK_LIMIT = 20000  # check_images decodes every image up to this many samples, else reads only headers


def is_image_file(name):
    """True for a visible file name ending in one of IMAGE_EXTENSIONS, in any letter case."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def read_rgb(path):
    """RGB uint8 HxWx3. Greyscale is expanded, alpha dropped, palettes applied, 16-bit keeps its high byte
    (65535 -> 255). UserError naming the path when the file is missing or cannot be decoded."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"image '{path}' does not exist; expected a readable image file")
    try:
        image = cv2.imread(path, cv2.IMREAD_COLOR)
    except cv2.error:
        image = None
    if image is None:
        raise UserError(f"cannot decode image '{path}'; expected a valid {'/'.join(IMAGE_EXTENSIONS)} image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def image_shape(path):
    """(height, width) of the image at `path` as read_rgb decodes it, from its header (an EXIF orientation that
    turns it by 90 degrees swaps the two); UserError naming the path when the header cannot be read."""
    try:
        with Image.open(path) as im:
            (width, height), turned = im.size, im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        raise UserError(f"cannot read the header of image '{path}' ({first_line(e)}); expected a readable image "
                        f"file") from None
    return (width, height) if turned else (height, width)


def _images_under(folder):
    """Sorted paths (relative to `folder`, forward slashes) of the images below it; hidden entries skipped."""
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(here, folder)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        # is_image_file, inlined: a large tree has a million names
        found += [prefix + name for name in files if name[0] != "." and name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def scan_image_folder(root):
    """(classes, samples) of an ImageFolder tree root/<class>/<image>, images possibly in nested folders."""
    if not os.path.isdir(root):
        raise UserError(f"dataset folder '{root}' does not exist; expected root/<class name>/<image> folders")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"dataset folder '{root}' has no class folders; expected root/<class name>/<image>")
    per_class = [_images_under(os.path.join(root, name)) for name in classes]
    if not any(per_class):
        raise UserError(f"dataset folder '{root}' has {len(classes)} class folders but no images; expected files "
                        f"ending in {', '.join(IMAGE_EXTENSIONS)}")
    for name, images in zip(classes, per_class):
        if not images:
            raise UserError(f"class folder '{os.path.join(root, name)}' has no images; expected at least one "
                            f"{'/'.join(IMAGE_EXTENSIONS)} file (or remove the folder)")
    return classes, sorted((f"{name}/{rel}", i) for i, (name, images) in enumerate(zip(classes, per_class))
                           for rel in images)


def _list_lines(path):
    """(line number, relative path, label text) for each non-empty, non-# line of a list file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read list file '{path}' ({first_line(e)}); expected UTF-8 'path label' lines")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.strip().rsplit(None, 1)
        if parts and not parts[0].startswith("#"):
            if len(parts) != 2:
                raise UserError(f"{path} line {number}: '{parts[0]}' has no label; expected 'relative/path label'")
            rows.append((number, parts[0].strip(), parts[1]))
    if not rows:
        raise UserError(f"list file '{path}' lists no images; expected 'relative/path label' lines")
    return rows


def read_list_file(path, root, classes=None):
    """(classes, samples) from a list file of `relative/path label` lines (path relative to `root`).

    Labels are all whole numbers (class indices) or else class names. Classes: `classes` if given, else the
    sorted unique names, or "0".."max" for indices. Samples keep the order of the file."""
    rows = _list_lines(path)
    numeric = all(label.isascii() and label.isdigit() for _, _, label in rows)
    if classes is not None:
        classes = list(classes)
    elif numeric:
        classes = [str(i) for i in range(max(int(label) for _, _, label in rows) + 1)]
    else:
        classes = sorted({label for _, _, label in rows})
    index_of = {name: i for i, name in enumerate(classes)}
    samples, seen = [], {}
    for number, rel, label in rows:
        index = int(label) if numeric else index_of.get(label)
        if index is None or index >= len(classes):
            expected = f"0..{len(classes) - 1}" if numeric else f"one of {len(classes)} class names"
            raise UserError(f"{path} line {number}: label '{label}' is not a known class; expected {expected}")
        if not os.path.isfile(os.path.join(root, rel)):
            raise UserError(f"{path} line {number}: image '{os.path.join(root, rel)}' does not exist; expected a "
                            f"path relative to '{root}'")
        if rel in seen:
            raise UserError(f"{path} line {number}: '{rel}' is already listed on line {seen[rel]}; expected each "
                            f"image once")
        seen[rel] = number
        samples.append((rel, index))
    return classes, samples


def _split_counts(n, ratios):
    """How many of `n` samples go to each split: cumulative ratios rounded half up, then every one of the first
    min(n, len(ratios)) splits takes at least one sample from the largest split."""
    cuts, total = [], 0.0
    for r in ratios[:-1]:
        total += r
        cuts.append(min(n, int(math.floor(n * total + 0.5))))
    counts = [b - a for a, b in zip([0] + cuts, cuts + [n])]
    need = min(n, len(ratios))
    for k in range(need):
        if counts[k] == 0:
            donors = [j for j, c in enumerate(counts) if c > (1 if j < need else 0)]
            counts[max(donors, key=lambda j: (counts[j], -j))] -= 1
            counts[k] = 1
    return counts


def stratified_split(samples, ratios, seed):
    """{"train", "val"[, "test"]: sorted samples}: per class, files ordered by a hash of (seed, path) and cut by
    cumulative ratio. Listing order never matters; adding a file to a class can move at most one other file of
    that class across each boundary between splits (when the rounded counts shift), and none of other classes."""
    given = ratios
    try:
        ratios = [float(r) for r in ratios]
    except (TypeError, ValueError):
        ratios = []
    if len(ratios) not in (2, 3) or min(ratios) <= 0 or abs(sum(ratios) - 1.0) > 1e-6:
        raise UserError(f"split ratios {given!r} are not valid; expected 2 or 3 positive ratios (train, val[, test])"
                        f" that sum to 1")
    by_class = {}
    for rel, label in samples:
        by_class.setdefault(label, []).append(rel)
    names = SPLIT_NAMES[:len(ratios)]
    splits = {name: [] for name in names}
    for label, paths in by_class.items():
        paths = sorted(paths, key=lambda rel: (hashlib.sha256(f"{seed}\0{rel}".encode()).hexdigest(), rel))
        start = 0
        for name, count in zip(names, _split_counts(len(paths), ratios)):
            splits[name].extend((rel, label) for rel in paths[start:start + count])
            start += count
    return {name: sorted(items) for name, items in splits.items()}


def write_split(path, splits, classes, meta=None):
    """Write {"classes", "splits": {name: [[path, label], ...]}, **meta} as JSON, atomically."""
    meta = dict(meta or {})
    if {"classes", "splits"} & set(meta):
        raise UserError(f"split metadata for '{path}' reuses key classes/splits; expected other keys")
    payload = {"classes": list(classes), "splits": {name: [[rel, int(label)] for rel, label in items]
                                                    for name, items in splits.items()}, **meta}
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write split file '{path}' ({first_line(e)}); expected a writable folder") from None


def read_split(path):
    """(classes, {name: [(path, label), ...]}) from a file of write_split; UserError naming a bad file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        classes = [str(name) for name in data["classes"]]
        splits = {str(name): [(str(rel), int(label)) for rel, label in items]
                  for name, items in data["splits"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"split file '{path}' is missing or corrupt ({first_line(e)}); expected the JSON written "
                        f"by write_split (delete it to make a new split)") from None
    bad = [(rel, label) for items in splits.values() for rel, label in items if not 0 <= label < len(classes)]
    if bad:
        raise UserError(f"split file '{path}': '{bad[0][0]}' has label {bad[0][1]}; expected 0..{len(classes) - 1}")
    return classes, splits


def check_val_classes(train_samples, val_samples, classes, where):
    """UserError when a validation class has no training sample: it could never be predicted."""
    missing = sorted({label for _, label in val_samples} - {label for _, label in train_samples})
    if missing:
        names = ", ".join(f"'{classes[i]}'" for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UserError(f"{where}: {len(missing)} class(es) with validation images but no training images: {names};"
                        f" expected every validation class in the training set")


def _decode_problem(path):
    """None when cv2 decodes the whole image, else the reason."""
    try:
        read_rgb(path)
    except UserError:
        return "cannot be decoded" if os.path.isfile(path) else "does not exist"
    return None


def _header_problem(path):
    """None when PIL reads the image header and a non-empty size, else the reason."""
    try:
        with Image.open(path) as im:
            return None if min(im.size) > 0 else "has zero size"
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        return "does not exist" if not os.path.isfile(path) else f"has an unreadable header ({first_line(e)})"


def check_images(root, samples, full=None, level=None, cache=None, write_cache=True):
    """UserError naming the first unreadable image (and how many more) before training starts; returns how many
    files were read (the others passed before, unchanged, by the record at `cache`: data/check_cache.py).

    level: "full" decodes every image, "header" reads headers, "none" checks nothing; None (the old `full`
    argument) decodes up to FULL_CHECK_LIMIT samples, else reads headers. The record is updated when
    `write_cache` (one process per machine) and something changed."""
    if level is None:
        full = len(samples) <= FULL_CHECK_LIMIT if full is None else full
        level = "full" if full else "header"
    if level == "none":
        return 0
    record = check_cache.read_record(cache) if cache else check_cache.Record()
    prefix = os.path.join(root, "")  # joined by hand: os.path.join costs as much as a stat
    rels = [rel for rel, _ in samples]
    folders = {}  # relative folder -> its mtime_ns before its files are looked at (None: it cannot be read)
    for folder in dict.fromkeys(rel.rpartition("/")[0] for rel in rels):
        try:
            folders[folder] = os.stat(prefix + folder).st_mtime_ns
        except OSError:
            folders[folder] = None
    trusted = {folder: record.folder_unchanged(folder, mtime, level) for folder, mtime in folders.items()}
    passed = record.passed_names(level)
    if all(trusted.values()) and passed.issuperset(rels):
        return 0  # the restart: nothing changed, nothing is read or written
    tag, confirmed, todo, problems = check_cache.TAGS[level], {}, [], []
    for order, rel in enumerate(rels):
        if rel in passed and trusted[rel.rpartition("/")[0]]:
            confirmed[rel] = record.entries()[rel]
            continue
        try:  # a changed folder (or a file never checked): the file's own size and mtime decide
            st = os.stat(prefix + rel)
        except OSError:
            problems.append((order, rel, "does not exist"))
            continue
        stat = f"{st.st_size}\t{st.st_mtime_ns}"
        entry = record.matches(rel, st.st_size, st.st_mtime_ns, level)
        if entry is None:
            todo.append((order, rel, stat))
        else:
            confirmed[rel] = entry
    check = _decode_problem if level == "full" else _header_problem
    pool = ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) + 2), thread_name_prefix="check_images")
    try:
        for start in range(0, len(todo), 4096):  # in chunks, so a huge list never holds millions of futures
            chunk = todo[start:start + 4096]
            for (order, rel, stat), why in zip(chunk, pool.map(check, [prefix + rel for _, rel, _ in chunk])):
                if why:
                    problems.append((order, rel, why))
                else:
                    confirmed[rel] = (tag, stat)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    bad = {rel.rpartition("/")[0] for _, rel, _ in problems}
    changed = {folder: (tag, mtime) for folder, mtime in folders.items()
               if not trusted[folder] and mtime is not None and folder not in bad}
    if cache and write_cache and (todo or changed):
        check_cache.write_record(cache, record, confirmed, changed)
    if problems:
        _, rel, why = min(problems)  # the first in the samples' order
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"image '{prefix + rel}' {why}{more}; expected every listed image to be a "
                        f"readable image file (fix or remove it)")
    return len(todo)


def check_images_per_machine(root, samples, level, cache):
    """check_images by local rank 0 of each machine, which writes the record, while the others wait and then check
    against it (nothing left to read when it passed). A failure stops every process with the same line: the
    others find the same files in their own check. Returns the line to log."""
    start, failure, read = time.perf_counter(), None, 0
    if is_local_main():
        try:
            read = check_images(root, samples, level=level, cache=cache)
        except UserError as e:
            failure = e
    barrier()
    if failure is not None:
        raise failure
    if not is_local_main():
        check_images(root, samples, level=level, cache=cache, write_cache=False)
    return (f"image check ({level}) of {len(samples)} images under {root}: {read} read, "
            f"{len(samples) - read} unchanged since an earlier check; {time.perf_counter() - start:.1f} s")


class ClassificationDataset(torch.utils.data.Dataset):
    """(transform(RGB uint8 HxWx3), label) pairs for samples under `root`; default transform: ImageNet-normalised
    float32 3xHxW tensor without resizing. With `skip_unreadable`, an image that cannot be decoded (it changed
    after the check, or the check was skipped) comes back as an Unreadable marker instead of raising."""

    def __init__(self, root, samples, classes, transform=None, skip_unreadable=False):
        self.root, self.classes, self.skip_unreadable = root, list(classes), skip_unreadable
        prefix = os.path.join(root, "")
        self.paths = [prefix + rel for rel, _ in samples]
        self.labels = [int(label) for _, label in samples]
        bad = [label for label in self.labels if not 0 <= label < len(self.classes)]
        if bad:
            raise UserError(f"dataset under '{root}' has label {bad[0]}; expected 0..{len(self.classes) - 1}")
        self.transform = transform if transform is not None else to_tensor

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            image = read_rgb(self.paths[i])
        except UserError:
            if not self.skip_unreadable:
                raise
            why = "cannot be decoded" if os.path.isfile(self.paths[i]) else "does not exist"
            return Unreadable(i, self.paths[i], why)  # SkipUnreadable drops it from the batch
        return self.transform(image), self.labels[i]
