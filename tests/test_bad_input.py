"""Each bad input stops train.py before any training step: one line naming the problem, exit code 2, no checkpoint."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, run
from data.readers import save_palette_png


def first_id(root, split="train"):
    return open(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")).read().split()[0]


def label_path(root, i):
    return os.path.join(root, "SegmentationClass", f"{i}.png")


def remove_list(root):
    os.remove(os.path.join(root, "ImageSets", "Segmentation", "train.txt"))
    return "train.txt' does not exist"


def empty_list(root):
    open(os.path.join(root, "ImageSets", "Segmentation", "train.txt"), "w").close()
    return "train.txt' is empty"


def remove_image(root):
    i = first_id(root)
    os.remove(os.path.join(root, "JPEGImages", f"{i}.jpg"))
    return f"id '{i}' in split 'train' has no file"


def remove_label(root):
    i = first_id(root)
    os.remove(label_path(root, i))
    return f"SegmentationClass/{i}.png"


def resize_label(root):
    i = first_id(root)
    save_palette_png(label_path(root, i), np.zeros((10, 12), np.uint8))
    return f"image and label of id '{i}' differ in size"


def label_out_of_range(root):
    i = first_id(root, "val")
    label = np.array(Image.open(label_path(root, i)))
    label[0, 0] = 7
    save_palette_png(label_path(root, i), label)
    return f"{i}.png' has value 7; expected values 0..4"


def rgb_label(root):
    i = first_id(root)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8), "RGB").save(label_path(root, i))
    return "has image mode RGB; expected class indices"


def corrupt_image(root):
    i = first_id(root)
    with open(os.path.join(root, "JPEGImages", f"{i}.jpg"), "wb") as f:
        f.write(b"\xff\xd8 truncated")
    return f"cannot read image '{os.path.join(root, 'JPEGImages', i + '.jpg')}'"


@pytest.mark.parametrize("breakage", [remove_list, empty_list, remove_image, remove_label, resize_label,
                                      label_out_of_range, rgb_label, corrupt_image])
def test_broken_dataset_stops_with_one_clear_line(tmp_path, tiny_data, breakage):
    root = str(tmp_path / "voc")
    shutil.copytree(tiny_data, root)
    expected = breakage(root)
    logdir = tmp_path / "run"
    proc = run(["train.py", *TINY, "--dataset_path", root, "--numclasses", "5", "--logdir", str(logdir)], check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(logdir / "last.pth") and "epoch 1/" not in proc.stdout


def test_missing_dataset_path(tmp_path):
    proc = run(["train.py", *TINY, "--dataset_path", str(tmp_path / "nope"), "--logdir", str(tmp_path / "run")],
               check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: dataset path '{tmp_path / 'nope'}' does not exist; expected a VOC-layout "
                                   "folder with JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/")


def test_incompatible_resume_checkpoint(tmp_path, trained, tiny_data):
    logdir, _ = trained
    proc = run(["train.py", *TINY, "--layers", "34", "--dataset_path", tiny_data, "--numclasses", "5",
                "--resume", os.path.join(logdir, "last.pth"), "--logdir", str(tmp_path / "run")], check=False)
    assert proc.returncode == 2
    assert "was trained with --layers 18, but this run asks for --layers 34" in proc.stderr


def test_corrupt_checkpoint(tmp_path, tiny_data):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    proc = run(["test.py", "--checkpoint", str(bad)], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"error: checkpoint {bad} could not be read")
