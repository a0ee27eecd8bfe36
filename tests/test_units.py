"""Metrics, loss, LR schedule and launcher-environment parsing against hand-computed values."""
import argparse

import numpy as np
import pytest
import torch

from core import distributed
import utils
from models.losses import cross_entropy
from evaluation.metrics import ConfusionMatrix, class_map
from engine.optim import lr_at


def test_confusion_matrix_against_hand_count():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm = ConfusionMatrix(3)
    cm.update(target, pred)
    # rows = truth, columns = prediction; the 255 pixel is not counted
    assert cm.mat.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    m = cm.compute()
    iou = [1 / (2 + 2 - 1), 2 / (3 + 3 - 2), 1 / (2 + 2 - 1)]
    assert m["iou"] == pytest.approx(iou)
    assert m["miou"] == pytest.approx(np.mean(iou))
    assert m["acc"] == pytest.approx(4 / 7)
    assert m["pixels"] == 7


def test_class_map_is_argmax_with_the_first_of_tied_scores():
    scores = torch.rand(3, 6, 17, 9).round(decimals=1)  # coarse values: many ties across classes
    assert torch.equal(class_map(scores), scores.argmax(1))
    assert torch.equal(class_map(scores[0], 0), scores[0].argmax(0))
    tied = torch.tensor([[0.2, 0.5, 0.5, 0.1]])
    assert class_map(tied).tolist() == [1]


def test_confusion_matrix_skips_labels_outside_the_classes_and_counts_a_batch_once():
    target = torch.tensor([[[0, 3, 255], [1, 1, -1]]])
    probs = torch.nn.functional.one_hot(torch.tensor([[[1, 0, 2], [1, 0, 0]]]), 3).permute(0, 3, 1, 2).float()
    cm = ConfusionMatrix(3)
    cm.add(probs, target)
    assert cm.mat.tolist() == [[0, 1, 0], [1, 1, 0], [0, 0, 0]]


def test_absent_class_is_left_out_of_the_mean():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    m = cm.compute()
    assert m["iou"][2] is None
    assert m["miou"] == pytest.approx((1 / 2 + 1 / 2) / 2)


def test_cross_entropy_ignores_255_and_is_zero_when_all_ignored():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, :2] = 255
    expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    assert cross_entropy(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    empty = cross_entropy(logits, torch.full_like(target, 255))
    assert empty.item() == 0.0
    empty.backward()
    assert torch.isfinite(logits.grad).all()


def test_poly_lr_with_warmup():
    # 10 epochs of 10 steps; warmup 1 epoch from 0.1 x LR (tests/test_optim.py covers the other schedules)
    args = argparse.Namespace(epochs=10, lr_update_policy="iter", lr_scheduler="poly", warmup_epochs=1.0,
                              warmup_ratio=0.1, warmup_lr=None, poly_power=0.9, min_lr=0.0)
    assert lr_at(0, 10, args, 1.0) == pytest.approx(0.1)
    assert lr_at(5, 10, args, 1.0) == pytest.approx(0.55)
    assert lr_at(10, 10, args, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 10, args, 1.0) == pytest.approx(0.5 ** 0.9)
    assert lr_at(100, 10, args, 1.0) == 0.0


def dist_args(**kw):
    return argparse.Namespace(**{"distributed": True, "local_rank": None, **kw})


@pytest.mark.parametrize("env, expected", [
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, ("torchrun", 3, 4, 1, 2)),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, ("SLURM", 5, 8, 1, None)),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, ("OpenMPI", 2, 3, 0, 3)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, ("PMI", 1, 2, 0, None)),
    # torchrun inside a SLURM allocation: torchrun's variables win
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
     ("torchrun", 1, 2, 1, None)),
    # mpirun inside an sbatch job: every process inherits the batch step's SLURM_PROCID=0; MPI's variables win
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
     ("OpenMPI", 1, 2, 0, None)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, ("PMI", 1, 2, 0, None)),
])
def test_launcher_environment(monkeypatch, env, expected):
    for _, *keys in distributed.LAUNCHER_ENV:
        for k in keys:
            monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.launcher_env(dist_args()) == expected


def test_slurm_variables_need_distributed_flag(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.launcher_env(dist_args(distributed=False)) is None


def test_missing_master_addr_is_a_clear_error(monkeypatch):
    for _, *keys in distributed.LAUNCHER_ENV:
        for k in keys:
            monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    args = dist_args(device="cpu", world_size=None, dist_url="env://", dist_backend=None, dist_timeout=10)
    with pytest.raises(utils.UserError, match="MASTER_ADDR and MASTER_PORT not set.*SLURM"):
        distributed.init_distributed(args)
