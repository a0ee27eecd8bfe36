"""Datasets, joint image+label transforms, samplers and loaders.

Images are read with OpenCV (BGR converted to RGB); labels are PNGs of class indices read with PIL,
because OpenCV expands a palette PNG to colours. 255 in a label means "ignore".
"""
import itertools
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Sampler

from registry import Registry
from utils import UserError
from workers import make_loader

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VOC_LAYOUT = "a VOC-layout folder with JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/"

# ---------------------------------------------------------------------------------------------
# VOC-layout dataset and its checks.

def _sample_paths(root, image_id):
    return (os.path.join(root, "JPEGImages", image_id + ".jpg"),
            os.path.join(root, "SegmentationClass", image_id + ".png"))


def _read_list(root, split):
    """Ids listed in ImageSets/Segmentation/<split>.txt, after checking that the folder and list exist."""
    if not os.path.isdir(root):
        raise UserError(f"dataset path '{root}' does not exist; expected {VOC_LAYOUT}")
    list_dir = os.path.join(root, "ImageSets", "Segmentation")
    list_path = os.path.join(list_dir, split + ".txt")
    if not os.path.isfile(list_path):
        found = sorted(n[:-4] for n in os.listdir(list_dir) if n.endswith(".txt")) if os.path.isdir(list_dir) else []
        raise UserError(f"split list '{list_path}' does not exist; expected one image id per line "
                        f"(splits found: {', '.join(found) or 'none'})")
    with open(list_path) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise UserError(f"split list '{list_path}' is empty; expected one image id per line")
    return ids


def read_image(path):
    """RGB uint8 HxWx3 image; UserError when the file cannot be decoded."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"cannot read image '{path}'; expected a readable JPEG/PNG file (missing or corrupt)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path, numclasses=None):
    """uint8 HxW class-index label from a palette ('P') or greyscale ('L') PNG; 255 = ignore."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise UserError(f"label '{path}' has image mode {im.mode}; expected class indices in a palette "
                                f"('P') or greyscale ('L') PNG, as in VOC SegmentationClass/")
            label = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read label '{path}' ({e}); expected a PNG of class indices")
    if numclasses is not None:
        bad = label[(label >= numclasses) & (label != IGNORE_INDEX)]
        if bad.size:
            raise UserError(f"label '{path}' has value {int(bad.max())}; expected values 0..{numclasses - 1} "
                            f"(numclasses={numclasses}) or {IGNORE_INDEX} for ignore")
    return label


def _map_paths(root, image_id, maps):
    """{key: path} of an id's per-pixel maps; `maps` is {key: folder under root} (PNG files named <id>.png)."""
    return {key: os.path.join(root, folder, image_id + ".png") for key, folder in (maps or {}).items()}


def _read_pair(root, image_id, numclasses, maps=None, weight_maps=()):
    """(image, label), or with `maps` (image, {key: map}): the label PNG is replaced by the listed maps.

    Maps named in `weight_maps` hold weights 0..255 and skip the class-index check.
    """
    image_path, label_path = _sample_paths(root, image_id)
    image = read_image(image_path)
    paths = _map_paths(root, image_id, maps) if maps else {"label": label_path}
    labels = {key: read_label(path, None if key in weight_maps else numclasses) for key, path in paths.items()}
    for key, label in labels.items():
        if image.shape[:2] != label.shape:
            raise UserError(f"image and {'label' if key == 'label' else key + ' map'} of id '{image_id}' differ in size: '{image_path}' is "
                            f"{image.shape[1]}x{image.shape[0]}, '{paths[key]}' is {label.shape[1]}x{label.shape[0]} "
                            f"(WxH); expected the same size")
    return image, (labels if maps else labels["label"])


def check_dataset(root, split, numclasses, full=True, maps=None, weight_maps=()):
    """Check the split before training; raise UserError with one line on the first problem; return its ids.

    Always checks the layout and that every listed id has an image and a label file. With full=True it
    also reads every file (in threads: cv2 and PIL release the GIL) and checks sizes and label values.
    """
    ids = _read_list(root, split)
    for image_id in ids:
        paths = _map_paths(root, image_id, maps).values() if maps else _sample_paths(root, image_id)[1:]
        for path in (_sample_paths(root, image_id)[0], *paths):
            if not os.path.isfile(path):
                raise UserError(f"id '{image_id}' in split '{split}' has no file '{path}'; expected {VOC_LAYOUT}")
    if full:
        def problem(image_id):
            try:
                _read_pair(root, image_id, numclasses, maps, weight_maps)
            except UserError as e:
                return str(e)
            return None

        with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
            problems = [p for p in pool.map(problem, ids) if p]
        if problems:
            more = f" (and {len(problems) - 1} more problem(s) in split '{split}')" if len(problems) > 1 else ""
            raise UserError(problems[0] + more)
    return ids


class SegmentationDataset(Dataset):
    """VOC-layout split: JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/<split>.txt.

    The constructor checks the layout and that all files exist; check_dataset(..., full=True) checks contents.
    Items are transform(image RGB uint8 HxWx3, label uint8 HxW); without a transform, EvalTransform().
    With `maps` ({key: folder}, e.g. scribbles and pseudo labels) the label is a dict of those maps instead;
    `weight_maps` names the ones that hold weights rather than class indices.
    """

    def __init__(self, root, split, transform=None, numclasses=None, check_contents=False, maps=None,
                 weight_maps=()):
        self.root, self.split, self.numclasses = root, split, numclasses
        self.maps, self.weight_maps = maps, tuple(weight_maps)
        self.ids = check_dataset(root, split, numclasses, check_contents, maps, self.weight_maps)
        self.transform = transform if transform is not None else EvalTransform()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return self.transform(*_read_pair(self.root, self.ids[index], self.numclasses, self.maps, self.weight_maps))

    def image_size(self, index):
        """(height, width) of a sample, read from the label's header only."""
        with Image.open(_sample_paths(self.root, self.ids[index])[1]) as im:
            return im.height, im.width


DATASETS = Registry("dataset")
register_dataset = DATASETS.register


@register_dataset("voc")
def build_voc(args, root, split, train):
    """VOC layout. Every file is read once up front, so a broken dataset stops before the first step."""
    transform = TrainTransform(args.crop_size, args.scale_range, args.hflip_prob) if train else EvalTransform()
    return SegmentationDataset(root, split, transform, args.numclasses, check_contents=True)


# ---------------------------------------------------------------------------------------------
# Joint transforms: numpy (image RGB uint8 HxWx3, label uint8 HxW) -> (float 3xHxW, int64 HxW) tensors.

def _normalize_coefficients(mean, std):
    std = np.asarray(std, np.float32)
    return 1.0 / (255.0 * std), -np.asarray(mean, np.float32) / std


def to_normalized_tensor(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """RGB uint8 HxWx3 -> float32 tensor 3xHxW, (x / 255 - mean) / std."""
    scale, shift = _normalize_coefficients(mean, std)
    return torch.from_numpy(np.ascontiguousarray((image.astype(np.float32) * scale + shift).transpose(2, 0, 1)))


class TrainTransform:
    """Random scale, pad (image with the mean colour, label with 255), random crop, horizontal flip, normalise.

    Randomness comes from numpy's global np.random, which worker_init_fn seeds per loader worker.
    """

    def __init__(self, crop_size, scale_range=(0.5, 2.0), hflip_prob=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 weight_maps=()):
        self.crop_h, self.crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.scale_range, self.hflip_prob = tuple(scale_range), hflip_prob
        self.weight_maps = tuple(weight_maps)
        self.scale, self.shift = _normalize_coefficients(mean, std)

    def __call__(self, image, label):
        """label: uint8 HxW, or a dict of such maps that all get the same geometry. A map named in
        the constructor's `weight_maps` is a weight: bilinear resizing, padded with 0 (no
        weight) and is returned as uint8; every other map is a label: nearest resizing, padded with 255."""
        maps = label if isinstance(label, dict) else {"label": label}
        weights = self.weight_maps
        scale = np.random.uniform(*self.scale_range)
        h, w = next(iter(maps.values())).shape
        if scale != 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
            # NEAREST_EXACT samples at pixel centres like INTER_LINEAR; plain NEAREST is off by half a pixel
            maps = {key: cv2.resize(m, size, interpolation=cv2.INTER_LINEAR if key in weights
                                    else cv2.INTER_NEAREST_EXACT) for key, m in maps.items()}
            h, w = size[1], size[0]
        # The crop window may stick out of a small image; sticking out is padding, on a random side.
        y0 = np.random.randint(min(0, h - self.crop_h), max(0, h - self.crop_h) + 1)
        x0 = np.random.randint(min(0, w - self.crop_w), max(0, w - self.crop_w) + 1)
        sy, sx = slice(max(y0, 0), min(y0 + self.crop_h, h)), slice(max(x0, 0), min(x0 + self.crop_w, w))
        dy, dx = slice(sy.start - y0, sy.stop - y0), slice(sx.start - x0, sx.stop - x0)
        out_image = np.zeros((self.crop_h, self.crop_w, 3), np.float32)     # 0 is the mean after normalising
        out_image[dy, dx] = image[sy, sx].astype(np.float32) * self.scale + self.shift
        out = {}
        for key, m in maps.items():
            out[key] = np.full((self.crop_h, self.crop_w), 0 if key in weights else IGNORE_INDEX, np.uint8)
            out[key][dy, dx] = m[sy, sx]
        if np.random.random() < self.hflip_prob:
            out_image, out = out_image[:, ::-1], {key: m[:, ::-1] for key, m in out.items()}
        tensors = {key: torch.from_numpy(np.ascontiguousarray(m) if key in weights else m.astype(np.int64))
                   for key, m in out.items()}
        return (torch.from_numpy(np.ascontiguousarray(out_image.transpose(2, 0, 1))),
                tensors if isinstance(label, dict) else tensors["label"])


class EvalTransform:
    """Normalise only, at the original size."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean, self.std = mean, std

    def __call__(self, image, label):
        return to_normalized_tensor(image, self.mean, self.std), torch.from_numpy(label.astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Samplers and loaders. One code path for any world size, 1 included.

class ShardSampler(Sampler):
    """Evaluation shard: rank r gets r, r+W, r+2W, ... with no padding, so every index is seen exactly once."""

    def __init__(self, n, rank, world_size):
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is invalid for world size {world_size}; expected 0 <= rank < world size")
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self):
        return len(range(self.rank, self.n, self.world_size))


def pad_collate(batch):
    """Stack (image, label) pairs of different sizes, padding at the bottom/right with 0 (image) and 255 (label)."""
    h = max(label.shape[0] for _, label in batch)
    w = max(label.shape[1] for _, label in batch)
    images = torch.zeros(len(batch), batch[0][0].shape[0], h, w, dtype=batch[0][0].dtype)
    labels = torch.full((len(batch), h, w), IGNORE_INDEX, dtype=torch.int64)
    for i, (image, label) in enumerate(batch):
        images[i, :, :label.shape[0], :label.shape[1]] = image
        labels[i, :label.shape[0], :label.shape[1]] = label
    return images, labels


def sample_seed(seed, epoch, index):
    """A 32-bit seed for one sample's augmentation, from (--seed, epoch, dataset index) only."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class TrainSampler(DistributedSampler):
    """DistributedSampler that yields (index, augmentation seed) and can start part-way through an epoch.

    The seed depends on the sample and the epoch, not on the rank, the worker or what came before, so a run
    resumed mid-epoch (set_epoch(epoch, start_batch)) draws exactly the augmentation it would have drawn.
    """

    def __init__(self, dataset, world_size, rank, seed, batch_size):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.start = batch_size, 0

    def set_epoch(self, epoch, start_batch=0):
        super().set_epoch(epoch)
        self.start = start_batch * self.batch_size

    def __iter__(self):
        for index in itertools.islice(super().__iter__(), self.start, None):
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self):
        return max(0, self.num_samples - self.start)


class SeededSamples(Dataset):
    """Wraps a dataset for TrainSampler: item (index, seed) seeds numpy, random and torch, then loads the sample,
    so any transform that draws from the global generators (ours, or a plugin's) is reproducible per sample."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        np.random.seed(seed)
        random.seed(seed)
        torch.manual_seed(seed)
        return self.dataset[index]


def build_train_loader(dataset, batch_size, workers, rank, world_size, seed, drop_last=True):
    """(loader, sampler) with a shuffling TrainSampler; call sampler.set_epoch(epoch[, start_batch]) every epoch."""
    per_rank = -(-len(dataset) // world_size)
    if drop_last and per_rank < batch_size:
        raise UserError(f"training split has {len(dataset)} images, {per_rank} per process over {world_size} "
                        f"process(es), fewer than batch_size={batch_size}; expected at least one full batch")
    sampler = TrainSampler(dataset, world_size, rank, seed, batch_size)
    return make_loader(SeededSamples(dataset), batch_size, workers, sampler, drop_last), sampler


def build_eval_loader(dataset, batch_size, workers, rank, world_size):
    """Loader over this rank's ShardSampler shard; batches of mixed sizes are padded (label 255)."""
    return make_loader(dataset, batch_size, workers, ShardSampler(len(dataset), rank, world_size), False, pad_collate)


# ---------------------------------------------------------------------------------------------
# Palette PNGs, the format of VOC labels and of our predictions.

def voc_palette():
    """256x3 uint8 VOC colour map: bits of the class index are spread over the high bits of R, G and B."""
    palette = np.zeros((256, 3), np.uint8)
    for index in range(256):
        c, rgb = index, [0, 0, 0]
        for bit in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << bit
            c >>= 3
        palette[index] = rgb
    return palette


VOC_PALETTE = voc_palette()


VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def class_names(root, numclasses):
    """Names from the built-in data's manifest, or VOC's for 21 classes; otherwise 'class N'."""
    manifest = os.path.join(root, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            names = json.load(f).get("classes", [])
        if len(names) == numclasses:
            return list(names)
    if numclasses == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    return [f"class {i}" for i in range(numclasses)]


def save_palette_png(path, mask):
    """Write a uint8 HxW class-index mask as a palette PNG with the VOC colours."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"save_palette_png('{path}'): expected a uint8 HxW mask, got {mask.dtype} {mask.shape}")
    image = Image.fromarray(mask, "P")
    image.putpalette(VOC_PALETTE.tobytes())
    image.save(path)
