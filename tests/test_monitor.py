"""Watching a run: TensorBoard content, progress output, the GPU monitor, W&B and the plotting tool."""
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, TINY, run


def test_tensorboard_has_scalars_images_and_config(trained):
    logdir, _ = trained
    acc = EventAccumulator(os.path.join(logdir, "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    expected = {"train/loss", "train/loss_ce", "train/lr", "train/images_per_s", "train/data_wait",
                "epoch/train_loss", "val/miou", "val/acc", "val/iou/background"}
    assert expected <= set(tags["scalars"]), set(tags["scalars"])
    assert "val/predictions" in tags["images"]
    image = acc.Images("val/predictions")[0]
    assert image.width == 3 * 64 and image.height > 64   # image | truth | prediction, several rows
    assert any(t.startswith("config") for t in tags["tensors"])
    text = acc.Tensors([t for t in tags["tensors"] if t.startswith("config")][0])[0].tensor_proto.string_val[0]
    assert b"layers = 18" in text


def test_records_for_scripts(trained):
    logdir, _ = trained
    import csv
    import json
    rows = list(csv.DictReader(open(os.path.join(logdir, "summary.csv"))))
    assert {"train_loss_ce", "val_mean_class_acc", "val_iou_background", "epoch_time", "images_per_s"} <= set(rows[0])
    events = [json.loads(line) for line in open(os.path.join(logdir, "events.jsonl"))]
    steps = [e for e in events if "train/loss" in e]
    assert len(steps) == 4 and all("train/lr" in e for e in steps)  # log_interval 1, 4 steps
    epochs = [e for e in events if "val/miou" in e]  # and one record per epoch with every val metric
    assert len(events) == 5 and len(epochs) == 1 and epochs[0]["step"] == 4 and "val/iou/background" in epochs[0]


def test_run_summary_and_no_gpu_monitor_on_cpu(trained):
    logdir, proc = trained
    assert proc.stdout.count("GPU monitor off:") == 1
    assert not any(name.startswith("gpu-") for name in os.listdir(os.path.join(logdir, "tb")))
    last = [line for line in proc.stdout.splitlines() if " done in " in line][0]
    for part in ("best val mIoU", "at epoch 1", "img/s", "MiB RSS", "best.pth", "last.pth"):
        assert part in last


def test_plain_interval_lines_with_no_progress(tmp_path, tiny_data):
    proc = run(["train.py", *TINY, "--log_interval", "2", "--no_progress", "--dataset_path", tiny_data,
                "--numclasses", "5", "--logdir", str(tmp_path / "run")])
    lines = [line for line in proc.stdout.splitlines() if "epoch 1/1 [" in line]
    assert [line.split("[")[1].split("]")[0] for line in lines] == ["2/4", "4/4"]
    assert "img/s" in lines[0] and "lr" in lines[0] and "data wait" in lines[0]


def test_progress_bar_in_a_terminal(tmp_path, tiny_data):
    """In a terminal, rank 0 draws a bar (with loss, LR, img/s and data wait) instead of interval lines."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a 160-column terminal
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, "--dataset_path", tiny_data, "--numclasses", "5",
                             "--logdir", str(tmp_path / "run")], cwd=ROOT, env=env, stdout=follower,
                            stderr=subprocess.STDOUT)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closes when the process ends
            break
        if not chunk:
            break
        output += chunk
    assert proc.wait(timeout=120) == 0
    text = output.decode(errors="replace")
    assert re.search(r"epoch 1/1: +\d+%\|", text), text
    assert "img/s data" in text and "loss " in text
    assert "epoch 1/1 [1/4]" not in text


def test_wandb_missing_package_does_not_stop_the_run(tmp_path, tiny_data):
    shim = tmp_path / "shim" / "wandb"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('wandb is not installed here')\n")
    proc = run(["train.py", *TINY, "--wandb", "--dataset_path", tiny_data, "--numclasses", "5",
                "--logdir", str(tmp_path / "run")], env={"PYTHONPATH": str(tmp_path / "shim")})
    assert "the wandb package is not installed (pip install wandb); continuing" in proc.stdout + proc.stderr
    assert os.path.exists(tmp_path / "run" / "last.pth")


def test_wandb_offline_writes_a_local_run(tmp_path, tiny_data):
    pytest.importorskip("wandb")
    run(["train.py", *TINY, "--wandb", "--wandb_mode", "offline", "--dataset_path", tiny_data, "--numclasses", "5",
         "--logdir", str(tmp_path / "run")], env={"WANDB_SILENT": "true"})
    assert os.listdir(tmp_path / "run" / "wandb")


def test_plot_runs_writes_a_png(tmp_path, trained):
    pytest.importorskip("matplotlib")
    logdir, _ = trained
    out = tmp_path / "curves.png"
    run([os.path.join("tools", "plot_runs.py"), logdir, logdir, "--output", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
