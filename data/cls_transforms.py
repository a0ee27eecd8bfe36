"""Classification transforms with OpenCV: an RGB uint8 HxWx3 array in, a normalised float32 3xSxS tensor out.

Every random draw comes from numpy's global generator (`np.random`), which the suite seeds per sample, so a
resumed run redraws the same augmentation. Nothing here uses `random`, torch's generator or a private one.

TrainTransform runs, in this fixed order:
  1. random resized crop (or, with scale=None, a resize of the whole image) to image_size x image_size;
  2. horizontal flip, then vertical flip, each with its own probability;
  3. colour jitter, always in the order brightness, contrast, saturation, hue;
  4. normalisation, (x / 255 - mean) / std;
  5. rotation about the centre, on the normalised image; the corners it uncovers are 0, which is the mean
     colour after normalisation (a neutral value, like a network's zero padding), not black.
Resizing uses INTER_AREA when the source is at least as large as the target on both sides, else INTER_LINEAR.
"""
import math
import numbers

import cv2
import numpy as np
import torch

from utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_size(value, name):
    """A positive int (not a bool), else UserError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{name}={value!r} is not valid; expected a whole number of pixels >= 1")
    return int(value)


def _check_pair(value, name, low, high):
    """A (min, max) pair of numbers inside [low, high] with min <= max, else UserError."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"{name}={value!r} is not valid; expected two numbers (min, max)") from None
    if not (low <= a <= b <= high) or a <= 0:
        raise UserError(f"{name}={value!r} is not valid; expected 0 < min <= max <= {high:g}")
    return a, b


def _check_stats(mean, std):
    """Three means and three positive standard deviations, as float32 arrays."""
    try:
        mean, std = np.asarray(mean, np.float32).reshape(3), np.asarray(std, np.float32).reshape(3)
    except (TypeError, ValueError):
        raise UserError(f"mean={mean!r} std={std!r} are not valid; expected three numbers each (R, G, B)") from None
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
        raise UserError(f"std={tuple(std.tolist())} is not valid; expected three finite numbers > 0")
    return mean, std


def _check_image(image):
    """UserError unless `image` is a non-empty RGB uint8 HxWx3 numpy array."""
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            and image.shape[0] > 0 and image.shape[1] > 0):
        what = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise UserError(f"transform input is a {what}; expected an RGB uint8 HxWx3 numpy array (data.folder.read_rgb)")


def resize(image, width, height):
    """Resize to width x height: INTER_AREA when shrinking on both sides, else INTER_LINEAR; same size: unchanged."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    interpolation = cv2.INTER_AREA if shrinks(h, w, height, width) else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def shrinks(height, width, new_height, new_width):
    """True when resizing height x width to new_height x new_width shrinks (or keeps) both sides: resize() then
    averages areas (INTER_AREA) rather than interpolating."""
    return width >= new_width and height >= new_height


def to_tensor(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """RGB uint8 HxWx3 -> float32 tensor 3xHxW, (x / 255 - mean) / std."""
    _check_image(image)
    mean, std = _check_stats(mean, std)
    return _chw_tensor(_normalise(image, mean, std))


def _normalise(image, mean, std):
    """RGB uint8 (or float 0..255) HxWx3 -> float32 HxWx3 normalised with checked mean/std arrays."""
    return (image.astype(np.float32) / 255.0 - mean) / std


def _chw_tensor(array):
    """float32 HxWx3 array -> contiguous 3xHxW tensor."""
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def random_crop_box(height, width, scale, ratio, tries=10, rng=np.random):
    """(top, left, h, w) of a crop covering a random fraction `scale` of the area with an aspect ratio (w/h) drawn
    log-uniformly from `ratio` (from `rng`); after `tries` misses, the centre crop with the aspect ratio nearest to
    `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(tries):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h + 1), rng.randint(0, width - w + 1), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, max(1, int(round(width / ratio[0])))
    elif aspect > ratio[1]:
        w, h = max(1, int(round(height * ratio[1]))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def color_jitter(image, brightness, contrast, saturation, hue):
    """Jitter an RGB uint8 image (brightness, contrast, saturation, then hue); returns float32 0..255.

    Factors are drawn uniformly from [1 - x, 1 + x]; the hue shift from [-hue, hue] turns of the colour circle.
    A component that is 0 draws nothing."""
    x = image.astype(np.float32) / 255.0
    if brightness > 0:
        x = np.clip(x * np.random.uniform(1 - brightness, 1 + brightness), 0, 1)
    if contrast > 0:
        grey_mean = float(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).mean())
        x = np.clip((x - grey_mean) * np.random.uniform(1 - contrast, 1 + contrast) + grey_mean, 0, 1)
    if saturation > 0:
        grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None]
        x = np.clip((x - grey) * np.random.uniform(1 - saturation, 1 + saturation) + grey, 0, 1)
    if hue > 0:
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # float input: H in degrees [0, 360)
        hsv[..., 0] = np.mod(hsv[..., 0] + 360.0 * np.random.uniform(-hue, hue), 360.0)
        x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return x * 255.0


class TrainTransform:
    """Training augmentation; see the module docstring for the order of the steps."""

    def __init__(self, image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip_prob=0.5, vflip_prob=0.0,
                 rotation=0.0, color_jitter=(0, 0, 0, 0), mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size = _check_size(image_size, "image_size")
        self.scale = None if scale is None else _check_pair(scale, "scale", 0.0, 1.0)
        self.ratio = _check_pair(ratio, "ratio", 0.0, math.inf)
        for name, p in (("hflip_prob", hflip_prob), ("vflip_prob", vflip_prob)):
            if not isinstance(p, numbers.Real) or not 0 <= p <= 1:
                raise UserError(f"{name}={p!r} is not valid; expected a probability in [0, 1]")
        self.hflip_prob, self.vflip_prob = float(hflip_prob), float(vflip_prob)
        if not isinstance(rotation, numbers.Real) or not 0 <= rotation <= 180:
            raise UserError(f"rotation={rotation!r} is not valid; expected degrees in [0, 180]")
        self.rotation = float(rotation)
        self.jitter = self._check_jitter(color_jitter)
        self.mean, self.std = _check_stats(mean, std)

    @staticmethod
    def _check_jitter(jitter):
        """(brightness, contrast, saturation, hue): the first three in [0, 1], hue in [0, 0.5]."""
        try:
            values = tuple(float(v) for v in jitter)
        except (TypeError, ValueError):
            values = ()
        if len(values) != 4 or not all(0 <= v <= 1 for v in values[:3]) or not 0 <= values[3] <= 0.5:
            raise UserError(f"color_jitter={jitter!r} is not valid; expected (brightness, contrast, saturation, hue)"
                            f" with the first three in [0, 1] and hue in [0, 0.5]")
        return values

    def draw(self, height, width, rng=np.random):
        """(top, left, h, w) of the crop and the horizontal flip of one image, drawn from `rng` in this order (the
        first of the draws of __call__); data/dali_tasks.py draws them from a sample's seed the same way."""
        box = (0, 0, height, width) if self.scale is None else random_crop_box(height, width, self.scale, self.ratio,
                                                                              rng=rng)
        return (*box, self.hflip_prob > 0 and rng.random() < self.hflip_prob)

    def __call__(self, image):
        """RGB uint8 HxWx3 -> augmented, normalised float32 tensor 3xSxS."""
        _check_image(image)
        top, left, h, w, flip = self.draw(*image.shape[:2])
        image = resize(image[top:top + h, left:left + w], self.size, self.size)
        if flip:
            image = image[:, ::-1]
        if self.vflip_prob > 0 and np.random.random() < self.vflip_prob:
            image = image[::-1]
        if any(self.jitter):
            image = color_jitter(np.ascontiguousarray(image), *self.jitter)
        x = _normalise(image, self.mean, self.std)
        if self.rotation > 0:
            x = self._rotate(x, np.random.uniform(-self.rotation, self.rotation))
        return _chw_tensor(x)

    def _rotate(self, x, angle):
        """Rotate a normalised HxWx3 float image by `angle` degrees about its centre; uncovered pixels are 0."""
        h, w = x.shape[:2]
        matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, 1.0)
        return cv2.warpAffine(np.ascontiguousarray(x), matrix, (w, h), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(0.0, 0.0, 0.0))


class EvalTransform:
    """Resize the shorter side to `resize` (default image_size) keeping the aspect ratio, centre-crop
    image_size x image_size, normalise. No randomness."""

    def __init__(self, image_size, resize=None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size = _check_size(image_size, "image_size")
        self.resize = self.size if resize is None else _check_size(resize, "resize")
        if self.resize < self.size:
            raise UserError(f"resize={resize} is smaller than image_size={image_size}; expected resize >= image_size "
                            f"(the shorter side is resized, then the centre is cropped)")
        self.mean, self.std = _check_stats(mean, std)

    def geometry(self, height, width):
        """(height, width) after the resize and (top, left) of the centre crop, for an image of height x width."""
        if height <= width:
            new_h, new_w = self.resize, max(self.resize, int(round(width * self.resize / height)))
        else:
            new_h, new_w = max(self.resize, int(round(height * self.resize / width))), self.resize
        return new_h, new_w, (new_h - self.size) // 2, (new_w - self.size) // 2

    def __call__(self, image):
        """RGB uint8 HxWx3 -> normalised float32 tensor 3xSxS."""
        _check_image(image)
        new_h, new_w, top, left = self.geometry(*image.shape[:2])
        image = resize(image, new_w, new_h)
        image = image[top:top + self.size, left:left + self.size]
        return _chw_tensor(_normalise(image, self.mean, self.std))
