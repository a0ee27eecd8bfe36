"""data.transforms.TrainTransform (normalising straight into CHW, flipping by reversed copies) gives, for the same numpy
seed, exactly the tensors of its earlier implementation (HWC float, flip view, transpose copy), kept here verbatim."""
import cv2
import numpy as np
import pytest
import torch

from data.readers import read_image, read_label
from data.transforms import TrainTransform
from data.voc import _read_list, _sample_paths
from utils import IGNORE_INDEX


def reference(t, image, label):
    """TrainTransform.__call__ as of commit 79767d3, unchanged but for `self` -> `t`."""
    maps = label if isinstance(label, dict) else {"label": label}
    weights = t.weight_maps
    scale = np.random.uniform(*t.scale_range)
    h, w = next(iter(maps.values())).shape
    if scale != 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        maps = {key: cv2.resize(m, size, interpolation=cv2.INTER_LINEAR if key in weights
                                else cv2.INTER_NEAREST_EXACT) for key, m in maps.items()}
        h, w = size[1], size[0]
    y0 = np.random.randint(min(0, h - t.crop_h), max(0, h - t.crop_h) + 1)
    x0 = np.random.randint(min(0, w - t.crop_w), max(0, w - t.crop_w) + 1)
    sy, sx = slice(max(y0, 0), min(y0 + t.crop_h, h)), slice(max(x0, 0), min(x0 + t.crop_w, w))
    dy, dx = slice(sy.start - y0, sy.stop - y0), slice(sx.start - x0, sx.stop - x0)
    out_image = np.zeros((t.crop_h, t.crop_w, 3), np.float32)
    out_image[dy, dx] = image[sy, sx].astype(np.float32) * t.scale + t.shift
    out = {}
    for key, m in maps.items():
        out[key] = np.full((t.crop_h, t.crop_w), 0 if key in weights else IGNORE_INDEX, np.uint8)
        out[key][dy, dx] = m[sy, sx]
    if np.random.random() < t.hflip_prob:
        out_image, out = out_image[:, ::-1], {key: m[:, ::-1] for key, m in out.items()}
    tensors = {key: torch.from_numpy(np.ascontiguousarray(m) if key in weights else m.astype(np.int64))
               for key, m in out.items()}
    return (torch.from_numpy(np.ascontiguousarray(out_image.transpose(2, 0, 1))),
            tensors if isinstance(label, dict) else tensors["label"])


def same(a, b):
    return (type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous()
            and b.is_contiguous() and torch.equal(a, b))


def random_samples(count, seed=0):
    """Images of odd, non-square sizes (smaller and larger than the crops) with labels using ignore too."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        h, w = rng.integers(5, 140, 2)
        label = rng.integers(0, 6, (h, w)).astype(np.uint8)
        label[rng.random((h, w)) < 0.1] = IGNORE_INDEX
        yield rng.integers(0, 256, (h, w, 3), dtype=np.uint8), label, rng.integers(0, 256, (h, w), dtype=np.uint8)


@pytest.mark.parametrize("crop, scale_range, hflip", [(96, (0.75, 1.5), 0.5), (64, (0.5, 2.0), 1.0),
                                                      ((40, 100), (0.3, 1.2), 0.0), (33, (1.0, 1.0), 0.5),
                                                      (160, (1.0, 1.0), 1.0)])
def test_train_transform_matches_reference(crop, scale_range, hflip):
    plain, scribble = TrainTransform(crop, scale_range, hflip), TrainTransform(crop, scale_range, hflip,
                                                                                weight_maps=("dist",))
    for k, (image, label, dist) in enumerate(random_samples(40, seed=sum(np.atleast_1d(crop)))):
        for transform, target in ((plain, label), (scribble, {"label": label, "dist": dist})):
            np.random.seed(k)
            new = transform(image, target)
            after_new = np.random.random()
            np.random.seed(k)
            old = reference(transform, image, target)
            assert np.random.random() == after_new, "the transform draws a different number of random numbers"
            assert same(new[0], old[0]), f"sample {k}: images differ"
            if isinstance(target, dict):
                assert new[1].keys() == old[1].keys() and all(same(new[1][key], old[1][key]) for key in target)
                assert new[1]["dist"].dtype == torch.uint8 and new[1]["label"].dtype == torch.int64
            else:
                assert same(new[1], old[1]), f"sample {k}: labels differ"


def test_train_transform_matches_reference_on_builtin_scenes(tiny_data):
    transform = TrainTransform(48, (0.5, 2.0), 0.5)
    for k, image_id in enumerate(_read_list(tiny_data, "train")):
        image_path, label_path = _sample_paths(tiny_data, image_id)
        image, label = read_image(image_path), read_label(label_path)
        for seed in range(4):
            np.random.seed(seed * 100 + k)
            new = transform(image, label)
            after_new = np.random.random()
            np.random.seed(seed * 100 + k)
            old = reference(transform, image, label)
            assert same(new[0], old[0]) and same(new[1], old[1]), f"{image_id} seed {seed}"
            assert np.random.random() == after_new, "the transform draws a different number of random numbers"
