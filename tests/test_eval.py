"""test.py and infer.py as a user runs them, in one process and under torchrun."""
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image

from conftest import run, torchrun


def label_pixels(root, split="val"):
    ids = open(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")).read().split()
    return sum(int((np.asarray(Image.open(os.path.join(root, "SegmentationClass", i + ".png"))) != 255).sum())
               for i in ids)


# Multi-scale, flip and overlapping 48 px windows on the 64 px images: every path of the prediction.
TTA = ["--scales", "0.75", "1.0", "--flip", "--sliding", "--crop_size", "48"]
COMPARED = ("miou", "acc", "mean_class_acc", "fwiou", "iou", "dice", "class_acc", "pixels", "confusion")


def test_test_py_same_metrics_for_1_2_and_3_processes(tmp_path, trained, tiny_data):
    logdir, _ = trained
    ckpt = os.path.join(logdir, "best.pth")
    one = run(["test.py", "--checkpoint", ckpt, "--save_path", str(tmp_path / "p1"), "--workers", "0",
               "--save_overlay", *TTA])
    assert "mIoU" in one.stdout and "pixel acc" in one.stdout and "fwIoU" in one.stdout
    assert "scales 0.75 1, horizontal flip, sliding 48 px windows, stride 32 px" in one.stdout
    assert any(line.split()[1:] == ["class", "IoU", "Dice", "acc"] for line in one.stdout.splitlines())
    assert any(line.split()[1:2] == ["background"] and len(line.split()) == 5 for line in one.stdout.splitlines())
    for n in (2, 3):
        torchrun(n, ["test.py", "--distributed", "--checkpoint", ckpt, "--save_path", str(tmp_path / f"p{n}"),
                     "--workers", "0", *TTA])
    metrics = [json.load(open(tmp_path / f"p{n}" / "metrics.json")) for n in (1, 2, 3)]
    assert metrics[0]["images"] == 7
    # Each labelled pixel counted exactly once: no padded duplicates, nothing missed.
    assert metrics[0]["pixels"] == label_pixels(tiny_data)
    assert sum(map(sum, metrics[0]["confusion"])) == metrics[0]["pixels"]
    assert set(metrics[0]["per_class"]) == set(metrics[0]["class_names"]) and "background" in metrics[0]["per_class"]
    for m in metrics[1:]:
        assert {k: m[k] for k in COMPARED} == {k: metrics[0][k] for k in COMPARED}
    confusion = Image.open(tmp_path / "p1" / "confusion.png")
    assert confusion.mode == "RGB" and min(confusion.size) > 5 * 14
    overlays = sorted(os.listdir(tmp_path / "p1" / "overlay"))
    assert len(overlays) == 7 and Image.open(tmp_path / "p1" / "overlay" / overlays[0]).size == (64, 64)
    masks = [sorted(os.listdir(tmp_path / f"p{n}" / "pred")) for n in (1, 2, 3)]
    assert len(masks[0]) == 7 and masks[0] == masks[1] == masks[2]
    for name in masks[0]:
        a = np.asarray(Image.open(tmp_path / "p1" / "pred" / name))
        b = np.asarray(Image.open(tmp_path / "p3" / "pred" / name))
        assert Image.open(tmp_path / "p1" / "pred" / name).mode == "P" and np.array_equal(a, b)


def test_infer_writes_one_mask_per_image_and_keeps_layout(tmp_path, trained, tiny_data):
    logdir, _ = trained
    src = os.path.join(tiny_data, "JPEGImages")
    images = sorted(os.listdir(src))[:5]
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for i, name in enumerate(images):
        shutil.copy(os.path.join(src, name), tmp_path / "in" / ("sub" if i >= 3 else "") / name)
    out = tmp_path / "out"
    run(["infer.py", "--checkpoint", os.path.join(logdir, "best.pth"), "--input", str(tmp_path / "in" / "**" / "*.jpg"),
         "--output", str(out)])
    written = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    written.remove("predictions.jsonl")
    expected = sorted(os.path.join("sub" if i >= 3 else "", os.path.splitext(n)[0] + ".png") for i, n in enumerate(images))
    assert written == expected
    mask = Image.open(out / expected[0])
    assert mask.mode == "P" and mask.size == Image.open(os.path.join(src, images[0])).size
    assert np.asarray(mask).max() < 5


def test_infer_under_torchrun_skips_a_corrupt_image(tmp_path, trained, tiny_data):
    logdir, _ = trained
    src = os.path.join(tiny_data, "JPEGImages")
    (tmp_path / "in").mkdir()
    for name in sorted(os.listdir(src))[:3]:
        shutil.copy(os.path.join(src, name), tmp_path / "in" / name)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not a jpeg at all")
    proc = torchrun(2, ["infer.py", "--distributed", "--checkpoint", os.path.join(logdir, "best.pth"),
                        "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")], check=False)
    assert proc.returncode != 0
    assert "broken.jpg" in proc.stderr + proc.stdout
    assert "wrote 3 masks" in proc.stdout and "1 input(s) failed" in proc.stdout
    assert sorted(os.listdir(tmp_path / "out")) == sorted(["predictions.jsonl"] + [
        os.path.splitext(n)[0] + ".png" for n in os.listdir(tmp_path / "in") if n != "broken.jpg"])
    # Both ranks' records end up in one file, one line per predicted image.
    records = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    assert sorted(os.path.basename(r["path"]) for r in records) == sorted(n for n in os.listdir(tmp_path / "in") if n != "broken.jpg")


def test_validation_batches_of_one_image_size_score_like_single_images(tiny_data):
    """train.py validates the built-in data 8 images at a time (all have one size, so nothing is padded): the
    confusion matrix must be the one that image-by-image evaluation gives, including a short last batch."""
    import torch

    import models
    import train
    from data.loaders import build_eval_loader
    from data.voc import build_voc
    from evaluation.evaluate import evaluate
    from evaluation.metrics import ConfusionMatrix
    from tasks.segmentation import SegmentationTask

    args = train.get_args_parser().parse_args(["--numclasses", "5", "--head_channels", "32"])
    torch.manual_seed(0)
    model = models.build_model(args)
    with torch.no_grad():  # running statistics that are not the identity, so batch norm shows in every output
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    dataset = build_voc(args, tiny_data, "val", train=False)  # 7 images of 64 px

    def matrix(batch_size):
        metric = ConfusionMatrix(5, torch.device("cpu"))
        evaluate(model, build_eval_loader(dataset, batch_size, 0, 0, 1), metric, SegmentationTask.predict)
        return metric.mat.clone()

    single, batched = matrix(1), matrix(3)
    assert single.sum() == batched.sum() == sum(int((label < 5).sum()) for _, label in dataset)
    changed = (single - batched).abs().sum().item() / 2  # pixels whose predicted class differs
    assert changed <= 1e-4 * single.sum().item(), (changed, single, batched)
    assert len(single.nonzero()) > 5  # a model whose predictions vary, so the comparison means something


def test_evaluation_turns_cudnn_autotuning_off_for_images_of_many_sizes():
    """cudnn.benchmark autotunes every convolution anew for each input size: once a second size shows up it goes off
    until evaluation ends, then comes back as it was. The images handed to on_prediction are the loader's own (no
    copy back from the device)."""
    from torch import nn

    from evaluation.evaluate import evaluate
    from evaluation.metrics import ClassificationMetrics

    class Loader(list):
        sampler = range(4)

    loader = Loader((torch.rand(1, 3, *size), torch.zeros(1, dtype=torch.long))
                    for size in [(8, 8), (8, 8), (6, 9), (8, 8)])
    seen, handed = [], []

    def predict(model, image):
        seen.append(torch.backends.cudnn.benchmark)
        return torch.full((image.shape[0], 2), 0.5)

    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        evaluate(nn.Identity(), loader, ClassificationMetrics(2, "cpu", 1), predict,
                 on_prediction=lambda index, probs, image: handed.append(image))
        assert seen == [True, True, False, False] and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = before
    assert [im.data_ptr() for im in handed] == [image[0].data_ptr() for image, _ in loader]
