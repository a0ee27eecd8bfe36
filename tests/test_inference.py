"""Prediction (scales, flip, sliding window), infer.py's inputs and outputs, and model export."""
import argparse
import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import tasks
from conftest import run
from evaluation import export, inference
from engine.recipe import native_bf16
from evaluation.inference import PredictOptions, predict_probs
from utils import UserError

# ---------------------------------------------------------------------------------------------
# Tiny models whose probabilities are known without running the code under test.


class Constant(nn.Module):
    """The same class scores at every pixel, whatever the input."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.tensor(scores)

    def forward(self, x):
        return self.scores.view(1, -1, 1, 1).expand(x.shape[0], -1, *x.shape[-2:]).clone()


class SizeReporter(nn.Module):
    """Scores (H/10, W/10, 0) everywhere: each scale's input size shows in the result."""

    def forward(self, x):
        h, w = x.shape[-2:]
        return torch.tensor([h / 10, w / 10, 0.0]).view(1, 3, 1, 1).expand(x.shape[0], 3, h, w).clone()


class Column(nn.Module):
    """Class 0 scores the column index: a model that is not mirror-symmetric."""

    def forward(self, x):
        h, w = x.shape[-2:]
        cols = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(x.shape[0], 1, h, w)
        return torch.cat([cols / w, torch.zeros_like(cols)], 1)


def per_pixel_model():
    """A 1x1 convolution: each pixel's scores depend on that pixel only, so zero padding would show if it leaked."""
    torch.manual_seed(0)
    return nn.Conv2d(3, 4, 1).eval()


SIZES = {"smaller": (11, 13), "equal": (16, 16), "larger": (37, 50)}  # against a 16 px window


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_sliding_window_constant_model_gives_its_probabilities_everywhere(size):
    scores = [0.5, -1.0, 2.0]
    image = torch.randn(2, 3, *size)
    probs = predict_probs(Constant(scores), image, PredictOptions(sliding=True, crop_size=16, flip=True))
    assert probs.shape == (2, 3, *size)
    expected = torch.tensor(scores).softmax(0).view(1, 3, 1, 1).expand_as(probs)
    assert torch.allclose(probs, expected, atol=1e-6)


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_sliding_window_equals_whole_image_for_a_per_pixel_model(size):
    model, image = per_pixel_model(), torch.randn(1, 3, *size)
    whole = predict_probs(model, image)
    for rate in (2 / 3, 1.0, 0.25):
        windows = predict_probs(model, image, PredictOptions(sliding=True, crop_size=16, stride_rate=rate))
        assert torch.allclose(windows, whole, atol=1e-6)
    assert torch.allclose(whole, model(image).softmax(1), atol=1e-6)


def test_windows_cover_every_pixel_and_stay_inside():
    for length in (1, 15, 16, 17, 40, 100):
        starts = inference.window_starts(length, 16, 11)
        covered = np.zeros(length, int)
        for s in starts:
            covered[s:s + 16] += 1
        assert covered.min() >= 1 and starts[0] == 0
        assert max(starts) + 16 == max(length, 16)


def test_scales_average_the_probabilities_of_each_scaled_size():
    image = torch.randn(1, 3, 40, 60)
    soft = lambda *s: torch.tensor(s).softmax(0)  # noqa: E731
    # Scale 1 is the image's own size: 40x60 and 20x30.
    probs = predict_probs(SizeReporter(), image, PredictOptions(scales=(0.5, 1.0), flip=True))
    expected = (soft(2.0, 3.0, 0.0) + soft(4.0, 6.0, 0.0)) / 2
    assert probs.shape == (1, 3, 40, 60)
    assert torch.allclose(probs, expected.view(1, 3, 1, 1).expand_as(probs), atol=1e-6)
    # --base_size 30 sets the long side of scale 1: 20x30 and 10x15, resized back to 40x60.
    probs = predict_probs(SizeReporter(), image, PredictOptions(scales=(0.5, 1.0), base_size=30))
    expected = (soft(1.0, 1.5, 0.0) + soft(2.0, 3.0, 0.0)) / 2
    assert torch.allclose(probs, expected.view(1, 3, 1, 1).expand_as(probs), atol=1e-6)


def test_flip_averages_the_mirrored_prediction():
    image = torch.randn(1, 3, 8, 12)
    # The identity model (scores = image) is mirror-symmetric, so flipping changes nothing.
    assert torch.allclose(predict_probs(nn.Identity(), image, PredictOptions(flip=True)), image.softmax(1), atol=1e-6)
    # The column model is not: the average is the mean of the prediction and its mirror image.
    plain = Column()(image).softmax(1)
    flipped = predict_probs(Column(), image, PredictOptions(flip=True))
    assert torch.allclose(flipped, (plain + plain.flip(-1)) / 2, atol=1e-6)
    assert torch.allclose(flipped, flipped.flip(-1), atol=1e-6)


def test_amp_runs_under_autocast_and_float16_falls_back_on_cpu(caplog):
    args = argparse.Namespace(scales=[1.0], base_size=None, flip=False, sliding=False, crop_size=None,
                              stride_rate=2 / 3, amp=True, amp_dtype="float16")
    options = inference.options_from_args(args, "cpu")
    assert options.amp_dtype == (torch.bfloat16 if native_bf16("cpu") else None) and "float16 needs CUDA" in caplog.text
    model, image = per_pixel_model(), torch.randn(1, 3, 9, 9)
    probs = predict_probs(model, image, options)
    assert probs.dtype == torch.float32 and torch.allclose(probs, predict_probs(model, image), atol=2e-2)


@pytest.mark.parametrize("flag, value, message", [
    ("stride_rate", 0.0, "--stride_rate 0: expected a fraction in (0, 1]"),
    ("scales", [1.0, -0.5], "--scales 1 -0.5: expected positive numbers"),
    ("crop_size", 0, "--crop_size 0: expected a positive number of pixels"),
])
def test_bad_prediction_flags_are_named(flag, value, message):
    args = argparse.Namespace(scales=[1.0], base_size=None, flip=False, sliding=True, crop_size=None,
                              stride_rate=2 / 3, amp=False, amp_dtype="bfloat16")
    setattr(args, flag, value)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        inference.options_from_args(args, "cpu")


def test_fractions_sum_to_one_and_overlay_keeps_ignored_pixels():
    mask = np.array([[0, 1, 1], [2, 255, 1]], np.uint8)
    assert inference.class_fractions(mask, 3) == pytest.approx([1 / 6, 3 / 6, 1 / 6])
    image = np.full((2, 3, 3), 100, np.uint8)
    out = inference.overlay(image, mask, np.tile(np.arange(256, dtype=np.uint8)[:, None], (1, 3)))
    assert (out[1, 1] == 100).all() and not (out[0, 1] == 100).all()


def test_export_onnx_names_the_missing_package(monkeypatch):
    real = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(UserError, match="--export onnx needs the Python package.* onnxruntime.*pip install onnxruntime"):
        export.check_packages("onnx")


# ---------------------------------------------------------------------------------------------
# infer.py and export as a user runs them.


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_infer_keeps_layout_skips_existing_and_corrupt_and_writes_jsonl(tmp_path, trained, tiny_data):
    logdir, _ = trained
    ckpt = os.path.join(logdir, "best.pth")
    src = os.path.join(tiny_data, "JPEGImages")
    names = sorted(os.listdir(src))[:4]
    layout = ["a.jpg", os.path.join("sub", "b.jpg"), os.path.join("sub", "deep", "c.jpg"), "d.png"]
    for name, rel in zip(names, layout):
        (tmp_path / "in" / os.path.dirname(rel)).mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(src, name), tmp_path / "in" / rel)
    (tmp_path / "in" / "sub" / "broken.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "out"
    base = ["infer.py", "--checkpoint", ckpt, "--output", str(out), "--workers", "1"]

    proc = run([*base, "--input", str(tmp_path / "in"), "--recursive", "--save_overlay", "--save_probs",
                "--scales", "0.75", "1", "--flip"], check=False)
    assert proc.returncode == 1, proc.stderr
    assert "broken.jpg" in proc.stdout and "1 input(s) failed" in proc.stdout
    stems = [os.path.splitext(rel)[0] for rel in layout]
    assert files_under(out) == sorted(["predictions.jsonl"] + [s + e for s in stems
                                                               for e in (".png", "_overlay.jpg", "_probs.npy")])
    mask = Image.open(out / "sub" / "deep" / "c.png")
    assert mask.mode == "P" and mask.size == (64, 64)
    probs = np.load(out / "sub" / "deep" / "c_probs.npy")
    assert probs.shape == (5, 64, 64) and np.allclose(probs.sum(0), 1, atol=1e-5)
    assert np.array_equal(probs.argmax(0), np.asarray(mask))
    records = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert sorted(r["mask"] for r in records) == sorted(s + ".png" for s in stems)
    for r in records:
        assert (r["height"], r["width"]) == (64, 64) and sum(r["fractions"].values()) == pytest.approx(1)
        assert list(r["fractions"]) == ["background", "striped_disk", "checkered_box", "dotted_triangle",
                                        "grid_cross"]

    # A list file names the same images: their outputs exist, so nothing is predicted or overwritten.
    (out / "a.png").write_bytes(b"sentinel")
    listing = tmp_path / "in" / "list.txt"
    listing.write_text("\n".join(layout) + "\n")
    proc = run([*base, "--input", str(listing)])
    assert "skipped 4 input(s) whose outputs exist" in proc.stdout and "wrote 0 masks" in proc.stdout
    assert (out / "a.png").read_bytes() == b"sentinel"
    assert len(open(out / "predictions.jsonl").readlines()) == 4

    proc = run([*base, "--input", str(listing), "--overwrite"])
    assert "wrote 4 masks" in proc.stdout
    assert Image.open(out / "a.png").mode == "P"
    assert len(open(out / "predictions.jsonl").readlines()) == 4


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_round_trip(tmp_path, trained, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    logdir, _ = trained
    ckpt = os.path.join(logdir, "best.pth")
    path = tmp_path / f"model{export.EXTENSIONS[fmt]}"
    proc = run(["infer.py", "--checkpoint", ckpt, "--export", fmt, "--export_path", str(path)])
    assert "dynamic batch, height and width" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    _, model, _, _ = tasks.load_from_checkpoint(ckpt)
    exported = export.load_exported(fmt, str(path))
    for shape in [(1, 3, 64, 64), (2, 3, 45, 77)]:  # another batch and spatial size than the export's
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = model(x).numpy()
        # float32 agreement, relative to the logits' size (a trained model's reach the thousands on noise input)
        assert np.abs(exported(x) - expected).max() < 1e-5 * max(10.0, np.abs(expected).max())
    again = run(["infer.py", "--checkpoint", ckpt, "--export", fmt, "--export_path", str(path)], check=False)
    assert again.returncode == 2 and f"--export_path {path} exists; pass --overwrite" in again.stderr


def test_an_image_too_large_for_the_gpu_is_predicted_in_windows_or_counted_as_failed(tmp_path, trained):
    """Out of GPU memory at full size: the image is predicted again in sliding windows; still out of memory there:
    it is logged and counted like an unreadable file, and the other images are predicted."""
    logdir, _ = trained
    rng = np.random.default_rng(0)
    for name, width in (("small", 64), ("large", 160), ("huge", 240)):
        Image.fromarray(rng.integers(0, 256, (64, width, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    out = tmp_path / "out"
    proc = run(["infer.py", "--checkpoint", os.path.join(logdir, "last.pth"), "--input", str(tmp_path / "*.png"),
                "--output", str(out), "--workers", "0", "--crop_size", "64", "--plugin",
                os.path.join("tests", "oom_plugin.py")], tmp_path,
               env={"AILAB_OOM_WIDTH": "100", "AILAB_OOM_ALWAYS_WIDTH": "200"}, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log  # one input failed
    assert "large.png (160x64) ran out of GPU memory; predicting it in 64 px sliding windows instead" in log
    assert "skipped " + str(tmp_path / "huge.png") + ": out of GPU memory even in sliding windows" in log
    assert "1 input(s) failed" in log
    assert {os.path.basename(p) for p in glob.glob(str(out / "*.png"))} == {"small.png", "large.png"}
