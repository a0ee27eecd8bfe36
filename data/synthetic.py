"""The built-in data: a deterministic generator of VOC-layout synthetic scenes, cached on first use."""
import contextlib
import json
import os
import shutil
import socket

import cv2
import numpy as np

from core.distributed import barrier
from data.distance_maps import DEFAULT_FOLDERS, DEFAULT_LAMBDA_C, DEFAULT_LAMBDA_S, distance_maps
from data.readers import save_palette_png
from data.voc import _read_list, _sample_paths
from utils import IGNORE_INDEX, UserError

# Built-in synthetic data. Each object class has its own shape AND its own texture, while all
# colours are random, so a colour threshold cannot solve it. Bump SYNTHETIC_VERSION when the
# drawing code changes; the tunables below are stored in the manifest, so changing one of them
# regenerates cached copies by itself.
SYNTHETIC_VERSION = 4
SYNTHETIC_CLASSES = ("background", "striped_disk", "checkered_box", "dotted_triangle", "grid_cross")
SYN_OBJECT_SIZE = (0.2, 0.5)        # object extent, as a fraction of the image side
SYN_OBJECTS_PER_IMAGE = (1, 4)      # inclusive range
SYN_TEXTURE_PERIOD = (5.0, 9.0)     # pixels at 128 px; scaled with the image size
SYN_MIN_CONTRAST = 150.0            # least RGB distance between an object's two texture colours
SYN_PIXEL_NOISE = 8.0               # std of the per-pixel Gaussian noise, 0..255 units
SYN_BLOB_GRID = (3, 7)              # background colour blobs: coarse and fine random grids, upscaled
SYN_CLUTTER_LINES = (0, 3)          # thin random lines on the background, inclusive range
SYN_TEXTURE_TILT = 15.0             # a texture is rotated by up to +-this many degrees
SYN_DOT_RADIUS = 0.22               # dots: radius as a fraction of the period, on a staggered (hexagonal-like) lattice
SYN_GRID_LINE = 0.25                # grid: line width as a fraction of the period
SYN_TRIANGLE_RADIUS = 0.65          # a triangle's corners lie this far from its centre, as a fraction of its extent
# Version 3: dots are smaller and staggered. In version 2 (radius 0.3, square lattice) dots were 28 % of the texture
# and a grid with its two colours swapped was squares on a square lattice: the two textures looked alike, and the
# default run never learned dotted_triangle (IoU 0.0004, 76 % of its pixels called grid_cross). Now the dots' share
# (15 %) is far from the grid's (44 % lines / 56 % squares) whichever colour is which, and their neighbours sit at
# 60 degrees, not 90.
# Version 4: triangles are larger (corners at 0.65 of the extent from the centre, were 0.5). A triangle inscribed in
# the extent's circle covers 41 % of a disk's area, so dotted_triangle had 2.0 % of the pixels against 3.9-5.3 % for
# the other objects, and it was the one class the default run had not learned by its last epoch. Its area is now
# about the cross's. The random draws are version 3's; only what a triangle covers (and so its scribble, pseudo label
# and distance maps) differs.

# Scribble supervision (version 2). Besides each image and label, the generator writes a scribble label, a CAM-like
# pseudo label and the two distance maps, in the folders of scribble.DEFAULT_FOLDERS. They are drawn from their own
# random stream, default_rng([seed, index, SCRIBBLE_STREAM]), and never from the scene's, so the images and labels
# are byte-identical to version 1's. Lengths are in pixels at 128 px and scale with the image size.
SCRIBBLE_STREAM = 7
SYN_SCRIBBLE_WIDTH = (1, 3)         # stroke width, inclusive range
SYN_SCRIBBLE_POINTS = (2, 4)        # vertices of a stroke's polyline, inclusive range
SYN_SCRIBBLE_CORE = 0.5             # an object's stroke runs through pixels at least this fraction of the object's
                                    # largest inner distance from its outline: near its medial axis
SYN_SCRIBBLE_MARGIN = 2.0           # no scribble pixel is closer than this to another region (annotators stay inside)
SYN_SCRIBBLE_BACKGROUND = (1, 2)    # background strokes per image, inclusive range
SYN_PSEUDO_MISS = 0.15              # chance that an object is missed (left as background), as CAMs miss objects
SYN_PSEUDO_WRONG = 0.1              # chance that a found object gets a wrong class
SYN_PSEUDO_GROW = (-4.0, 3.0)       # an object is eroded (< 0) or dilated (> 0) by a uniform amount in this range
SYN_PSEUDO_WOBBLE = 2.5             # amplitude of smooth noise on an object's outline (CAMs are blobs, not polygons)
SYN_PSEUDO_WOBBLE_GRID = 6          # that noise: a random grid this coarse, upscaled
SYN_PSEUDO_BAND = 1                 # width of the uncertain (255) band along pseudo-label boundaries; 0 = none


def _texture(cls, u, v, period):
    """Boolean texture in object-rotated coordinates (u, v); one pattern per class."""
    fu, fv = u / period, v / period
    if cls == 1:                                            # stripes
        return (fu % 1.0) < 0.5
    if cls == 2:                                            # checkerboard
        return (np.floor(fu) + np.floor(fv)) % 2 == 0
    if cls == 3:                                            # dots, every other row shifted by half a period
        fu = fu + 0.5 * (np.floor(fv) % 2)
        return (fu % 1.0 - 0.5) ** 2 + (fv % 1.0 - 0.5) ** 2 < SYN_DOT_RADIUS ** 2
    return ((fu % 1.0) < SYN_GRID_LINE) | ((fv % 1.0) < SYN_GRID_LINE)  # grid of thin lines


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
        corner = SYN_TRIANGLE_RADIUS * extent
        polys = [np.stack([cx + corner * np.cos(a), cy + corner * np.sin(a)], 1)]
    else:
        arm = extent * 0.32
        polys = [cv2.boxPoints(((cx, cy), (extent, arm), deg)), cv2.boxPoints(((cx, cy), (arm, extent), deg))]
    for poly in polys:
        cv2.fillPoly(mask, [np.round(np.asarray(poly) * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    return mask


def _synthetic_sample(rng, size, ignore_width):
    """One scene: BGR uint8 image, uint8 label (with its ignore band), and an int32 map of the visible part of
    each object (0 = background, k = the k-th object drawn) with their classes, for the scribble maps."""
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
    objects, classes = np.zeros((size, size), np.int32), [0]
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
        classes.append(cls)
        objects[inside] = len(classes) - 1
    image += rng.normal(0.0, SYN_PIXEL_NOISE, image.shape).astype(np.float32)
    if ignore_width > 0:
        kernel = np.ones((2 * ignore_width + 1,) * 2, np.uint8)
        label[cv2.dilate(label, kernel) != cv2.erode(label, kernel)] = IGNORE_INDEX
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label, objects, classes


def _distance_to_outside(mask):
    """Distance of each pixel of a boolean mask to the nearest pixel outside it (0 outside), to within a few
    percent: the 5x5 mask is several times faster than the exact transform and precise enough for drawing."""
    return cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5)


def _draw_stroke(rng, canvas, core, region, value, scale):
    """Paint `value` along a random polyline through `core` pixels, clipped to `region`."""
    ys, xs = np.nonzero(core)
    pick = rng.integers(0, len(xs), rng.integers(SYN_SCRIBBLE_POINTS[0], SYN_SCRIBBLE_POINTS[1] + 1))
    chosen = np.stack([xs[pick], ys[pick]], 1)
    m = cv2.moments(core.astype(np.uint8), binaryImage=True)
    angle = 0.5 * np.arctan2(2 * m["mu11"], m["mu20"] - m["mu02"])  # the core's main axis
    chosen = chosen[np.argsort(chosen @ (np.cos(angle), np.sin(angle)), kind="stable")]  # lengthwise, no zigzag
    width = max(1, round(int(rng.integers(SYN_SCRIBBLE_WIDTH[0], SYN_SCRIBBLE_WIDTH[1] + 1)) * scale))
    stroke = np.zeros(canvas.shape, np.uint8)
    cv2.polylines(stroke, [chosen.astype(np.int32).reshape(-1, 1, 2)], False, 1, width)
    canvas[(stroke > 0) & region] = value


def _scribble_label(rng, objects, classes, scale):
    """uint8 scribbles: a stroke inside each visible object, a few on the background, IGNORE_INDEX elsewhere."""
    scribble = np.full(objects.shape, IGNORE_INDEX, np.uint8)
    for k in range(1, len(classes)):
        inner = _distance_to_outside(objects == k)
        if inner.max() > 0:
            region = inner >= min(SYN_SCRIBBLE_MARGIN * scale, inner.max())  # a tiny object still gets its centre
            _draw_stroke(rng, scribble, inner >= SYN_SCRIBBLE_CORE * inner.max(), region, classes[k], scale)
    region = _distance_to_outside(objects == 0) >= SYN_SCRIBBLE_MARGIN * scale
    if region.any():
        for _ in range(rng.integers(SYN_SCRIBBLE_BACKGROUND[0], SYN_SCRIBBLE_BACKGROUND[1] + 1)):
            _draw_stroke(rng, scribble, region, region, 0, scale)
    return scribble


def _pseudo_label(rng, objects, classes, scale):
    """uint8 CAM-like pseudo label: the true objects missed, mislabelled, grown or shrunk, with wobbly outlines
    and an uncertain (IGNORE_INDEX) band along every boundary."""
    size = objects.shape[0]
    pseudo = np.zeros(objects.shape, np.uint8)
    wobble = rng.normal(0.0, SYN_PSEUDO_WOBBLE * scale, (SYN_PSEUDO_WOBBLE_GRID,) * 2).astype(np.float32)
    # one field for the image: each outline crosses its own part of it
    wobble = cv2.resize(wobble, (size, size), interpolation=cv2.INTER_CUBIC)
    for k in range(1, len(classes)):
        # every object takes the same draws, whatever happens to it, so one change does not reshuffle the rest
        missed, wrong = rng.uniform(size=2) < (SYN_PSEUDO_MISS, SYN_PSEUDO_WRONG)
        other = int(rng.integers(1, len(SYNTHETIC_CLASSES) - 1))
        grow = rng.uniform(*SYN_PSEUDO_GROW) * scale
        mask = objects == k
        if missed or not mask.any():
            continue
        signed = _distance_to_outside(mask) - _distance_to_outside(~mask)  # > 0 inside, < 0 outside
        grown = signed + grow + wobble > 0
        pseudo[grown] = (other + (other >= classes[k])) if wrong else classes[k]
    if SYN_PSEUDO_BAND > 0:
        kernel = np.ones((2 * max(1, round(SYN_PSEUDO_BAND * scale)) + 1,) * 2, np.uint8)
        pseudo[cv2.dilate(pseudo, kernel) != cv2.erode(pseudo, kernel)] = IGNORE_INDEX
    return pseudo


def _scribble_paths(root, image_id):
    return [os.path.join(root, DEFAULT_FOLDERS[key], image_id + ".png") for key in DEFAULT_FOLDERS]


def _write_scribble_maps(root, image_id, rng, objects, classes):
    """Write the scribble label, pseudo label and distance maps of one scene (see SCRIBBLE_STREAM)."""
    scale = objects.shape[0] / 128.0
    scribble = _scribble_label(rng, objects, classes, scale)
    pseudo = _pseudo_label(rng, objects, classes, scale)
    dist_s, dist_c = distance_maps(scribble, pseudo, DEFAULT_LAMBDA_S, DEFAULT_LAMBDA_C)
    scribble_path, pseudo_path, dist_s_path, dist_c_path = _scribble_paths(root, image_id)
    save_palette_png(scribble_path, scribble)
    save_palette_png(pseudo_path, pseudo)
    cv2.imwrite(dist_s_path, dist_s)
    cv2.imwrite(dist_c_path, dist_c)


def _synthetic_manifest(n_train, n_val, size, seed, ignore_width):
    return {"generator": "ailab-synthetic", "version": SYNTHETIC_VERSION, "classes": list(SYNTHETIC_CLASSES),
            "n_train": n_train, "n_val": n_val, "size": size, "seed": seed, "ignore_width": ignore_width,
            "params": {"object_size": list(SYN_OBJECT_SIZE), "objects_per_image": list(SYN_OBJECTS_PER_IMAGE),
                       "texture_period": list(SYN_TEXTURE_PERIOD), "min_contrast": SYN_MIN_CONTRAST,
                       "pixel_noise": SYN_PIXEL_NOISE, "blob_grid": list(SYN_BLOB_GRID),
                       "clutter_lines": list(SYN_CLUTTER_LINES), "texture_tilt": SYN_TEXTURE_TILT,
                       "dot_radius": SYN_DOT_RADIUS, "grid_line": SYN_GRID_LINE,
                       "triangle_radius": SYN_TRIANGLE_RADIUS},
            "scribble": {"folders": dict(DEFAULT_FOLDERS), "stream": SCRIBBLE_STREAM,
                         "width": list(SYN_SCRIBBLE_WIDTH), "points": list(SYN_SCRIBBLE_POINTS),
                         "core": SYN_SCRIBBLE_CORE, "margin": SYN_SCRIBBLE_MARGIN,
                         "background": list(SYN_SCRIBBLE_BACKGROUND), "miss": SYN_PSEUDO_MISS,
                         "wrong": SYN_PSEUDO_WRONG, "grow": list(SYN_PSEUDO_GROW), "wobble": SYN_PSEUDO_WOBBLE,
                         "wobble_grid": SYN_PSEUDO_WOBBLE_GRID, "band": SYN_PSEUDO_BAND,
                         "lambda_s": DEFAULT_LAMBDA_S, "lambda_c": DEFAULT_LAMBDA_C}}


def make_synthetic_voc(root, n_train=300, n_val=100, size=128, seed=0, ignore_width=1):
    """Write a deterministic VOC-layout dataset of synthetic scenes to `root`; manifest.json is written last.

    Every image also gets a scribble label, a pseudo label and two distance maps (see SCRIBBLE_STREAM)."""
    for name, value, least in (("n_train", n_train, 1), ("n_val", n_val, 1), ("size", size, 32),
                               ("ignore_width", ignore_width, 0)):
        if not isinstance(value, int) or value < least:
            raise UserError(f"synthetic data: {name}={value!r} is invalid; expected an integer >= {least}")
    for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation"),
                *DEFAULT_FOLDERS.values()):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    ids = [f"syn_{i:06d}" for i in range(n_train + n_val)]
    for i, image_id in enumerate(ids):
        image, label, objects, classes = _synthetic_sample(np.random.default_rng([seed, i]), size, ignore_width)
        cv2.imwrite(os.path.join(root, "JPEGImages", image_id + ".jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        save_palette_png(os.path.join(root, "SegmentationClass", image_id + ".png"), label)
        _write_scribble_maps(root, image_id, np.random.default_rng([seed, i, SCRIBBLE_STREAM]), objects, classes)
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
        os.path.isfile(p) for i in ids for p in (*_sample_paths(root, i), *_scribble_paths(root, i)))


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
