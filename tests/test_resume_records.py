"""Nothing lost, nothing misreported: a resume needs no retyped flags, records reach the disk on every way out,
a stuck rank ends the job with one line, and the metrics test.py reports are the ones the training log showed."""
import json
import signal
import sys

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, run, torchrun
from test_faults import assert_bit_identical, signal_at_step, start, steps_logged

# Non-default model, LR, crop, loss and length: a resume must take all of them from the checkpoint.
CUSTOM = [*TINY, "--numclasses", "5", "--layers", "34", "--lr", "0.005", "--crop_size", "48",
          "--loss", "ce:1", "dice:0.5", "--epochs", "3", "--deterministic"]


def tensorboard_steps(logdir, tag="train/loss"):
    acc = EventAccumulator(str(logdir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [event.step for event in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_resume_takes_every_setting_from_the_checkpoint_and_records_survive_sigterm(tmp_path, tiny_data):
    reference = tmp_path / "a"
    run(["train.py", *CUSTOM, "--dataset_path", tiny_data, "--logdir", str(reference)], tmp_path)
    interrupted = tmp_path / "b"
    cmd = [sys.executable, "train.py", *CUSTOM, "--dataset_path", tiny_data, "--logdir", str(interrupted)]
    code, out = signal_at_step(start(cmd, tmp_path), interrupted, 6, signal.SIGTERM)  # mid-epoch 2 of 3
    assert code == 143, out
    assert f"continue with --resume auto --logdir {interrupted}" in out
    # TensorBoard keeps up to two minutes of scalars in memory; the stop flushed them.
    logged = steps_logged(interrupted)
    assert logged >= 6 and max(tensorboard_steps(interrupted)) == logged
    # Only the two flags the hint names: model, LR, crop, loss, epochs and data come from the checkpoint.
    proc = run(["train.py", "--resume", "auto", "--logdir", str(interrupted)], tmp_path)
    assert "resumed from" in proc.stdout and "settings changed" not in proc.stdout + proc.stderr
    assert "ResNet-34" in proc.stdout and "lr 0.005" in proc.stdout
    assert_bit_identical(reference / "last.pth", interrupted / "last.pth")
    # Extending the run is a change the log names; contradicting the model is refused, naming the flag.
    proc = run(["train.py", "--resume", "auto", "--logdir", str(interrupted), "--epochs", "4", "--layers", "18"],
               tmp_path, check=False)
    assert proc.returncode == 2
    assert "was trained with --layers 34, but this run asks for --layers 18" in proc.stderr
    proc = run(["train.py", "--resume", "auto", "--logdir", str(interrupted), "--epochs", "4"], tmp_path)
    assert "settings changed from the checkpoint's: --epochs 3 -> 4" in proc.stdout + proc.stderr
    assert torch.load(interrupted / "last.pth", weights_only=True)["epoch"] == 3


def read_metrics(path):
    with open(path) as f:
        return json.load(f)


def test_test_py_reproduces_the_logged_val_miou_of_a_two_process_ema_run(tmp_path, tiny_data):
    """Two processes without SyncBN end with different batch-norm statistics; validation scores rank 0's, the
    ones saved. With an EMA, best.pth was chosen by the EMA's mIoU, and test.py evaluates the EMA by default."""
    logdir = tmp_path / "run"
    torchrun(2, ["train.py", *TINY, "--numclasses", "5", "--epochs", "2", "--dataset_path", tiny_data,
                 "--logdir", str(logdir), "--ema_decay", "0.5"], tmp_path=tmp_path)
    for name in ("best.pth", "last.pth"):
        ckpt = torch.load(logdir / name, weights_only=True)
        out = tmp_path / f"test-{name}"
        proc = run(["test.py", "--checkpoint", str(logdir / name), "--save_path", str(out), "--workers", "0"],
                   tmp_path)
        assert "ema weights)" in proc.stdout
        miou = read_metrics(out / "metrics.json")["miou"]
        logged = ckpt["best_score"] if name == "best.pth" else ckpt["val"]["miou"]
        assert abs(miou - logged) <= 1e-6, (name, miou, logged)
        raw = run(["test.py", "--checkpoint", str(logdir / name), "--weights", "raw", "--save_path",
                   str(out / "raw"), "--workers", "0"], tmp_path)
        assert "raw weights)" in raw.stdout
        assert abs(read_metrics(out / "raw" / "metrics.json")["miou"] - ckpt["val"]["raw_miou"]) <= 1e-6


def test_a_stuck_rank_ends_the_job_with_one_line_naming_the_collective(tmp_path, tiny_data):
    proc = torchrun(2, ["train.py", *TINY, "--numclasses", "5", "--dataset_path", tiny_data,
                        "--logdir", str(tmp_path / "run"), "--plugin", "tests/stall_plugin.py", "--loss", "stall_at",
                        "--dist_timeout", "5"], tmp_path=tmp_path, check=False, timeout=120,
                    env={"AILAB_STALL_CALL": "2", "AILAB_STALL_RANK": "1", "AILAB_STALL_SECONDS": "60"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    # the update's all-reduce: the loss, its one term and the stop flag
    assert "all_reduce of a (3,) float32 tensor across 2 processes failed on rank 0" in errors[0]
    assert "--dist_timeout" in errors[0]


def test_generator_states_round_trip_and_keep_only_this_processs_gpu(tmp_path):
    """A checkpoint holds each rank's Python, numpy and torch generators and, on a GPU, that GPU's own state (not
    every visible GPU's); a state saved with the list of every GPU's still loads."""
    import random

    import numpy as np

    from engine import checkpoint
    cpu = torch.device("cpu")
    state = checkpoint.rng_state(cpu)
    assert state["cuda"] is None
    torch.save(state, tmp_path / "rng.pth")
    state = torch.load(tmp_path / "rng.pth", weights_only=True)
    drawn = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    checkpoint.set_rng_state(state, cpu)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == drawn
    checkpoint.set_rng_state({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}, cpu)  # older checkpoints
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == drawn
