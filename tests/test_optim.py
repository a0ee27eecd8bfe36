"""LR schedules against their formulas, parameter groups by hand count, and each optimizer taking a step."""
import logging
import math

import pytest
import torch
import torch.nn as nn

import models
import train
from engine.optim import build_optimizer, load_optimizer_state, lr_at, param_groups, set_lr
from utils import UserError

STEPS = 10   # steps per epoch in the schedule tests; --epochs 10 makes 100 steps in all


def flags(*argv):
    return train.get_args_parser().parse_args(["--epochs", "10", *argv])


def lrs(args, steps, base_lr=1.0):
    return [lr_at(s, STEPS, args, base_lr) for s in steps]


def test_poly_default_with_warmup_ratio():
    args = flags()  # poly, power 0.9, warmup 0.5 epochs = 5 steps from 0.1 x LR
    assert lrs(args, [0, 2, 5, 50, 100]) == pytest.approx(
        [0.1, 0.1 + 0.9 * 2 / 5, 1.0, (1 - 45 / 95) ** 0.9, 0.0])


def test_poly_with_warmup_lr_and_min_lr():
    args = flags("--warmup_lr", "0.001", "--min_lr", "0.1", "--poly_power", "2")
    assert lrs(args, [0, 4, 5, 50, 100]) == pytest.approx(
        [0.001, 0.001 + 0.999 * 4 / 5, 1.0, 0.1 + 0.9 * (1 - 45 / 95) ** 2, 0.1])


def test_cosine():
    args = flags("--lr_scheduler", "cosine", "--warmup_epochs", "0", "--min_lr", "0.01")
    assert lrs(args, [0, 25, 50, 100]) == pytest.approx(
        [1.0, 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi / 4)), 0.01 + 0.99 * 0.5, 0.01])
    # With warmup the cosine starts where warmup ends: 1 epoch, so half-way is step 10 + 90 / 2.
    args = flags("--lr_scheduler", "cosine", "--warmup_epochs", "1", "--warmup_ratio", "0")
    assert lrs(args, [0, 5, 10, 55, 100], base_lr=0.4) == pytest.approx([0.0, 0.2, 0.4, 0.2, 0.0])


def test_step():
    args = flags("--lr_scheduler", "step", "--step_size", "3", "--gamma", "0.5", "--warmup_epochs", "0")
    assert lrs(args, [0, 29, 30, 59, 60, 99]) == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.125])


def test_multistep_counts_epochs_from_the_start_of_the_run():
    args = flags("--lr_scheduler", "multistep", "--milestones", "2", "5", "--warmup_epochs", "1")
    assert lrs(args, [0, 5, 10, 19, 20, 49, 50, 99]) == pytest.approx(
        [0.1, 0.55, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    # A milestone inside warmup: warmup ends where the schedule then stands (0.1), not at the base LR.
    args = flags("--lr_scheduler", "multistep", "--milestones", "1", "--warmup_epochs", "2", "--warmup_lr", "0")
    assert lrs(args, [0, 10, 20, 99]) == pytest.approx([0.0, 0.05, 0.1, 0.1])


def test_constant():
    args = flags("--lr_scheduler", "constant", "--warmup_epochs", "0.25", "--warmup_ratio", "0.5")
    # 0.25 x 10 steps rounds to 2 warmup steps
    assert lrs(args, [0, 1, 2, 99], base_lr=2.0) == pytest.approx([1.0, 1.5, 2.0, 2.0])


@pytest.mark.parametrize("schedule", [[], ["--lr_scheduler", "cosine"],
                                      ["--lr_scheduler", "step", "--step_size", "3"],
                                      ["--lr_scheduler", "multistep", "--milestones", "3", "7"]])
def test_epoch_policy_is_constant_within_an_epoch(schedule):
    per_epoch = flags(*schedule, "--lr_update_policy", "epoch", "--warmup_epochs", "2")
    per_iter = flags(*schedule, "--warmup_epochs", "2")
    for epoch in range(10):
        first = lr_at(epoch * STEPS, STEPS, per_iter, 1.0)
        assert lrs(per_epoch, range(epoch * STEPS, (epoch + 1) * STEPS)) == pytest.approx([first] * STEPS)
    assert lr_at(0, STEPS, per_epoch, 1.0) < lr_at(STEPS, STEPS, per_epoch, 1.0)  # warmup rises epoch by epoch


@pytest.mark.parametrize("argv, message", [
    (["--lr_scheduler", "multistep"], "--milestones None .* one or more epochs"),
    (["--lr_scheduler", "multistep", "--milestones", "0"], r"--milestones \[0\] .* epochs >= 1"),
    (["--lr_scheduler", "step"], "--step_size None .* whole number of epochs"),
    (["--lr_scheduler", "cosine", "--min_lr", "0.5"], "--min_lr 0.5 .* at most the LR 0.02"),
    (["--gamma", "0"], r"--gamma 0.0 .* \(0, 1\]"),
    (["--warmup_epochs", "-1"], "--warmup_epochs -1.0 .* >= 0"),
    (["--backbone_lr_mult", "-0.1"], "--backbone_lr_mult -0.1 .* >= 0"),
    (["--weight_decay", "nan"], "--weight_decay nan .* >= 0"),
])
def test_bad_flags_are_clear_errors(argv, message):
    with pytest.raises(UserError, match=message):
        build_optimizer(flags(*argv), nn.Linear(2, 2), 0.02)


def test_a_flag_the_scheduler_ignores_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="ailab"):
        build_optimizer(flags("--milestones", "3"), nn.Linear(2, 2), 0.02)
    assert "--milestones has no effect with --lr_scheduler poly" in caplog.text


class Toy(nn.Module):
    """By hand: backbone = 1 conv weight + 2 BN params; head = 2 conv weights + 2 conv biases + 2 GroupNorm params."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))

    def forward(self, x):
        return self.head(self.backbone(x))


def sizes(groups):
    return {g["name"]: len(g["params"]) for g in groups}


def test_default_is_one_group_in_parameter_order():
    model = Toy()
    optimizer = build_optimizer(flags(), model, 0.02)
    (group,) = optimizer.param_groups
    assert group["params"] == list(model.parameters())  # so checkpoints from before the groups still resume
    assert (group["weight_decay"], group["lr_mult"]) == (1e-4, 1.0)
    assert isinstance(optimizer, torch.optim.AdamW) and group["fused"]  # one kernel per step on the CPU
    (group,) = build_optimizer(flags("--optimizer", "sgd"), model, 0.02).param_groups
    assert (group["momentum"], group["fused"]) == (0.9, True)


def test_groups_by_hand_count():
    model = Toy()
    groups = param_groups(model, 1e-4, no_decay_norm_bias=True, backbone_lr_mult=0.1)
    assert sizes(groups) == {"backbone": 1, "backbone_no_decay": 2, "head": 2, "head_no_decay": 4}
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["params"] == [model.backbone[0].weight]
    assert by_name["head"]["params"] == [model.head[0].weight, model.head[2].weight]
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0, 1e-4, 0.0]
    assert sizes(param_groups(model, 1e-4, no_decay_norm_bias=True)) == {"all": 3, "all_no_decay": 6}
    assert sizes(param_groups(model, 1e-4, backbone_lr_mult=0.5)) == {"backbone": 3, "head": 6}


def test_backbone_lr_after_set_lr():
    optimizer = build_optimizer(flags("--backbone_lr_mult", "0.1", "--no_decay_norm_bias"), Toy(), 0.02)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
        {"backbone": 0.002, "backbone_no_decay": 0.002, "head": 0.02, "head_no_decay": 0.02})
    set_lr(optimizer, 0.5)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
        {"backbone": 0.05, "backbone_no_decay": 0.05, "head": 0.5, "head_no_decay": 0.5})


def test_deeplab_groups_cover_every_parameter_once():
    args = flags("--layers", "18", "--head_channels", "32", "--numclasses", "5")
    model = models.build_model(args)
    groups = {g["name"]: g["params"] for g in param_groups(model, 1e-4, True, 0.1)}
    ids = [id(p) for params in groups.values() for p in params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    # In these models the 1-D parameters are exactly the norm-layer parameters and the biases.
    backbone = {id(p) for p in model.backbone.parameters()}
    vectors = {id(p) for p in model.parameters() if p.ndim == 1}
    assert {id(p) for p in groups["backbone_no_decay"]} == vectors & backbone
    assert {id(p) for p in groups["head_no_decay"]} == vectors - backbone
    assert {id(p) for p in groups["backbone"]} == backbone - vectors


def test_model_without_backbone_puts_everything_in_the_head_groups(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    with caplog.at_level(logging.WARNING, logger="ailab"):
        groups = param_groups(model, 1e-4, no_decay_norm_bias=True, backbone_lr_mult=0.1)
    assert sizes(groups) == {"all": 2, "all_no_decay": 4}
    assert all(g["lr_mult"] == 1.0 for g in groups)
    assert "--backbone_lr_mult 0.1 has no effect" in caplog.text


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW)])
def test_each_optimizer_steps_and_resumes(name, cls):
    torch.manual_seed(0)
    model = Toy()
    argv = ["--optimizer", name, "--no_decay_norm_bias", "--backbone_lr_mult", "0.1"]
    optimizer = build_optimizer(flags(*argv), model, 0.01)
    assert type(optimizer) is cls
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 3, 8, 8)).square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    again = build_optimizer(flags(*argv), model, 0.01)
    again.load_state_dict(optimizer.state_dict())
    assert [g["name"] for g in again.param_groups] == [g["name"] for g in optimizer.param_groups]


def test_adamw_decays_only_the_decay_groups():
    model = Toy()
    optimizer = build_optimizer(flags("--optimizer", "adamw", "--weight_decay", "0.5", "--no_decay_norm_bias"),
                                model, 0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # a zero gradient leaves only the decoupled decay: p <- p x (1 - lr x wd)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    optimizer.step()
    for group in optimizer.param_groups:
        factor = 1 - 0.1 * group["weight_decay"]
        for p in group["params"]:
            assert torch.allclose(p, before[id(p)] * factor)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]


def checkpoint(argv, model):
    optimizer = build_optimizer(flags(*argv), model, 0.01)
    model(torch.randn(2, 3, 8, 8)).square().mean().backward()
    optimizer.step()
    return {"args": vars(flags(*argv)), "optimizer": optimizer.state_dict()}


def test_resume_keeps_the_state_and_takes_this_runs_group_settings():
    model = Toy()
    ckpt = checkpoint(["--optimizer", "adamw", "--backbone_lr_mult", "0.1"], model)
    optimizer = build_optimizer(flags("--optimizer", "adamw", "--backbone_lr_mult", "0.5", "--weight_decay", "0.3"),
                                model, 0.01)
    load_optimizer_state(optimizer, ckpt, "last.pth")
    assert [g["lr_mult"] for g in optimizer.param_groups] == [0.5, 1.0]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.3, 0.3]
    assert all(torch.count_nonzero(optimizer.state[p]["exp_avg"]) for p in model.parameters())


@pytest.mark.parametrize("argv", [["--optimizer", "adam"], ["--no_decay_norm_bias"]])
def test_resume_with_other_groups_or_optimizer_is_a_clear_error(argv):
    model = Toy()
    ckpt = checkpoint(["--optimizer", "sgd"], model)
    with pytest.raises(UserError, match="checkpoint last.pth has a sgd optimizer .* resume with the same"):
        load_optimizer_state(build_optimizer(flags("--optimizer", "sgd", *argv), model, 0.01), ckpt, "last.pth")


def test_checkpoint_from_before_the_groups_resumes():
    model = Toy()
    old = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    ckpt = {"args": {}, "optimizer": old.state_dict()}
    load_optimizer_state(build_optimizer(flags("--optimizer", "sgd"), model, 0.01), ckpt, "last.pth")


def test_checkpoint_saved_before_the_optimizer_flag_resumes_with_its_sgd_and_ce(tmp_path):
    """Such a run trained with the defaults of its time; today's defaults (adamw, ce + dice) must not replace them."""
    from argparse import Namespace

    from engine.checkpoint import saved_settings
    path = tmp_path / "old.pth"
    torch.save({"args": {"lr": 0.02, "epochs": 3}, "model": {}, "epoch": 1}, path)
    settings = saved_settings(Namespace(resume=str(path), logdir=None))
    assert (settings["optimizer"], settings["loss"], settings["lr"]) == ("sgd", ["ce"], 0.02)
    torch.save({"args": {"optimizer": "adam", "loss": ["focal"]}, "model": {}, "epoch": 1}, path)
    assert saved_settings(Namespace(resume=str(path), logdir=None))["optimizer"] == "adam"
