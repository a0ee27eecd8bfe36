"""What the DALI loader (data/dali.py) does differently per task: which files it reads, what each sample's
external_source row carries (its augmentation, drawn from the suite's per-sample seed), and the DALI ops that turn
a decoded image into the network input and its target, so that the batches equal the OpenCV loader's.

A spec's `columns(index, seed)` are the values of one sample after its index; `graph(...)` builds the ops from the
decoded image, the reader's label and those columns, and returns (image float CHW, target). Per-sample arguments
(sizes, windows, flips) stay CPU inputs, as DALI wants, also when the images are on the GPU.
"""
import numpy as np

from data import cls_transforms, transforms
from data.folder import ClassificationDataset, image_shape
from data.readers import IGNORE_INDEX, read_label
from utils import UserError

# Classification augmentation that the DALI pipeline does not reproduce: (flag, TrainTransform attribute, what).
UNSUPPORTED = (("--vflip_prob", "vflip_prob", "vertical flips"), ("--rotation", "rotation", "rotation"),
               ("--color_jitter", "jitter", "colour jitter"))


def check_augmentation(values):
    """UserError naming the first flag in UNSUPPORTED whose value in `values` (attribute -> value) augments."""
    for flag, attribute, what in UNSUPPORTED:
        value = values.get(attribute, 0)
        if np.any(np.asarray(value, float) != 0):
            shown = " ".join(f"{v:g}" for v in value) if np.ndim(value) else f"{value:g}"
            raise UserError(f"{flag} {shown}: --loader dali does not reproduce {what}; set {flag} to 0 or use "
                            f"--loader opencv")


def spec_for(dataset, train, types):
    """The task spec of `dataset` (`types`: nvidia.dali.types); UserError when the DALI path cannot read it as the
    OpenCV loader would."""
    if isinstance(dataset, ClassificationDataset):
        return ClassificationSpec(dataset, train, types)
    return SegmentationSpec(dataset, train)


class SegmentationSpec:
    """VOC layout: JPEGImages/<id>.jpg through DALI; the palette masks through read_label (PIL) in the external
    source, because DALI's decoders expand a palette to colours (GRAY would be the colour's luminance, not the
    class). Scale, crop, pad and flip run in DALI, identically on image and mask."""

    def __init__(self, dataset, train):
        transform = transforms.TrainTransform if train else transforms.EvalTransform
        if not (hasattr(dataset, "root") and hasattr(dataset, "ids") and not getattr(dataset, "maps", None)
                and type(dataset.transform) is transform):
            raise UserError(f"--loader dali supports VOC-layout segmentation data (--dataset voc, or the built-in "
                            f"scenes) and image-folder classification data with the suite's own transforms; got "
                            f"{type(dataset).__name__}; use --loader opencv")
        self.dataset, self.train, self.transform = dataset, train, dataset.transform
        self.layouts = ["HWC"] + [None] * (5 if train else 0)

    def _paths(self, index):
        root, image_id = self.dataset.root, self.dataset.ids[index]
        return f"{root}/JPEGImages/{image_id}.jpg", f"{root}/SegmentationClass/{image_id}.png"

    def path(self, index):
        return self._paths(index)[0]

    def reader_label(self, index):
        return index  # the mask comes from the external source; the reader's label checks the two are in step

    def columns(self, index, seed):
        mask = read_label(self._paths(index)[1])
        if not self.train:
            return [mask[..., None]]
        t = self.transform
        h, w, y0, x0, flip = t.draw(*mask.shape, np.random.RandomState(seed))
        return [mask[..., None], np.float32(h), np.float32(w), np.array([y0, x0], np.int32),
                np.array([t.crop_h, t.crop_w], np.int32), np.int32(flip)]

    def graph(self, fn, types, image, label, columns, gpu):
        mask = columns[0].gpu() if gpu else columns[0]
        if self.train:
            out_h, out_w, start, shape, flip = columns[1:]
            # bilinear without antialiasing and nearest at pixel centres: cv2's INTER_LINEAR and
            # INTER_NEAREST_EXACT, as TrainTransform resizes
            image = fn.resize(image, resize_y=out_h, resize_x=out_w, interp_type=types.INTERP_LINEAR,
                              antialias=False)
            mask = fn.resize(mask, resize_y=out_h, resize_x=out_w, interp_type=types.INTERP_NN, antialias=False)
        image = normalize(fn, types, image, self.transform)
        if self.train:
            # a window that sticks out of the image is padding: 0 (the mean) for the image, ignore for the mask
            image = fn.slice(image, start=start, shape=shape, axis_names="HW", out_of_bounds_policy="pad",
                             fill_values=0.0)
            mask = fn.slice(mask, start=start, shape=shape, axis_names="HW", out_of_bounds_policy="pad",
                            fill_values=float(IGNORE_INDEX))
            image, mask = fn.flip(image, horizontal=flip), fn.flip(mask, horizontal=flip)
        else:  # images of one batch may differ in size: pad at the bottom/right, like pad_collate
            image = fn.pad(image, axis_names="HW", fill_value=0.0)
            mask = fn.pad(mask, axis_names="HW", fill_value=float(IGNORE_INDEX))
        return image, mask


class ClassificationSpec:
    """Image-folder, split or list-file samples: fn.readers.file with the class labels, then the geometry of
    data/cls_transforms.py: train, the random resized crop box and horizontal flip of TrainTransform.draw; eval,
    EvalTransform's resize of the shorter side and centre crop. The box needs each image's size before DALI decodes
    it: it comes from the file's header (PIL), read once per image and kept."""

    def __init__(self, dataset, train, types):
        transform = cls_transforms.TrainTransform if train else cls_transforms.EvalTransform
        if type(dataset.transform) is not transform:
            raise UserError(f"--loader dali supports classification data with the suite's own transforms; this "
                            f"dataset's is {type(dataset.transform).__name__}; use --loader opencv")
        if train:
            check_augmentation(vars(dataset.transform))
        self.dataset, self.train, self.transform = dataset, train, dataset.transform
        self.layouts = [None] * (5 if train else 3)
        self.shapes = {}
        self.filters = int(types.INTERP_LINEAR), int(types.INTERP_GAUSSIAN)

    def path(self, index):
        return self.dataset.paths[index]

    def reader_label(self, index):
        return self.dataset.labels[index]

    def shape(self, index):
        if index not in self.shapes:
            self.shapes[index] = image_shape(self.dataset.paths[index])
        return self.shapes[index]

    def drawn(self, index, seed):
        """(top, left, h, w, flip) of the sample, and the generator after its draws, where the OpenCV loader's
        collate finds np.random (SeededSamples seeds it with `seed`, then the transform draws)."""
        rng = np.random.RandomState(seed)
        return self.transform.draw(*self.shape(index), rng), rng

    def columns(self, index, seed):
        height, width = self.shape(index)
        if not self.train:
            new_h, new_w, top, left = self.transform.geometry(height, width)
            return [np.array([new_h, new_w], np.float32), np.array([top, left], np.int32),
                    self.min_filter(height, width, new_h, new_w)]
        (top, left, h, w, flip), _ = self.drawn(index, seed)
        size = self.transform.size
        linear = not cls_transforms.shrinks(h, w, size, size)
        return [np.array([top, left], np.int32), np.array([h, w], np.int32), np.int32(flip),
                self.min_filter(h, w, size, size), np.uint8(linear)]

    def min_filter(self, height, width, new_height, new_width):
        """DALI's filter closest to cv2's INTER_AREA at this scale (measured on a photo and on noise): bilinear
        (antialiased) down to 3/4 of the size, an antialiased Gaussian below that."""
        scale = min(new_height / height, new_width / width)
        return np.int32(self.filters[0] if scale > 0.75 else self.filters[1])

    def graph(self, fn, types, image, label, columns, gpu):
        size = self.transform.size
        if self.train:
            start, box, flip, min_filter, linear = columns
            image = fn.slice(image, start=start, shape=box, axis_names="HW")
            image = resize(fn, types, image, [size, size], min_filter, linear.gpu() if gpu else linear)
        else:
            new_size, start, min_filter = columns
            image = resize(fn, types, image, new_size, min_filter)
            image = fn.slice(image, start=start, shape=[size, size], axis_names="HW")
        return normalize(fn, types, image, self.transform, flip if self.train else None), label


def resize(fn, types, image, size, min_filter, linear=None):
    """cls_transforms.resize in DALI. cv2 averages areas (INTER_AREA) when both sides shrink: DALI has no box
    filter, and `min_filter` (per sample) is the one that comes closest at the sample's scale (within about 1 grey
    level on average on a photo, several on noise), so these images are close to the OpenCV loader's, not equal.
    Otherwise cv2 interpolates bilinearly without
    antialiasing, and so does DALI (the same up to rounding); the two differ only where one side shrinks and the
    other grows. antialias is one flag per operator, so for such samples both resizes run and `linear` (1 or 0 per
    sample) picks one. EvalTransform scales both sides alike, so eval passes no `linear`."""
    smooth = fn.resize(image, size=size, min_filter=fn.cast(min_filter, dtype=types.INTERP_TYPE),
                       mag_filter=types.INTERP_LINEAR, antialias=True)
    if linear is None:
        return smooth
    sharp = fn.resize(image, size=size, interp_type=types.INTERP_LINEAR, antialias=False)
    return fn.cast(smooth * (1 - linear) + sharp * linear, dtype=types.UINT8)


def normalize(fn, types, image, transform, flip=None):
    """(x / 255 - mean) / std as float CHW, the transform's mean and std; mirrored where `flip` is 1."""
    mirror = {} if flip is None else {"mirror": flip}
    return fn.crop_mirror_normalize(image, dtype=types.FLOAT, output_layout="CHW", **mirror,
                                    mean=[255 * m for m in transform.mean], std=[255 * s for s in transform.std])
