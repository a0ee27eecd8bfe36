"""Classification data: folder scanning, list files, stable stratified splits, image checks, the built-in digits
and the OpenCV transforms. Everything is built in tmp_path and runs in a few seconds on 2 CPU cores."""
import hashlib
import json
import os
import random
import re
import sys
import threading

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from data import digits
from data.cls_transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform
from data.folder import (IMAGE_EXTENSIONS, ClassificationDataset, check_images, check_val_classes, is_image_file,
                         read_list_file, read_rgb, read_split, scan_image_folder, stratified_split, write_split)
from utils import UserError

MEAN, STD = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)


def write_png(path, value=128, size=(6, 5)):
    """A small constant RGB PNG at `path` (folders created)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), np.full((*size, 3), value, np.uint8))


def raises_user_error(fn, *args, contains=(), **kw):
    """Call fn, expect a one-line UserError whose message contains every string in `contains`."""
    with pytest.raises(UserError) as info:
        fn(*args, **kw)
    message = str(info.value)
    assert "\n" not in message
    for text in contains:
        assert str(text) in message, message
    return message


# ---------------------------------------------------------------------------------------------------------------
# Folders and list files

def test_scan_finds_nested_and_upper_case_images_and_skips_hidden(tmp_path):
    for rel in ["cat/a.JPG", "cat/sub/deeper/b.png", "dog/C.PNG", "dog/d.webp.jpeg", ".hidden/x.png",
                "cat/.secret.png", "cat/.cache/e.png"]:
        write_png(tmp_path / rel)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "manifest.json").write_text("{}")
    classes, samples = scan_image_folder(str(tmp_path))
    assert classes == ["cat", "dog"]
    assert samples == [("cat/a.JPG", 0), ("cat/sub/deeper/b.png", 0), ("dog/C.PNG", 1), ("dog/d.webp.jpeg", 1)]
    assert all(is_image_file("X" + ext.upper()) for ext in IMAGE_EXTENSIONS)


def test_scan_errors_name_the_problem(tmp_path):
    raises_user_error(scan_image_folder, str(tmp_path / "nope"), contains=["nope", "does not exist"])
    (tmp_path / "readme.txt").write_text("x")
    raises_user_error(scan_image_folder, str(tmp_path), contains=[str(tmp_path), "no class folders"])
    (tmp_path / "cat").mkdir()
    (tmp_path / "empty").mkdir()
    raises_user_error(scan_image_folder, str(tmp_path), contains=[str(tmp_path), "no images"])
    write_png(tmp_path / "cat" / "a.png")
    raises_user_error(scan_image_folder, str(tmp_path), contains=[os.path.join(str(tmp_path), "empty")])


def test_list_file_with_class_names(tmp_path):
    write_png(tmp_path / "img" / "my photo 1.png")
    write_png(tmp_path / "img" / "b.png")
    lst = tmp_path / "train.txt"
    lst.write_text("# path label\n\nimg/my photo 1.png  zebra\nimg/b.png\tant\n")
    assert read_list_file(str(lst), str(tmp_path)) == (["ant", "zebra"], [("img/my photo 1.png", 1),
                                                                          ("img/b.png", 0)])
    classes, samples = read_list_file(str(lst), str(tmp_path), classes=["zebra", "ant", "cow"])
    assert classes == ["zebra", "ant", "cow"] and samples == [("img/my photo 1.png", 0), ("img/b.png", 1)]
    raises_user_error(read_list_file, str(lst), str(tmp_path), classes=["zebra"], contains=["line 4", "ant"])


def test_list_file_with_indices_and_errors(tmp_path):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png")
    lst = tmp_path / "list.txt"
    lst.write_text("a.png 0\nb.png 3\n")
    assert read_list_file(str(lst), str(tmp_path)) == (["0", "1", "2", "3"], [("a.png", 0), ("b.png", 3)])
    classes, _ = read_list_file(str(lst), str(tmp_path), classes=list("abcd"))
    assert classes == list("abcd")
    raises_user_error(read_list_file, str(lst), str(tmp_path), classes=["x", "y"], contains=["line 2", "'3'"])
    lst.write_text("a.png 0\n# comment\nmissing dir/c.png 1\n")
    raises_user_error(read_list_file, str(lst), str(tmp_path), contains=["line 3", "missing dir/c.png"])
    lst.write_text("a.png 0\nb.png 1\n./x\n")
    raises_user_error(read_list_file, str(lst), str(tmp_path), contains=["line 3", "./x", "no label"])
    lst.write_text("a.png 0\nb.png 1\na.png 1\n")
    raises_user_error(read_list_file, str(lst), str(tmp_path), contains=["line 3", "a.png", "line 1"])
    lst.write_text("# only a comment\n\n")
    raises_user_error(read_list_file, str(lst), str(tmp_path), contains=[str(lst)])
    raises_user_error(read_list_file, str(tmp_path / "none.txt"), str(tmp_path), contains=["none.txt"])


# ---------------------------------------------------------------------------------------------------------------
# Splits

def fake_samples(sizes):
    """Samples without files: class c has sizes[c] paths."""
    return [(f"c{c}/img_{i:03d}.jpg", c) for c, n in enumerate(sizes) for i in range(n)]


def assignment(splits):
    """{path: split name}."""
    return {rel: name for name, items in splits.items() for rel, _ in items}


def test_split_ignores_input_order_and_depends_on_seed():
    samples = fake_samples([40, 17, 9])
    split = stratified_split(samples, [0.7, 0.2, 0.1], seed=3)
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    assert stratified_split(shuffled, [0.7, 0.2, 0.1], seed=3) == split
    assert stratified_split(samples, [0.7, 0.2, 0.1], seed=4) != split
    assert all(items == sorted(items) for items in split.values())
    assert sorted(sum(split.values(), [])) == sorted(samples)


@pytest.mark.parametrize("ratios", [[0.8, 0.2], [0.7, 0.2, 0.1], [0.5, 0.25, 0.25]])
def test_split_is_stratified(ratios):
    sizes = [40, 17, 9, 3]
    split = stratified_split(fake_samples(sizes), ratios, seed=0)
    assert list(split) == ["train", "val", "test"][:len(ratios)]
    for c, n in enumerate(sizes):
        for (name, items), r in zip(split.items(), ratios):
            count = sum(label == c for _, label in items)
            assert count >= 1, (name, c)  # every class has >= 3 samples, enough for every split
            if n >= 9:
                assert abs(count - r * n) <= 1, (name, c, count, r * n)


def test_adding_a_file_changes_little():
    """Exact per-class counts make perfect stability impossible (the rounded counts shift by one as a class
    grows), but the only files that move are other files of the same class at a boundary, one per boundary."""
    samples = fake_samples([30, 12])
    ratios = [0.6, 0.2, 0.2]
    before = assignment(stratified_split(samples, ratios, seed=7))
    order = {"train": 0, "val": 1, "test": 2}
    unmoved = 0
    for k in range(40):
        new = (f"c0/new_{k}.jpg", 0)
        after = assignment(stratified_split(samples + [new], ratios, seed=7))
        assert new[0] in after
        moved = [rel for rel in before if after[rel] != before[rel]]
        assert all(rel.startswith("c0/") for rel in moved)
        assert len(moved) <= 2 and all(abs(order[after[r]] - order[before[r]]) == 1 for r in moved)
        unmoved += not moved
    assert unmoved >= 10  # most additions move nothing at all


def test_small_classes_and_bad_ratios():
    split = stratified_split(fake_samples([1, 2]), [0.2, 0.8], seed=0)
    assert [label for _, label in split["train"]] == [0, 1]  # a lone sample goes to train, even at ratio 0.2
    assert [label for _, label in split["val"]] == [1]
    for ratios in ([1.0], [0.5, 0.6], [1.2, -0.2], [0.25] * 4, [0.5, 0.5 - 1e-4], None, ["a", "b"]):
        raises_user_error(stratified_split, fake_samples([5]), ratios, 0, contains=["ratios"])


def test_split_file_round_trip(tmp_path):
    samples = fake_samples([6, 5])
    split = stratified_split(samples, [0.5, 0.5], seed=1)
    path = tmp_path / "sub" / "split.json"
    write_split(str(path), split, ["a", "b"], {"seed": 1, "source": "test"})
    assert read_split(str(path)) == (["a", "b"], split)
    data = json.loads(path.read_text())
    assert data["seed"] == 1 and data["source"] == "test" and data["splits"]["val"][0] == list(split["val"][0])
    assert os.listdir(path.parent) == ["split.json"]  # no temporary file left behind
    path.write_text('{"classes": ["a"], "splits": {"train": [["x.png"')
    raises_user_error(read_split, str(path), contains=[str(path)])
    path.write_text('{"classes": ["a"], "splits": {"train": [["x.png", 4]]}}')
    raises_user_error(read_split, str(path), contains=[str(path), "x.png"])


def test_val_class_missing_from_train():
    train, val = [("a.png", 0), ("b.png", 1)], [("c.png", 1), ("d.png", 2)]
    check_val_classes(train, val[:1], ["cat", "dog", "emu"], "split.json")
    raises_user_error(check_val_classes, train, val, ["cat", "dog", "emu"], "split.json",
                      contains=["'emu'", "split.json"])
    raises_user_error(check_val_classes, [], val, ["cat", "dog", "emu"], "x", contains=["2 class", "'dog', 'emu'"])


# ---------------------------------------------------------------------------------------------------------------
# Reading and checking images

def test_read_rgb_handles_image_modes(tmp_path):
    grey = np.array([[0, 7, 200, 255]], np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    assert np.array_equal(read_rgb(str(tmp_path / "grey.png")), np.repeat(grey[..., None], 3, axis=2))
    rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_rgb(str(tmp_path / "rgba.png")), rgba[..., :3])
    palette = Image.fromarray(np.array([[0, 1, 2, 1]], np.uint8), "P")
    palette.putpalette([200, 100, 50, 1, 2, 3, 0, 255, 0] + [0] * 759)
    palette.save(tmp_path / "p.png")
    assert read_rgb(str(tmp_path / "p.png")).tolist() == [[[200, 100, 50], [1, 2, 3], [0, 255, 0], [1, 2, 3]]]
    deep = np.array([[0, 0x1234, 32896, 65535]], np.uint16)
    assert cv2.imwrite(str(tmp_path / "g16.png"), deep)
    assert read_rgb(str(tmp_path / "g16.png"))[..., 0].tolist() == [[0, 0x12, 128, 255]]
    rgb16 = np.stack([deep, deep[:, ::-1], np.full_like(deep, 65535)], axis=-1)
    assert cv2.imwrite(str(tmp_path / "c16.png"), rgb16[..., ::-1])  # cv2 writes BGR
    out = read_rgb(str(tmp_path / "c16.png"))
    assert out.dtype == np.uint8 and out.tolist() == [[[0, 255, 255], [0x12, 128, 255], [128, 0x12, 255],
                                                       [255, 0, 255]]]
    raises_user_error(read_rgb, str(tmp_path / "absent.png"), contains=["absent.png"])


def test_check_images_names_the_corrupt_file(tmp_path):
    for i in range(6):
        write_png(tmp_path / "cat" / f"{i}.png")
    (tmp_path / "cat" / "3.png").write_bytes(b"not a png at all" * 8)
    classes, samples = scan_image_folder(str(tmp_path))
    threads = threading.active_count()
    for full in (True, False):
        raises_user_error(check_images, str(tmp_path), samples, full=full, contains=["3.png"])
        assert threading.active_count() == threads
    (tmp_path / "cat" / "5.png").write_bytes(b"")
    message = raises_user_error(check_images, str(tmp_path), samples, contains=["3.png", "(and 1 more)"])
    assert "5.png" not in message
    check_images(str(tmp_path), [s for s in samples if s[0] not in ("cat/3.png", "cat/5.png")])
    assert threading.active_count() == threads


def test_dataset_items(tmp_path):
    write_png(tmp_path / "a" / "x.png", value=0, size=(4, 7))
    write_png(tmp_path / "b" / "y.png", value=255, size=(5, 3))
    classes, samples = scan_image_folder(str(tmp_path))
    ds = ClassificationDataset(str(tmp_path), samples, classes)
    assert len(ds) == 2 and ds.labels == [0, 1] and ds.paths[1] == os.path.join(str(tmp_path), "b/y.png")
    image, label = ds[1]
    assert label == 1 and image.dtype == torch.float32 and image.shape == (3, 5, 3)
    assert torch.allclose(image[:, 0, 0], torch.from_numpy((1 - MEAN) / STD))
    ds = ClassificationDataset(str(tmp_path), samples, classes, transform=EvalTransform(2))
    assert ds[0][0].shape == (3, 2, 2)
    raises_user_error(ClassificationDataset, str(tmp_path), samples, ["a"], contains=["label 1"])


# ---------------------------------------------------------------------------------------------------------------
# Built-in digits

def tree_hash(root):
    """sha256 over every file's relative path and bytes."""
    h = hashlib.sha256()
    for here, dirs, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(here, name)
            h.update(os.path.relpath(path, root).encode())
            h.update(open(path, "rb").read())
    return h.hexdigest()


def test_make_digits_is_complete_and_deterministic(tmp_path):
    root = digits.make_digits(str(tmp_path / "a"))
    classes, samples = scan_image_folder(root)
    assert classes == [str(d) for d in range(10)] and len(samples) == 1797
    assert len({rel.split("/")[1] for rel, _ in samples}) == 1797  # one global index per image
    image = cv2.imread(os.path.join(root, samples[0][0]), cv2.IMREAD_UNCHANGED)
    assert image.shape == (32, 32) and image.dtype == np.uint8
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    assert manifest["version"] == digits.DIGITS_VERSION and manifest["size"] == 32 and manifest["images"] == 1797
    assert tree_hash(digits.make_digits(str(tmp_path / "b"))) == tree_hash(root)


def test_digits_pixel_values_at_native_size(tmp_path):
    from sklearn.datasets import load_digits
    source = load_digits()
    root = digits.make_digits(str(tmp_path), size=8)
    for index in (0, 1000, 1796):
        path = os.path.join(root, str(source.target[index]), f"{index:04d}.png")
        expected = np.floor(source.images[index] * 255 / 16 + 0.5)
        assert np.array_equal(cv2.imread(path, cv2.IMREAD_UNCHANGED), expected.astype(np.uint8))
    raises_user_error(digits.make_digits, str(tmp_path / "c"), size=4, contains=["4"])


def test_ensure_digits_builds_once_and_repairs(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    root = digits.ensure_digits(str(cache))
    assert root == os.path.join(str(cache), "digits-v1-32px") and digits.is_complete(root)
    assert os.listdir(cache) == ["digits-v1-32px"]
    original = digits.make_digits
    monkeypatch.setattr(digits, "make_digits", lambda *a, **k: pytest.fail("rebuilt a complete tree"))
    assert digits.ensure_digits(str(cache)) == root
    monkeypatch.setattr(digits, "make_digits", original)
    os.remove(os.path.join(root, "7", os.listdir(os.path.join(root, "7"))[0]))  # a damaged tree is rebuilt
    assert not digits.is_complete(root)
    assert digits.ensure_digits(str(cache)) == root and digits.is_complete(root)
    assert os.listdir(cache) == ["digits-v1-32px"]


def test_ensure_digits_when_another_process_wins(tmp_path, monkeypatch):
    cache, original = tmp_path / "cache", digits.make_digits
    target = os.path.join(str(cache), "digits-v1-32px")

    def racing(root, size=32):
        original(target, size)  # another process finishes first, while we are still building
        return original(root, size)

    monkeypatch.setattr(digits, "make_digits", racing)
    assert digits.ensure_digits(str(cache)) == target and digits.is_complete(target)
    assert os.listdir(cache) == ["digits-v1-32px"]


def test_digits_without_sklearn(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    message = raises_user_error(digits.make_digits, str(tmp_path))
    assert message == ("the built-in digits need scikit-learn, which requirements.txt lists: pip install "
                       "scikit-learn (or pass --dataset_path to your own images)")


def test_requirements_txt_installs_what_the_built_in_digits_read():
    """`pip install -r requirements.txt && python train.py --task classification` must work: the digits come from
    scikit-learn, so requirements.txt (not only the dev list) names it."""
    names = [re.split(r"[<>=!~;\s\[]", line.strip(), maxsplit=1)[0].lower()
             for line in open(os.path.join(ROOT, "requirements.txt")) if line.strip() and not line.startswith("#")]
    assert "scikit-learn" in names, names


# ---------------------------------------------------------------------------------------------------------------
# Transforms

def photo(h=40, w=56, seed=0):
    """A random-ish RGB uint8 image with some structure."""
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)


def test_transform_output_shape_and_dtype():
    augment = TrainTransform(24, rotation=20, vflip_prob=0.5, color_jitter=(0.4, 0.4, 0.4, 0.1))
    for transform in (augment, EvalTransform(24), EvalTransform(24, resize=28)):
        out = transform(photo())
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32 and out.is_contiguous()


def test_eval_of_a_constant_image_is_the_normalised_constant():
    out = EvalTransform(16, resize=20)(np.full((30, 50, 3), (255, 0, 51), np.uint8))
    expected = (np.array([1.0, 0.0, 0.2], np.float32) - MEAN) / STD
    assert torch.allclose(out, torch.from_numpy(expected)[:, None, None].expand(3, 16, 16), atol=1e-6)


def test_train_randomness_comes_from_numpy_only():
    augment = TrainTransform(24, rotation=30, vflip_prob=0.5, color_jitter=(0.4, 0.4, 0.4, 0.1))
    np.random.seed(5)
    first = augment(photo())
    np.random.seed(5)
    random.seed(99)
    torch.manual_seed(99)
    assert torch.equal(augment(photo()), first)
    np.random.seed(6)
    assert not torch.equal(augment(photo()), first)


@pytest.mark.parametrize("size", [24, 64])  # shrinking (INTER_AREA) and enlarging (INTER_LINEAR)
def test_flip_and_plain_resize(size):
    image = photo(40, 40)
    plain = TrainTransform(size, scale=None, hflip_prob=0.0)(image)
    assert torch.equal(TrainTransform(size, scale=None, hflip_prob=1.0)(image), plain.flip(2))
    assert torch.equal(TrainTransform(size, scale=None, hflip_prob=0.0, vflip_prob=1.0)(image), plain.flip(1))
    assert torch.equal(plain, EvalTransform(size)(image))


def test_rotation_fills_uncovered_corners_with_the_mean():
    augment = TrainTransform(32, scale=None, hflip_prob=0.0, rotation=90)
    np.random.seed(5)
    angle = np.random.uniform(-90, 90)  # the only draw of this configuration
    assert 30 < abs(angle) < 60  # far enough from 0 and 90 that the corners are uncovered
    np.random.seed(5)
    out = augment(np.full((32, 32, 3), 200, np.uint8))
    assert torch.equal(out[:, 0, 0], torch.zeros(3))
    assert torch.allclose(out[:, 16, 16], torch.from_numpy((200 / 255 - MEAN) / STD), atol=1e-5)


def test_brightness_jitter_stays_in_range():
    augment = TrainTransform(8, scale=None, hflip_prob=0.0, color_jitter=(0.5, 0, 0, 0))
    values = []
    for seed in range(20):
        np.random.seed(seed)
        x = augment(np.full((8, 8, 3), 100, np.uint8))[0] * STD[0] + MEAN[0]
        assert torch.allclose(x, x[0, 0].expand(8, 8))
        values.append(float(x[0, 0]) * 255 / 100)
    assert 0.5 <= min(values) < 0.8 and 1.2 < max(values) <= 1.5


@pytest.mark.parametrize("kwargs, name", [
    ({"image_size": 0}, "image_size"), ({"image_size": 8, "scale": (0.0, 0.5)}, "scale"),
    ({"image_size": 8, "scale": (0.5, 1.5)}, "scale"), ({"image_size": 8, "ratio": (2, 1)}, "ratio"),
    ({"image_size": 8, "hflip_prob": -0.1}, "hflip_prob"), ({"image_size": 8, "vflip_prob": 2}, "vflip_prob"),
    ({"image_size": 8, "rotation": -5}, "rotation"), ({"image_size": 8, "rotation": 200}, "rotation"),
    ({"image_size": 8, "color_jitter": (0, 0, 0, 0.6)}, "color_jitter"),
    ({"image_size": 8, "color_jitter": (0.1, 0.1, 0.1)}, "color_jitter"), ({"image_size": 8, "std": (1, 0, 1)}, "std"),
])
def test_train_transform_rejects_bad_arguments(kwargs, name):
    raises_user_error(TrainTransform, **kwargs, contains=[name])


def test_eval_transform_rejects_bad_arguments():
    raises_user_error(EvalTransform, 0, contains=["image_size"])
    raises_user_error(EvalTransform, 32, resize=16, contains=["resize=16"])
    raises_user_error(EvalTransform(8), np.zeros((4, 4), np.uint8), contains=["uint8"])
