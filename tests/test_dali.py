"""--loader dali: training and evaluation under 2-process DDP, the same metrics as the OpenCV loader, an exact
mid-epoch resume, each image scored once in a sharded evaluation, and image and mask kept aligned by the joint
random scale, crop and flip. Everything but the missing-DALI message needs `pip install -r requirements-dali.txt`."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

from conftest import TINY, run, torchrun
from data.loaders import TrainSampler, build_eval_loader, build_train_loader
from data.readers import IGNORE_INDEX, save_palette_png
from data.transforms import EvalTransform, TrainTransform
from data.voc import SegmentationDataset
from test_faults import assert_bit_identical


@pytest.fixture
def dali():
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install -r requirements-dali.txt)")
    from data import dali
    return dali


def test_without_dali_the_run_stops_with_one_line_naming_the_install_command(tmp_path, tiny_data):
    hidden = tmp_path / "hide" / "nvidia" / "dali"  # shadows an installed nvidia.dali with one that fails to import
    hidden.mkdir(parents=True)
    (hidden.parent / "__init__.py").write_text("__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n")
    (hidden / "__init__.py").write_text("raise ModuleNotFoundError('No module named nvidia.dali (hidden by the test)')\n")
    proc = run(["train.py", *TINY, "--dataset_path", tiny_data, "--numclasses", "5", "--loader", "dali",
                "--logdir", str(tmp_path / "run")], tmp_path, env={"PYTHONPATH": str(tmp_path / "hide")}, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "pip install -r requirements-dali.txt" in proc.stderr and proc.stderr.startswith("error: --loader dali")
    assert not os.path.exists(tmp_path / "run"), "the run wrote files before it stopped"


def test_dali_trains_and_evaluates_under_two_process_ddp(tmp_path, tiny_data, dali):
    logdir = tmp_path / "ddp"
    proc = torchrun(2, ["train.py", "--distributed", *TINY, "--dataset_path", tiny_data, "--numclasses", "5",
                        "--loader", "dali", "--logdir", str(logdir)], tmp_path=tmp_path)
    assert "backend gloo" in proc.stdout and "2 steps per epoch" in proc.stdout  # 16 images / (2 ranks x 4)
    version = __import__("nvidia.dali", fromlist=["__version__"]).__version__
    assert f"loader dali: NVIDIA DALI {version}, 2 threads, images decoded on cpu" in proc.stdout
    assert proc.stdout.count("epoch 1/1: train loss") == 1
    ckpt = torch.load(logdir / "last.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["args"]["loader"] == "dali"
    assert 0.0 <= ckpt["val"]["miou"] <= 1.0
    assert sum(map(sum, ckpt["val"]["confusion"])) == ckpt["val"]["pixels"] > 0


def test_dali_evaluation_scores_like_opencv_on_one_checkpoint(tmp_path, trained, tiny_data, dali):
    logdir, _ = trained
    ckpt = os.path.join(logdir, "best.pth")
    run(["test.py", "--checkpoint", ckpt, "--save_path", str(tmp_path / "cv"), "--workers", "0"], tmp_path)
    torchrun(2, ["test.py", "--distributed", "--checkpoint", ckpt, "--save_path", str(tmp_path / "dali"),
                 "--loader", "dali"], tmp_path=tmp_path)
    cv, dl = (json.load(open(tmp_path / name / "metrics.json")) for name in ("cv", "dali"))
    # The scoring protocol is the same: each of the 7 images once, every labelled pixel once.
    assert dl["images"] == cv["images"] == 7
    assert dl["pixels"] == cv["pixels"] == sum(map(sum, dl["confusion"]))
    assert sorted(os.listdir(tmp_path / "dali" / "pred")) == sorted(os.listdir(tmp_path / "cv" / "pred"))
    # Both decode JPEG with libjpeg-turbo (the unit test below checks the inputs agree to float rounding), but
    # another build may round its IDCT differently by one grey level, which can flip a pixel whose two best classes
    # tie; such pixels are a tiny share, so the scores must agree closely, not bit for bit.
    assert abs(dl["miou"] - cv["miou"]) <= 2e-3, (dl["miou"], cv["miou"])
    moved = np.abs(np.array(dl["confusion"]) - np.array(cv["confusion"])).sum() / 2
    assert moved <= 0.002 * cv["pixels"], moved


def test_dali_resume_continues_at_the_interrupted_batch(tmp_path, tiny_data, dali):
    """recovery.pth at step 6 is epoch 2, batch 2 (4 batches per epoch). Resumed from it, the DALI loader must
    start at batch 2 of epoch 2's order with the same augmentation, or the last weights would differ."""
    common = [*TINY, "--dataset_path", tiny_data, "--numclasses", "5", "--epochs", "2", "--loader", "dali",
              "--deterministic", "--recovery_interval", "6"]
    run(["train.py", *common, "--logdir", str(tmp_path / "a")], tmp_path)
    recovery = torch.load(tmp_path / "a" / "recovery.pth", weights_only=True)
    assert recovery["resume_at"] == {"epoch": 1, "batch": 2, "step": 6}
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "recovery.pth", tmp_path / "b" / "recovery.pth")
    proc = run(["train.py", "--resume", "auto", "--logdir", str(tmp_path / "b")], tmp_path)
    assert ": epoch 2, batch 2, step 6;" in proc.stdout and "approximate" not in proc.stdout
    assert "epoch 2/2 [3/4]" in proc.stdout and "epoch 2/2 [2/4]" not in proc.stdout
    assert_bit_identical(tmp_path / "a" / "last.pth", tmp_path / "b" / "last.pth")


def test_sharded_dali_eval_yields_each_image_once_as_the_opencv_loader_does(tiny_data, dali):
    dataset = SegmentationDataset(tiny_data, "val", EvalTransform(), 5)  # 7 images: 2 ranks x batch 3 don't divide it
    seen = []
    for rank in range(2):
        loader = dali.build_eval_loader(dataset, 3, rank, 2)
        reference = list(build_eval_loader(dataset, 3, 0, rank, 2))
        batches = list(loader)
        assert len(batches) == len(loader) == len(reference) == [2, 1][rank]  # 4 and 3 images
        for (image, label), (ref_image, ref_label) in zip(batches, reference):
            assert image.shape == ref_image.shape and label.dtype == torch.int64
            assert torch.equal(label, ref_label)
            torch.testing.assert_close(image, ref_image, rtol=0, atol=1e-3)  # one grey level is 0.017
        assert sum(len(label) for _, label in batches) == len(loader.sampler) == [4, 3][rank]
        seen += list(loader.sampler)
    assert sorted(seen) == list(range(7))


def test_dali_train_batches_follow_the_suite_order_and_augmentation_on_every_rank(tiny_data, dali):
    """Rank r's DALI batches after set_epoch(1, 1) are the OpenCV loader's: the same samples, scale, crop and flip.
    Resizes round differently (cv2 works in fixed point), so images agree to about one grey level and a few
    mask pixels on class borders may take the neighbour's class."""
    dataset = SegmentationDataset(tiny_data, "train", TrainTransform(48, (0.5, 1.5), 0.5), 5)
    for rank in range(2):
        loader, sampler = dali.build_train_loader(dataset, 2, rank, 2, seed=3)
        reference, ref_sampler = build_train_loader(dataset, 2, 0, rank, 2, seed=3)
        sampler.set_epoch(1, 1)
        ref_sampler.set_epoch(1, 1)
        batches, expected = list(loader), list(reference)
        assert len(batches) == len(loader) == len(expected) == 3  # 8 samples per rank, batch 2, one skipped
        for (image, label), (ref_image, ref_label) in zip(batches, expected):
            assert image.shape == ref_image.shape == (2, 3, 48, 48) and label.shape == (2, 48, 48)
            assert (image - ref_image).abs().mean() < 0.01
            assert (label == ref_label).float().mean() > 0.98


COLOURS = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30], [30, 230, 230]], np.uint8)


def make_colour_coded(root, n=6, height=80, width=48, block=16, band=3):
    """Images of 16 px blocks whose colour is their class, on a grid of random classes; each block's label is its
    class, with `band` ignore pixels along block borders (JPEG chroma and bilinear resizing blur colours there)."""
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i in range(n):
        classes = rng.integers(0, len(COLOURS), (height // block, width // block))
        label = np.kron(classes, np.ones((block, block), np.int64)).astype(np.uint8)
        cv2.imwrite(os.path.join(root, "JPEGImages", f"c{i}.jpg"), cv2.cvtColor(COLOURS[label], cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 100])
        edge = np.zeros((block, block), bool)
        edge[:band], edge[-band:], edge[:, :band], edge[:, -band:] = True, True, True, True
        label[np.tile(edge, (height // block, width // block))] = IGNORE_INDEX
        save_palette_png(os.path.join(root, "SegmentationClass", f"c{i}.png"), label)
    with open(os.path.join(root, "ImageSets", "Segmentation", "train.txt"), "w") as f:
        f.write("".join(f"c{i}\n" for i in range(n)))
    return root


def test_joint_scale_crop_flip_keep_every_labelled_pixel_on_its_colour(tmp_path, dali):
    root = make_colour_coded(str(tmp_path / "colours"))
    # 80x48 (HxW) images, scaled by 0.75..1.5 and cropped to 64: some crops stick out and are padded.
    dataset = SegmentationDataset(root, "train", TrainTransform(64, (0.75, 1.5), 0.5), 5, check_contents=True)
    loader, sampler = dali.build_train_loader(dataset, 3, 0, 1, seed=0)
    labelled = padded = 0
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for image, label in loader:
            rgb = (image.permute(0, 2, 3, 1) * torch.tensor([0.229, 0.224, 0.225]) + torch.tensor(
                [0.485, 0.456, 0.406])) * 255
            nearest = ((rgb[..., None, :] - torch.from_numpy(COLOURS).float()) ** 2).sum(-1).argmin(-1)
            keep = label != IGNORE_INDEX
            assert torch.equal(nearest[keep], label[keep]), f"{(nearest[keep] != label[keep]).sum()} pixels off"
            labelled += int(keep.sum())
            padded += int((image == 0).all(1).any(-1).any(-1).sum())  # the mean colour: a padded strip
    flipped = sum(dataset.transform.draw(80, 48, np.random.RandomState(seed))[4]
                  for epoch in range(3) for _, seed in epoch_items(dataset, epoch))
    assert labelled > 10000 and padded > 0 and 0 < flipped < 18  # scale, padding and both flip outcomes happened


def epoch_items(dataset, epoch):
    sampler = TrainSampler(dataset, 1, 0, 0, 3)
    sampler.set_epoch(epoch)
    return list(sampler)
