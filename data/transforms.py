"""Joint image+label transforms for segmentation, with OpenCV and numpy."""
import cv2
import numpy as np
import torch

from data.readers import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale, self.shift = _normalize_coefficients(mean, std)

    def draw(self, height, width, rng=np.random):
        """(height and width after the random scale, crop top, crop left, flip) of one sample, drawn from `rng` in
        this order; data/dali.py draws them from a sample's seed the same way."""
        scale = rng.uniform(*self.scale_range)
        if scale != 1.0:
            height, width = max(1, round(height * scale)), max(1, round(width * scale))
        # The crop window may stick out of a small image; sticking out is padding, on a random side.
        y0 = rng.randint(min(0, height - self.crop_h), max(0, height - self.crop_h) + 1)
        x0 = rng.randint(min(0, width - self.crop_w), max(0, width - self.crop_w) + 1)
        return height, width, y0, x0, rng.random() < self.hflip_prob

    def __call__(self, image, label):
        """label: uint8 HxW, or a dict of such maps that all get the same geometry. A map named in
        the constructor's `weight_maps` is a weight: bilinear resizing, padded with 0 (no
        weight) and is returned as uint8; every other map is a label: nearest resizing, padded with 255."""
        maps = label if isinstance(label, dict) else {"label": label}
        weights = self.weight_maps
        h, w, y0, x0, flip = self.draw(*next(iter(maps.values())).shape)
        if (h, w) != image.shape[:2]:
            size = (w, h)
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
            # NEAREST_EXACT samples at pixel centres like INTER_LINEAR; plain NEAREST is off by half a pixel
            maps = {key: cv2.resize(m, size, interpolation=cv2.INTER_LINEAR if key in weights
                                    else cv2.INTER_NEAREST_EXACT) for key, m in maps.items()}
        ch, cw = self.crop_h, self.crop_w
        sy, sx = slice(max(y0, 0), min(y0 + ch, h)), slice(max(x0, 0), min(x0 + cw, w))
        dy, dx = slice(sy.start - y0, sy.stop - y0), slice(sx.start - x0, sx.stop - x0)
        if flip:  # flip by copying the source columns in reverse order into the mirrored destination columns
            dx, sx = slice(cw - dx.stop, cw - dx.start), slice(sx.stop - 1, sx.start - 1 if sx.start else None, -1)
        # Normalise straight into the CHW output: no HWC float copy, no flip copy, no transpose copy.
        out_image = np.zeros((3, ch, cw), np.float32)     # 0 is the mean after normalising
        window = out_image[:, dy, dx]
        np.multiply(image[sy, sx].transpose(2, 0, 1), self.scale[:, None, None], out=window)
        window += self.shift[:, None, None]
        tensors = {}
        for key, m in maps.items():
            weight = key in weights
            out = np.full((ch, cw), 0 if weight else IGNORE_INDEX, np.uint8 if weight else np.int64)
            out[dy, dx] = m[sy, sx]
            tensors[key] = torch.from_numpy(out)
        return torch.from_numpy(out_image), tensors if isinstance(label, dict) else tensors["label"]


class EvalTransform:
    """Normalise only, at the original size."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean, self.std = mean, std

    def __call__(self, image, label):
        return to_normalized_tensor(image, self.mean, self.std), torch.from_numpy(label.astype(np.int64))
