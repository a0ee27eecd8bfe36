"""tools/make_object_crops.py: object crops of synthetic scenes as an ImageFolder tree, labelled with the visible
objects' classes, deterministic, apart from the segmentation data; and a classifier trained on them hands its
backbone to a segmentation model through --pretrained."""
import os
import re

import cv2
import numpy as np

from conftest import TINY, load_script, run
from data import synthetic

TOOL = os.path.join("tools", "make_object_crops.py")


def load_tool():
    return load_script(TOOL)


def written(folder):
    """{file name: (class folder, image)} of a crop tree."""
    return {name: (cls, cv2.imread(os.path.join(folder, cls, name)))
            for cls in sorted(os.listdir(folder)) for name in sorted(os.listdir(os.path.join(folder, cls)))}


def test_crops_carry_the_classes_of_the_visible_objects_and_are_deterministic(tmp_path):
    tool = load_tool()
    first, second = tmp_path / "a", tmp_path / "b"
    proc = run([TOOL, "--out", str(first), "--scenes", "6", "--size", "32"])
    run([TOOL, "--out", str(second), "--scenes", "6", "--size", "32"])
    crops = written(first)
    assert sorted(os.listdir(first)) == sorted(synthetic.SYNTHETIC_CLASSES)
    assert f"wrote {len(crops)} crops" in proc.stdout
    assert all(image.shape == (32, 32, 3) for _, image in crops.values())
    again = written(second)
    assert crops.keys() == again.keys() and all(np.array_equal(crops[k][1], again[k][1]) for k in crops)
    for i in range(6):
        # the scene, drawn again from the tool's stream: its visible objects are the object crops' classes
        _, _, objects, classes = synthetic._synthetic_sample(np.random.default_rng([0, i, tool.CROP_STREAM]), 128, 0)
        visible = [synthetic.SYNTHETIC_CLASSES[classes[k]] for k in range(1, len(classes))
                   if (objects == k).sum() >= tool.MIN_PIXELS]
        names = sorted(n for n in crops if n.startswith(f"scene{i:06d}_"))
        labels = [crops[n][0] for n in names]
        assert labels[:len(visible)] == visible and set(labels[len(visible):]) <= {"background"}
    # not the built-in segmentation images: scene 0 differs from image 0 of the data's own stream
    own, _, _, _ = synthetic._synthetic_sample(np.random.default_rng([0, 0]), 128, 0)
    other, _, _, _ = synthetic._synthetic_sample(np.random.default_rng([0, 0, tool.CROP_STREAM]), 128, 0)
    assert not np.array_equal(own, other)


def test_square_crop_widens_the_box_and_stays_inside_the_image():
    tool = load_tool()
    image = np.arange(128 * 128 * 3, dtype=np.uint8).reshape(128, 128, 3)
    side = round(10 * (1 + 2 * tool.MARGIN))       # a 10 px box widened on both sides
    crop = tool.square_crop(image, 0, 0, 10, 10, side)   # at the corner: the square is moved inside
    assert np.array_equal(crop, image[:side, :side])
    # a box at the right edge, centre (123, 65): 13 px wide, so x from 116.5 -> clipped to 115, y from 58.5 -> 58
    assert side == 13
    crop = tool.square_crop(image, 118, 60, 128, 70, side)
    assert np.array_equal(crop, image[58:71, 115:128])


def test_a_folder_that_is_not_empty_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = run([TOOL, "--out", str(tmp_path), "--scenes", "2"], check=False)
    assert proc.returncode != 0 and "is not empty" in proc.stderr
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_a_classifier_trained_on_crops_is_a_segmentation_backbone(tmp_path, tiny_data):
    crops, cls_run = tmp_path / "crops", tmp_path / "cls"
    run([TOOL, "--out", str(crops), "--scenes", "12", "--size", "32"])
    run(["train.py", "--task", "classification", "--dataset_path", str(crops), "--split_ratio", "0.75", "0.25",
         "--model_type", "resnet", "--layers", "18", "--stem", "imagenet", "--image_size", "32", "--epochs", "1",
         "--batchsize", "8", "--workers", "0", "--logdir", str(cls_run)])
    proc = run(["train.py", *TINY, "--dataset_path", tiny_data, "--numclasses", "5", "--model_type", "deeplabv3p",
                "--pretrained", str(cls_run / "best.pth"), "--strict_load", "--lr", "0",
                "--logdir", str(tmp_path / "seg")])
    # every backbone tensor comes from the classifier (strict: nothing missing or mismatched); its fc is left out
    assert re.search(r"-> backbone: loaded (\d+)/\1 tensors", proc.stdout + proc.stderr)
