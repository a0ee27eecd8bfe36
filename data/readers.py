"""Reading images and label maps, and writing palette PNGs.

Images are read with OpenCV (BGR converted to RGB); labels are PNGs of class indices read with PIL,
because OpenCV expands a palette PNG to colours. 255 in a label means "ignore".
"""
import json
import os

import cv2
import numpy as np
from PIL import Image

from utils import IGNORE_INDEX, UserError


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
