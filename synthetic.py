"""The built-in data: a deterministic generator of VOC-layout synthetic scenes, cached on first use."""
import contextlib
import json
import os
import shutil
import socket

import cv2
import numpy as np

from data import IGNORE_INDEX, _read_list, _sample_paths, save_palette_png
from utils import UserError, barrier

# Built-in synthetic data. Each object class has its own shape AND its own texture, while all
# colours are random, so a colour threshold cannot solve it. Bump SYNTHETIC_VERSION when the
# drawing code changes; the tunables below are stored in the manifest, so changing one of them
# regenerates cached copies by itself.
SYNTHETIC_VERSION = 1
SYNTHETIC_CLASSES = ("background", "striped_disk", "checkered_box", "dotted_triangle", "grid_cross")
SYN_OBJECT_SIZE = (0.2, 0.5)        # object extent, as a fraction of the image side
SYN_OBJECTS_PER_IMAGE = (1, 4)      # inclusive range
SYN_TEXTURE_PERIOD = (5.0, 9.0)     # pixels at 128 px; scaled with the image size
SYN_MIN_CONTRAST = 150.0            # least RGB distance between an object's two texture colours
SYN_PIXEL_NOISE = 8.0               # std of the per-pixel Gaussian noise, 0..255 units
SYN_BLOB_GRID = (3, 7)              # background colour blobs: coarse and fine random grids, upscaled
SYN_CLUTTER_LINES = (0, 3)          # thin random lines on the background, inclusive range
SYN_TEXTURE_TILT = 15.0             # a texture is rotated by up to +-this many degrees


def _texture(cls, u, v, period):
    """Boolean texture in object-rotated coordinates (u, v); one pattern per class."""
    fu, fv = u / period, v / period
    if cls == 1:                                            # stripes
        return (fu % 1.0) < 0.5
    if cls == 2:                                            # checkerboard
        return (np.floor(fu) + np.floor(fv)) % 2 == 0
    if cls == 3:                                            # dots
        return (fu % 1.0 - 0.5) ** 2 + (fv % 1.0 - 0.5) ** 2 < 0.09
    return ((fu % 1.0) < 0.25) | ((fv % 1.0) < 0.25)        # grid of thin lines


def _shape_mask(cls, rng, size, cx, cy, extent, angle):
    """uint8 mask (1 inside) of the class's shape, drawn with sub-pixel precision."""
    mask = np.zeros((size, size), np.uint8)
    r = extent / 2.0
    deg = np.degrees(angle)
    if cls == 1:
        polys = [cv2.ellipse2Poly((0, 0), (1000, 1000), 0, 0, 360, 5) / 1000.0 * r + (cx, cy)]
    elif cls == 2:
        polys = [cv2.boxPoints(((cx, cy), (extent, extent * rng.uniform(0.6, 1.0)), deg))]
    elif cls == 3:
        a = angle + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.25, 0.25, 3)
        polys = [np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)]
    else:
        arm = extent * 0.32
        polys = [cv2.boxPoints(((cx, cy), (extent, arm), deg)), cv2.boxPoints(((cx, cy), (arm, extent), deg))]
    for poly in polys:
        cv2.fillPoly(mask, [np.round(np.asarray(poly) * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    return mask


def _synthetic_sample(rng, size, ignore_width):
    """One (BGR uint8 image, uint8 label) pair."""
    image = np.zeros((size, size, 3), np.float32)
    for grid, weight in zip(SYN_BLOB_GRID, (1.0, 0.5)):
        blobs = rng.uniform(-127.5, 127.5, (grid, grid, 3)).astype(np.float32)
        image += weight * cv2.resize(blobs, (size, size), interpolation=cv2.INTER_CUBIC)
    image = image / 1.5 + 127.5
    for _ in range(rng.integers(SYN_CLUTTER_LINES[0], SYN_CLUTTER_LINES[1] + 1)):
        p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        cv2.line(image, (int(p1[0]), int(p1[1])), (int(p2[0]), int(p2[1])), rng.uniform(0, 255, 3).tolist(),
                 int(rng.integers(1, 3)))
    label = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(rng.integers(SYN_OBJECTS_PER_IMAGE[0], SYN_OBJECTS_PER_IMAGE[1] + 1)):
        cls = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        extent = size * rng.uniform(*SYN_OBJECT_SIZE)
        cx, cy = rng.uniform(0.1 * size, 0.9 * size, 2)
        inside = _shape_mask(cls, rng, size, cx, cy, extent, rng.uniform(0, 2 * np.pi)).astype(bool)
        t = np.radians(rng.uniform(-SYN_TEXTURE_TILT, SYN_TEXTURE_TILT))
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = (yy - cy) * np.cos(t) - (xx - cx) * np.sin(t)
        pattern = _texture(cls, u, v, rng.uniform(*SYN_TEXTURE_PERIOD) * size / 128.0)
        c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        while np.linalg.norm(c1 - c2) < SYN_MIN_CONTRAST:     # the texture must be visible
            c2 = rng.uniform(0, 255, 3)
        image[inside] = np.where(pattern[inside, None], c1, c2)
        label[inside] = cls
    image += rng.normal(0.0, SYN_PIXEL_NOISE, image.shape).astype(np.float32)
    if ignore_width > 0:
        kernel = np.ones((2 * ignore_width + 1,) * 2, np.uint8)
        label[cv2.dilate(label, kernel) != cv2.erode(label, kernel)] = IGNORE_INDEX
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label


def _synthetic_manifest(n_train, n_val, size, seed, ignore_width):
    return {"generator": "ailab-synthetic", "version": SYNTHETIC_VERSION, "classes": list(SYNTHETIC_CLASSES),
            "n_train": n_train, "n_val": n_val, "size": size, "seed": seed, "ignore_width": ignore_width,
            "params": {"object_size": list(SYN_OBJECT_SIZE), "objects_per_image": list(SYN_OBJECTS_PER_IMAGE),
                       "texture_period": list(SYN_TEXTURE_PERIOD), "min_contrast": SYN_MIN_CONTRAST,
                       "pixel_noise": SYN_PIXEL_NOISE, "blob_grid": list(SYN_BLOB_GRID),
                       "clutter_lines": list(SYN_CLUTTER_LINES), "texture_tilt": SYN_TEXTURE_TILT}}


def make_synthetic_voc(root, n_train=300, n_val=100, size=128, seed=0, ignore_width=1):
    """Write a deterministic VOC-layout dataset of synthetic scenes to `root`; manifest.json is written last."""
    for name, value, least in (("n_train", n_train, 1), ("n_val", n_val, 1), ("size", size, 32),
                               ("ignore_width", ignore_width, 0)):
        if not isinstance(value, int) or value < least:
            raise UserError(f"synthetic data: {name}={value!r} is invalid; expected an integer >= {least}")
    for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    ids = [f"syn_{i:06d}" for i in range(n_train + n_val)]
    for i, image_id in enumerate(ids):
        image, label = _synthetic_sample(np.random.default_rng([seed, i]), size, ignore_width)
        cv2.imwrite(os.path.join(root, "JPEGImages", image_id + ".jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        save_palette_png(os.path.join(root, "SegmentationClass", image_id + ".png"), label)
    for split, split_ids in (("train", ids[:n_train]), ("val", ids[n_train:])):
        with open(os.path.join(root, "ImageSets", "Segmentation", split + ".txt"), "w") as f:
            f.write("".join(i + "\n" for i in split_ids))
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(_synthetic_manifest(n_train, n_val, size, seed, ignore_width), f, indent=2, sort_keys=True)
    return root


def _is_complete(root, manifest):
    try:
        with open(os.path.join(root, "manifest.json")) as f:
            if json.load(f) != manifest:
                return False
        ids = [i for split in ("train", "val") for i in _read_list(root, split)]
    except (OSError, ValueError, UserError):
        return False
    return len(ids) == manifest["n_train"] + manifest["n_val"] and all(
        os.path.isfile(p) for i in ids for p in _sample_paths(root, i))


def ensure_builtin_dataset(cache_dir, n_train=300, n_val=100, size=128, seed=0, ignore_width=1):
    """Path of the built-in dataset under `cache_dir`, generating it first if it is missing or incomplete.

    Generation happens in a private sibling folder that is renamed into place, so a crash never leaves
    a half dataset that looks complete, and processes racing each other all end up with a complete copy.
    """
    target = os.path.join(cache_dir, f"synthetic-v{SYNTHETIC_VERSION}")
    manifest = _synthetic_manifest(n_train, n_val, size, seed, ignore_width)
    if _is_complete(target, manifest):
        return target
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create data cache folder '{cache_dir}' ({e.strerror}); expected a writable folder")
    tmp = os.path.join(cache_dir, f".synthetic-v{SYNTHETIC_VERSION}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    make_synthetic_voc(tmp, n_train, n_val, size, seed, ignore_width)
    if os.path.exists(target):
        if _is_complete(target, manifest):      # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        stale = tmp + ".stale"                   # move aside first: rmtree of the live name is not atomic
        with contextlib.suppress(FileNotFoundError):
            os.rename(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_complete(target, manifest):
            raise UserError(f"could not put the built-in dataset in place at '{target}'; "
                            f"expected to be able to rename folders inside '{cache_dir}'")
    return target


def resolve_root(dataset_path, cache_dir, ctx):
    """The dataset folder: --dataset_path, else the built-in data, generated once per machine by local rank 0."""
    if dataset_path:
        return dataset_path
    if ctx.local_rank == 0:
        ensure_builtin_dataset(cache_dir)
    barrier()
    return ensure_builtin_dataset(cache_dir)
