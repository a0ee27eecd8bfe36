"""--loader dali for classification: training and evaluation under 2-process DDP, the OpenCV loader's metrics on one
checkpoint, an exact mid-epoch resume with Mixup/CutMix, the OpenCV loader's samples, labels and mixing in every
rank's batches, and one clear line for augmentation DALI does not reproduce. Needs `pip install -r
requirements-dali.txt` (skipped without it); the data is test_classification.py's tiny shapes (20 px PNGs)."""
import csv
import json
import os
import shutil

import pytest
import torch

from conftest import run, torchrun
from data import folder
from data.cls_transforms import EvalTransform, TrainTransform
from data.loaders import build_eval_loader, build_train_loader
from data.mixing import MixCollate
from test_classification import CLS_TINY, make_tree
from test_faults import assert_bit_identical

# DALI reproduces the random resized crop and the horizontal flip; --rotation (10 by default) it does not.
CLS_DALI = [*CLS_TINY, "--rotation", "0", "--hflip_prob", "0.5", "--loader", "dali"]


@pytest.fixture
def dali():
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install -r requirements-dali.txt)")
    from data import dali
    return dali


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """36 images of 4 classes split 20 train / 8 val / 8 test by CLS_TINY's ratios."""
    return make_tree(tmp_path_factory.mktemp("dali_cls") / "shapes")


def datasets(root, train_transform, eval_transform):
    classes, samples = folder.scan_image_folder(root)
    return (folder.ClassificationDataset(root, samples, classes, train_transform),
            folder.ClassificationDataset(root, samples, classes, eval_transform))


def test_dali_classification_trains_and_evaluates_under_two_process_ddp(tmp_path, shapes, dali):
    logdir = tmp_path / "ddp"
    proc = torchrun(2, ["train.py", "--distributed", *CLS_DALI, "--mixup_prob", "0.5", "--dataset_path", shapes,
                        "--logdir", str(logdir)], tmp_path=tmp_path)
    assert "backend gloo" in proc.stdout and "2 steps per epoch" in proc.stdout  # 20 images / (2 ranks x 4)
    assert proc.stdout.count("epoch 1/1: train loss") == 1 and "val top-1" in proc.stdout
    ckpt = torch.load(logdir / "last.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["args"]["loader"] == "dali"
    assert 0.0 <= ckpt["val"]["top1"] <= 1.0
    assert ckpt["val"]["samples"] == sum(map(sum, ckpt["val"]["confusion"])) == 8  # each val image once


def test_dali_evaluation_scores_like_opencv_on_one_checkpoint(tmp_path, shapes, dali):
    """--val_resize 18: every 20 px image is resized (shrunk) and centre-cropped to 16 px."""
    logdir = tmp_path / "run"
    run(["train.py", *CLS_TINY, "--epochs", "2", "--val_resize", "18", "--dataset_path", shapes,
         "--logdir", str(logdir)], tmp_path)
    ckpt = str(logdir / "last.pth")
    test = ["test.py", "--checkpoint", ckpt, "--split", "test", "--workers", "0"]
    run([*test, "--save_path", str(tmp_path / "cv")], tmp_path)
    torchrun(2, [*test, "--distributed", "--loader", "dali", "--save_path", str(tmp_path / "dali")],
             tmp_path=tmp_path)
    cv, dl = (json.load(open(tmp_path / name / "metrics.json")) for name in ("cv", "dali"))
    # The same protocol: each of the 8 test images scored once, by 2 processes here and 1 there.
    assert dl["processes"] == 2 and dl["samples"] == cv["samples"] == sum(map(sum, dl["confusion"])) == 8
    # DALI's resize is not cv2's INTER_AREA (inputs differ by about a grey level), which could move an image
    # whose two best classes nearly tie; on this checkpoint none does.
    assert dl["confusion"] == cv["confusion"]
    for key in ("top1", "top4", "macro_f1"):
        assert abs(dl[key] - cv[key]) <= 1e-6, (key, dl[key], cv[key])
    # The misclassified images (6 of 8 for this barely trained model) and their class probabilities agree closely.
    mistakes = [{row["path"]: {c: float(p) for c, p in (pair.split(":") for pair in row["top_k"].split())}
                 for row in csv.DictReader(open(tmp_path / name / "misclassified.csv"))} for name in ("cv", "dali")]
    assert mistakes[0].keys() == mistakes[1].keys() and mistakes[0]
    for path, probs in mistakes[0].items():
        assert probs.keys() == mistakes[1][path].keys()
        assert all(abs(p - mistakes[1][path][c]) < 0.03 for c, p in probs.items()), (path, probs, mistakes[1][path])


def test_dali_resume_with_mixing_continues_at_the_interrupted_batch(tmp_path, shapes, dali):
    """recovery.pth at step 7 is epoch 2, batch 2 (5 batches per epoch). Resumed from it, the DALI loader must start
    at batch 2 of epoch 2's order with the same crops, flips and mixing, or the last weights would differ."""
    common = [*CLS_DALI, "--epochs", "2", "--mixup_prob", "0.4", "--cutmix_prob", "0.4", "--deterministic",
              "--recovery_interval", "7", "--dataset_path", shapes]
    run(["train.py", *common, "--logdir", str(tmp_path / "a")], tmp_path)
    recovery = torch.load(tmp_path / "a" / "recovery.pth", weights_only=True)
    assert recovery["resume_at"] == {"epoch": 1, "batch": 2, "step": 7}
    (tmp_path / "b").mkdir()
    for name in ("recovery.pth", "split.json"):
        shutil.copy(tmp_path / "a" / name, tmp_path / "b" / name)
    proc = run(["train.py", "--resume", "auto", "--logdir", str(tmp_path / "b")], tmp_path)
    assert ": epoch 2, batch 2, step 7;" in proc.stdout and "approximate" not in proc.stdout
    assert "epoch 2/2 [3/5]" in proc.stdout and "epoch 2/2 [2/5]" not in proc.stdout
    assert_bit_identical(tmp_path / "a" / "last.pth", tmp_path / "b" / "last.pth")


def test_dali_train_batches_are_the_opencv_loaders_on_every_rank(shapes, dali):
    """After set_epoch(1, 1), rank r's DALI batches hold the OpenCV loader's samples in its order, mixed the same
    way (labels, partners and shares exactly), with images within resize rounding (cv2's INTER_AREA is not DALI's)."""
    train_set, _ = datasets(shapes, TrainTransform(16, scale=(0.35, 1.0), hflip_prob=0.5), None)
    mixing = MixCollate(0.4, 0.4, 0.2, 1.0)
    kinds = set()
    for rank in range(2):
        loader, sampler = dali.build_train_loader(train_set, 4, rank, 2, seed=3, collate_fn=mixing)
        reference, ref_sampler = build_train_loader(train_set, 4, 0, rank, 2, seed=3, collate_fn=mixing)
        sampler.set_epoch(1, 1)
        ref_sampler.set_epoch(1, 1)
        batches, expected = list(loader), list(reference)
        assert len(batches) == len(loader) == len(expected) == 3  # 18 samples per rank, batch 4, one skipped
        for (image, target), (ref_image, ref_target) in zip(batches, expected):
            assert image.shape == ref_image.shape == (4, 3, 16, 16)
            assert type(target) is type(ref_target)
            if isinstance(target, dict):
                kinds.add("mixed")
                assert target.keys() == ref_target.keys() and float(target["lam"]) == float(ref_target["lam"])
                assert all(torch.equal(target[k], ref_target[k]) for k in ("label", "mixed"))
            else:
                kinds.add("plain")
                assert target.dtype == torch.int64 and torch.equal(target, ref_target)
            assert (image - ref_image).abs().mean() < 0.05  # 0.05 is about 3 grey levels
    assert kinds == {"mixed", "plain"}


def test_sharded_dali_classification_eval_yields_each_image_once(shapes, dali):
    _, eval_set = datasets(shapes, None, EvalTransform(16, 18))  # 36 images: 2 ranks x batch 5 don't divide it
    seen = []
    for rank in range(2):
        loader = dali.build_eval_loader(eval_set, 5, rank, 2)
        batches, reference = list(loader), list(build_eval_loader(eval_set, 5, 0, rank, 2, collate_fn=None))
        assert len(batches) == len(loader) == len(reference) == 4  # 18 images each: 5 + 5 + 5 + 3
        for (image, label), (ref_image, ref_label) in zip(batches, reference):
            assert image.shape == ref_image.shape and torch.equal(label, ref_label)
            assert (image - ref_image).abs().mean() < 0.05
        assert sum(len(label) for _, label in batches) == len(loader.sampler) == 18
        seen += list(loader.sampler)
    assert sorted(seen) == list(range(36))


@pytest.mark.parametrize("flags, named", [([], "--rotation 10"),
                                          (["--rotation", "0", "--color_jitter", "0.2", "0", "0", "0"],
                                           "--color_jitter 0.2 0 0 0"),
                                          (["--rotation", "0", "--vflip_prob", "0.5"], "--vflip_prob 0.5")])
def test_augmentation_dali_does_not_reproduce_stops_with_one_line(tmp_path, shapes, flags, named, dali):
    proc = run(["train.py", *CLS_TINY, "--loader", "dali", *flags, "--dataset_path", shapes,
                "--logdir", str(tmp_path / "run")], tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith(f"error: {named}:") and "use --loader opencv" in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "run"), "the run wrote files before it stopped"
