import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform

from data.readers import VOC_PALETTE, read_label, save_palette_png

from data.voc import SegmentationDataset, check_dataset

from data.loaders import ShardSampler, build_eval_loader, build_train_loader
from data.synthetic import SYNTHETIC_CLASSES, ensure_builtin_dataset, make_synthetic_voc
from utils import UserError

NUMCLASSES = len(SYNTHETIC_CLASSES)


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def labels_of(root):
    folder = os.path.join(root, "SegmentationClass")
    return [read_label(os.path.join(folder, name)) for name in sorted(os.listdir(folder))]


@pytest.fixture
def voc(tmp_path):
    """A tiny valid dataset: 4 train and 2 val images of 48x48."""
    return make_synthetic_voc(str(tmp_path / "voc"), n_train=4, n_val=2, size=48)


# --- built-in data -----------------------------------------------------------------------------

def test_generator_is_byte_identical_for_the_same_seed(tmp_path):
    a = make_synthetic_voc(str(tmp_path / "a"), n_train=6, n_val=3, size=64, seed=3)
    b = make_synthetic_voc(str(tmp_path / "b"), n_train=6, n_val=3, size=64, seed=3)
    files = all_files(a)
    assert files == all_files(b) and len(files) == 6 * 9 + 3
    for name in files:
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name
    with Image.open(os.path.join(a, "SegmentationClass", "syn_000000.png")) as im:
        assert im.mode == "P"


def test_generated_labels_hold_every_class_and_only_valid_values(tmp_path):
    root = make_synthetic_voc(str(tmp_path / "d"), n_train=30, n_val=10, size=64)
    values = set(np.unique(np.concatenate([lab.ravel() for lab in labels_of(root)])).tolist())
    assert values == set(range(NUMCLASSES)) | {255}
    assert len(check_dataset(root, "train", NUMCLASSES)) == 30 and len(check_dataset(root, "val", NUMCLASSES)) == 10


def test_dot_and_grid_textures_differ_whichever_colour_is_which():
    """The share of a texture's first colour, folded so that swapping the two colours gives the same number: dots and
    grid must be far apart (in version 2 they were 0.28 and 0.44), at any period, tilt and offset."""
    from data.synthetic import _texture
    rng = np.random.default_rng(0)
    for _ in range(20):
        period, t = rng.uniform(5.0, 9.0), rng.uniform(-0.3, 0.3)
        yy, xx = np.mgrid[0:256, 0:256].astype(np.float32) - rng.uniform(0, 256, 2)[:, None, None]
        u, v = xx * np.cos(t) + yy * np.sin(t), yy * np.cos(t) - xx * np.sin(t)
        dots, grid = (min(f, 1 - f) for f in (_texture(c, u, v, period).mean() for c in (3, 4)))
        assert dots < 0.2 and grid > 0.4, (period, dots, grid)


def test_object_shapes_cover_comparable_areas():
    """Each object class's mean area at one extent is at least 0.6 of the largest. In version 3 a triangle inscribed
    in the extent's circle covered 0.41 of a box's area, and dotted_triangle was the class the default run learned last."""
    from data.synthetic import _shape_mask
    rng = np.random.default_rng(0)
    areas = [np.mean([_shape_mask(cls, rng, 256, 128.0, 128.0, 100.0, rng.uniform(0, 2 * np.pi)).sum()
                      for _ in range(50)]) for cls in range(1, NUMCLASSES)]
    assert min(areas) >= 0.6 * max(areas), dict(zip(SYNTHETIC_CLASSES[1:], areas))


def test_ignore_width_zero_gives_no_ignore_pixels(tmp_path):
    root = make_synthetic_voc(str(tmp_path / "d"), n_train=6, n_val=2, size=64, ignore_width=0)
    assert all((lab != 255).all() for lab in labels_of(root))


def test_ensure_builtin_dataset_regenerates_only_when_incomplete(tmp_path):
    cache = str(tmp_path / "cache")
    small = dict(n_train=4, n_val=2, size=48)
    root = ensure_builtin_dataset(cache, **small)
    assert os.path.basename(root).startswith("synthetic-v") and os.listdir(cache) == [os.path.basename(root)]
    manifest = os.path.join(root, "manifest.json")
    os.utime(manifest, (1, 1))
    assert ensure_builtin_dataset(cache, **small) == root and os.path.getmtime(manifest) == 1

    label = os.path.join(root, "SegmentationClass", "syn_000003.png")
    os.remove(label)
    assert ensure_builtin_dataset(cache, **small) == root
    assert os.path.isfile(label) and os.path.getmtime(manifest) != 1

    os.remove(manifest)
    ensure_builtin_dataset(cache, **small)
    assert os.path.isfile(manifest)

    os.utime(manifest, (1, 1))
    ensure_builtin_dataset(cache, n_train=5, n_val=2, size=48)       # different settings: manifest mismatch
    assert os.path.getmtime(manifest) != 1 and len(check_dataset(root, "train", NUMCLASSES)) == 5
    assert os.listdir(cache) == [os.path.basename(root)]              # no temporary folders left behind


def test_ensure_builtin_dataset_survives_a_race(tmp_path):
    cache = str(tmp_path / "cache")
    with ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("fork")) as pool:
        roots = list(pool.map(ensure_builtin_dataset, [cache] * 3, [20] * 3, [4] * 3, [64] * 3))
    assert len(set(roots)) == 1 and os.listdir(cache) == [os.path.basename(roots[0])]
    assert len(check_dataset(roots[0], "train", NUMCLASSES)) == 20


# --- transforms --------------------------------------------------------------------------------

def block_scene(rng, size=128, block=16):
    """Label made of constant blocks, and an image whose grey level encodes the label (value * 12)."""
    cells = rng.integers(0, 21, (size // block, size // block)).astype(np.uint8)
    label = np.kron(cells, np.ones((block, block), np.uint8))
    return np.repeat((label * 12)[:, :, None], 3, axis=2), label


def unnormalize(image):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image * std + mean) * 255).numpy()


def test_train_transform_keeps_image_and_label_aligned():
    np.random.seed(0)
    rng = np.random.default_rng(0)
    transform = TrainTransform(96, scale_range=(0.5, 2.0), hflip_prob=0.5)
    padded = 0
    for _ in range(60):
        image, label = transform(*block_scene(rng))
        assert image.shape == (3, 96, 96) and image.dtype == torch.float32
        assert label.shape == (96, 96) and label.dtype == torch.int64
        lab = label.numpy()
        pad = lab == 255
        padded += pad.any()
        assert (image[:, torch.from_numpy(pad)] == 0).all()                  # image pad is the mean colour
        # Away from block borders (also those just outside the crop), linear and nearest interpolation agree.
        kernel = np.ones((3, 3), np.uint8)
        inner = (cv2.erode(lab.astype(np.uint8), kernel) == cv2.dilate(lab.astype(np.uint8), kernel)) & ~pad
        inner[[0, -1], :] = inner[:, [0, -1]] = False
        assert inner.sum() > 0.4 * (~pad).sum()
        grey = unnormalize(image)
        assert np.abs(grey[:, inner] - lab[inner] * 12.0).max() < 0.5
    assert padded > 5


def test_train_transform_without_randomness_is_exact():
    rng = np.random.default_rng(1)
    image, label = block_scene(rng, size=64, block=8)
    image = image + rng.integers(0, 9, image.shape).astype(np.uint8)
    fixed = TrainTransform(64, scale_range=(1.0, 1.0), hflip_prob=0.0)
    reference = EvalTransform()(image, label)
    for _ in range(5):
        out = fixed(image, label)
        assert torch.allclose(out[0], reference[0], atol=1e-6) and torch.equal(out[1], reference[1])
    flipped = TrainTransform(64, scale_range=(1.0, 1.0), hflip_prob=1.0)(image, label)
    assert torch.equal(flipped[1], reference[1].flip(-1))
    assert torch.allclose(flipped[0], reference[0].flip(-1), atol=1e-6)


def test_eval_transform_keeps_the_original_size():
    image, label = np.zeros((37, 53, 3), np.uint8), np.ones((37, 53), np.uint8)
    out_image, out_label = EvalTransform()(image, label)
    assert out_image.shape == (3, 37, 53) and out_label.shape == (37, 53) and out_label.dtype == torch.int64


# --- samplers and loaders ----------------------------------------------------------------------

@pytest.mark.parametrize("n", [7, 10])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shard_sampler_covers_every_index_once(n, world_size):
    shards = [list(ShardSampler(n, rank, world_size)) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert [len(ShardSampler(n, r, world_size)) for r in range(world_size)] == [len(s) for s in shards]


def test_loaders_on_a_dataset(voc):
    train = SegmentationDataset(voc, "train", TrainTransform(32), numclasses=NUMCLASSES)
    loader, sampler = build_train_loader(train, batch_size=2, workers=0, rank=0, world_size=1, seed=0)
    assert isinstance(sampler, DistributedSampler)
    sampler.set_epoch(0)
    images, labels = next(iter(loader))
    assert images.shape == (2, 3, 32, 32) and labels.shape == (2, 32, 32)
    with pytest.raises(UserError, match="batch_size=8"):
        build_train_loader(train, batch_size=8, workers=0, rank=0, world_size=1, seed=0)

    val = SegmentationDataset(voc, "val", EvalTransform(), numclasses=NUMCLASSES)
    seen = sum(len(lab) for rank in range(3) for _, lab in build_eval_loader(val, 2, 0, rank, 3))
    assert seen == len(val) == 2


class RandomDraws(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.tensor([np.random.randint(2 ** 31), torch.utils.data.get_worker_info().id])


def test_loader_workers_have_their_own_random_streams():
    loader, _ = build_train_loader(RandomDraws(), batch_size=1, workers=2, rank=0, world_size=1, seed=0)
    draws = torch.cat(list(loader))
    assert set(draws[:, 1].tolist()) == {0, 1}
    assert len(set(draws[:, 0].tolist())) == len(draws)


def test_palette_png_round_trip(tmp_path):
    mask = np.array([[0, 1, 2], [3, 4, 255]], np.uint8)
    path = str(tmp_path / "m.png")
    save_palette_png(path, mask)
    with Image.open(path) as im:
        assert im.mode == "P" and im.convert("RGB").getpixel((1, 0)) == (128, 0, 0)
    assert np.array_equal(read_label(path), mask)
    assert VOC_PALETTE.shape == (256, 3) and VOC_PALETTE[255].tolist() == [224, 224, 192]


# --- bad inputs: one clear UserError each ------------------------------------------------------

def test_missing_dataset_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(UserError, match="does not exist") as err:
        SegmentationDataset(missing, "train")
    assert missing in str(err.value) and "JPEGImages/" in str(err.value)


def test_missing_list_file(voc):
    with pytest.raises(UserError, match="test.txt") as err:
        SegmentationDataset(voc, "test")
    assert "splits found: train, val" in str(err.value)


def test_empty_list_file(voc):
    open(os.path.join(voc, "ImageSets", "Segmentation", "train.txt"), "w").write("\n\n")
    with pytest.raises(UserError, match="is empty"):
        SegmentationDataset(voc, "train")


def test_id_without_image(voc):
    with open(os.path.join(voc, "ImageSets", "Segmentation", "train.txt"), "a") as f:
        f.write("ghost\n")
    with pytest.raises(UserError, match="'ghost'") as err:
        SegmentationDataset(voc, "train")
    assert os.path.join(voc, "JPEGImages", "ghost.jpg") in str(err.value)


def test_id_without_label(voc):
    label = os.path.join(voc, "SegmentationClass", "syn_000001.png")
    os.remove(label)
    with pytest.raises(UserError, match="'syn_000001'") as err:
        check_dataset(voc, "train", NUMCLASSES, full=False)
    assert label in str(err.value)


def test_image_and_label_of_different_size(voc):
    save_palette_png(os.path.join(voc, "SegmentationClass", "syn_000002.png"), np.zeros((40, 48), np.uint8))
    with pytest.raises(UserError, match=r"'syn_000002'.*48x48.*48x40"):
        check_dataset(voc, "train", NUMCLASSES)
    dataset = SegmentationDataset(voc, "train")                # content checks skipped: __getitem__ still stops
    with pytest.raises(UserError, match="differ in size"):
        dataset[2]


def test_label_value_out_of_range(voc):
    label = os.path.join(voc, "SegmentationClass", "syn_000004.png")
    save_palette_png(label, np.full((48, 48), 7, np.uint8))
    with pytest.raises(UserError, match=r"value 7.*numclasses=5") as err:
        check_dataset(voc, "val", NUMCLASSES)
    assert label in str(err.value)
    check_dataset(voc, "val", 8)                                # 7 is fine with 8 classes


def test_rgb_label(voc):
    label = os.path.join(voc, "SegmentationClass", "syn_000000.png")
    Image.new("RGB", (48, 48), (128, 0, 0)).save(label)
    with pytest.raises(UserError, match="image mode RGB") as err:
        check_dataset(voc, "train", NUMCLASSES)
    assert label in str(err.value)


def test_corrupt_image(voc):
    image = os.path.join(voc, "JPEGImages", "syn_000005.jpg")
    open(image, "wb").write(b"this is not a jpeg")
    with pytest.raises(UserError, match="cannot read image") as err:
        check_dataset(voc, "val", NUMCLASSES)
    assert image in str(err.value)
