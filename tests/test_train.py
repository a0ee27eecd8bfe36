"""Training end to end with real processes: one process, torchrun, the legacy launcher and the shell launchers."""
import csv
import os

import pytest
import torch

from conftest import TINY, run, torchrun

OUTPUTS = {"last.pth", "best.pth", "summary.csv", "train.log"}


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_single_process_run_writes_checkpoints_and_logs(trained):
    logdir, proc = trained
    assert OUTPUTS <= set(os.listdir(logdir))
    rows = read_csv(os.path.join(logdir, "summary.csv"))
    assert len(rows) == 1 and {"epoch", "lr", "train_loss", "val_miou", "val_acc"} <= set(rows[0])
    assert 0.0 <= float(rows[0]["val_miou"]) <= 1.0
    ckpt = torch.load(os.path.join(logdir, "last.pth"), weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["args"]["layers"] == 18 and ckpt["world_size"] == 1
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert "lr 0.01 × 1 processes = 0.01" in proc.stdout
    assert "loader opencv: 0 worker process(es)" in proc.stdout
    assert "val mIoU" in open(os.path.join(logdir, "train.log")).read()
    assert os.listdir(os.path.join(logdir, "tb")), "no TensorBoard event file"


def test_resume_continues_at_next_epoch(tmp_path, trained, tiny_data):
    logdir, _ = trained
    resumed = tmp_path / "resumed"
    proc = run(["train.py", *TINY, "--dataset_path", tiny_data, "--numclasses", "5", "--epochs", "2",
                "--resume", os.path.join(logdir, "last.pth"), "--logdir", str(resumed)])
    assert "resumed from" in proc.stdout and ": epoch 2, batch 0, step 4;" in proc.stdout
    assert [r["epoch"] for r in read_csv(resumed / "summary.csv")] == ["2"]
    before = torch.load(os.path.join(logdir, "last.pth"), weights_only=True)
    after = torch.load(resumed / "last.pth", weights_only=True)
    assert after["epoch"] == 1
    assert after["optimizer"]["state"], "optimizer state was not carried over"
    assert not torch.equal(before["model"]["head.classifier.weight"], after["model"]["head.classifier.weight"])


def check_one_set_of_outputs(logdir, proc, nproc=2):
    files = set(os.listdir(logdir))
    assert OUTPUTS <= files
    assert not any(f.endswith(".tmp") or "rank" in f for f in files), files
    events = [f for f in os.listdir(os.path.join(logdir, "tb")) if f.startswith("events.out")]
    assert len(events) == 1, f"expected one TensorBoard event file, found {events}"
    assert proc.stdout.count(" [1/2] ") == 1, "more than one rank printed progress"
    rows = read_csv(os.path.join(logdir, "summary.csv"))
    assert len(rows) == 1, "more than one rank wrote summary.csv"
    assert f"lr 0.01 × {nproc} processes = 0.02" in proc.stdout
    assert proc.stdout.count("lr 0.01 ×") == 1, "the LR line was logged by more than one rank"
    assert open(os.path.join(logdir, "train.log")).read().count("epoch 1/1: train loss") == 1


def test_torchrun_two_processes_writes_one_set(tmp_path, tiny_data):
    logdir = tmp_path / "ddp"
    proc = torchrun(2, ["train.py", "--distributed", *TINY, "--dataset_path", tiny_data, "--numclasses", "5",
                        "--logdir", str(logdir)], tmp_path=tmp_path)
    check_one_set_of_outputs(logdir, proc)
    assert "backend gloo" in proc.stdout
    assert torch.load(logdir / "last.pth", weights_only=True)["world_size"] == 2


@pytest.mark.parametrize("use_env", [True, False], ids=["use_env", "local-rank-flag"])
def test_legacy_launcher(tmp_path, tiny_data, use_env):
    logdir = tmp_path / "legacy"
    proc = run(["-m", "torch.distributed.launch", "--nproc_per_node=2", *(["--use_env"] if use_env else []),
                "train.py", "--distributed", *TINY, "--dataset_path", tiny_data, "--numclasses", "5",
                "--logdir", str(logdir)], tmp_path=tmp_path)
    check_one_set_of_outputs(logdir, proc)


@pytest.mark.parametrize("script", ["train_torchrun.sh", "train_ddp.sh"])
def test_shell_launchers_pass_flags_through(tmp_path, tiny_data, script):
    logdir = tmp_path / script
    proc = run(["bash", script, *TINY, "--dataset_path", tiny_data, "--numclasses", "5", "--logdir", str(logdir)],
               tmp_path=tmp_path)
    check_one_set_of_outputs(logdir, proc)
    assert "2 process(es)" in proc.stdout


def test_two_processes_train_like_one_with_double_batch(tmp_path):
    """2 processes x batch 2 must end with the parameters of 1 process x batch 4 at the same effective LR.

    Frozen batch norm, no augmentation and no ignore pixels make the two exactly comparable, so any
    difference means the ranks did not train together. SGD and cross-entropy, not the defaults: Dice is one ratio
    over the whole batch, so two half batches give another loss, and Adam's first steps are lr x sign(gradient),
    which turns float summation-order noise on near-zero gradients into steps of the full LR."""
    from data import synthetic
    root = str(tmp_path / "plain")
    synthetic.make_synthetic_voc(root, n_train=16, n_val=3, size=64, seed=2, ignore_width=0)
    common = ["--layers", "18", "--crop_size", "64", "--scale_range", "1", "1", "--hflip_prob", "0",
              "--freeze_bn", "--epochs", "1", "--workers", "0", "--head_channels", "32", "--warmup_epochs", "0",
              "--dataset_path", root, "--numclasses", "5", "--log_interval", "0", "--optimizer", "sgd", "--loss", "ce"]
    run(["train.py", *common, "--batchsize", "4", "--lr", "0.02", "--logdir", str(tmp_path / "one")])
    torchrun(2, ["train.py", "--distributed", *common, "--batchsize", "2", "--lr", "0.01",
                 "--logdir", str(tmp_path / "two")])
    one = torch.load(tmp_path / "one" / "last.pth", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "last.pth", weights_only=True)["model"]
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=lambda m: f"{key}: {m}")
    # Only meaningful if training moved the weights far beyond the tolerance: compare with the initial weights.
    import argparse
    import models
    torch.manual_seed(0)
    init = models.build_model(argparse.Namespace(model_type="deeplabv3p", layers=18, numclasses=5,
                                                 output_stride=16, head_channels=32)).state_dict()
    moved = max((one[k] - init[k]).abs().max().item() for k in one if one[k].is_floating_point())
    assert moved > 1e-3
