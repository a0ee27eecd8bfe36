"""The training-recipe switches: accumulation, clipping, AMP, EMA, early stopping, freezing, pretrained weights,
compile fallback and determinism; unit level where possible, plus one real train.py run and one torchrun run."""
import contextlib
import json
import logging
import os
from argparse import Namespace

import pytest
import torch
import torchvision
from torch import nn

from core import distributed
from engine import loop as engine
from engine import faults
from engine import recipe
import utils
from conftest import TINY, run, torchrun
from models import build_model
from models.pretrained import load_pretrained
from engine.records import Recorder


def tiny_net():
    torch.manual_seed(0)  # no batch norm: a micro-batch must not change what a batch computes
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))


def mse(output, target):
    loss = ((output - target) ** 2).mean()
    return loss, {"mse": loss.detach()}


def train_epoch(model, batches, accum=1, clip=None, amp=None, lr=0.05, momentum=0.9, **optim):
    """One engine epoch over a list of batches; returns (model, optimizer updates)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, **optim)
    args = Namespace(accum_steps=accum, limit_batches=None, clip_grad_norm=clip, channels_last=False, epochs=1,
                     freeze_bn=False, log_interval=0, no_progress=True, nan_policy="stop", max_nan_skips=0)
    run = engine.Run(model, mse, optimizer, amp or recipe.Amp(), faults.Guard(args, handle_signals=False),
                     Recorder(args, distributed.Dist(rank=1), ""), distributed.Dist(), args, lambda step: lr)
    _, steps = engine.train_one_epoch(run, batches, 0, 0)
    return model, steps


def samples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randn(n, 2, 6, 6, generator=g)


def batched(x, y, sizes):
    out, start = [], 0
    for size in sizes:
        out.append((x[start:start + size], y[start:start + size]))
        start += size
    return out


def assert_same_parameters(a, b, atol=1e-5):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=f"{name} differs")


def test_accumulation_equals_a_larger_batch():
    x, y = samples(16)
    big, big_steps = train_epoch(tiny_net(), batched(x, y, [4] * 4), weight_decay=1e-3)
    small, small_steps = train_epoch(tiny_net(), batched(x, y, [2] * 8), accum=2, weight_decay=1e-3)
    assert (big_steps, small_steps) == (4, 4)  # the schedule counts updates, not batches
    assert_same_parameters(big, small)
    untouched = tiny_net()
    assert not torch.allclose(untouched[0].weight, small[0].weight)


def test_short_last_group_still_updates():
    x, y = samples(10, seed=1)
    reference, ref_steps = train_epoch(tiny_net(), batched(x, y, [4, 4, 2]))
    accumulated, steps = train_epoch(tiny_net(), batched(x, y, [2] * 5), accum=2)
    assert (ref_steps, steps) == (3, 3)
    assert_same_parameters(reference, accumulated)


def test_ddp_micro_steps_do_not_all_reduce(tmp_path):
    torchrun(2, ["tests/accum_probe.py", str(tmp_path)], tmp_path=tmp_path, timeout=120)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        per_update = r["k1"]["allreduce_calls"] / r["k1"]["updates"]  # buckets per synchronised backward
        assert r["k1"]["updates"] == 5 and r["k2"]["updates"] == 3
        assert r["k2"]["allreduce_calls"] == 3 * per_update  # 5 backwards, only the 3 that update reduce
    assert results[0]["k2"]["checksum"] == results[1]["k2"]["checksum"]  # the ranks stay in step


def test_clip_grad_norm_bounds_the_update():
    x, y = samples(4)
    y = y * 100  # a huge loss, so the gradient norm is far above the limit
    before = tiny_net()
    clipped, _ = train_epoch(tiny_net(), [(x, y)], clip=0.5, lr=1.0, momentum=0.0)
    free, _ = train_epoch(tiny_net(), [(x, y)], lr=1.0, momentum=0.0)
    step = torch.cat([(a - b).flatten() for a, b in zip(clipped.parameters(), before.parameters())])
    free_step = torch.cat([(a - b).flatten() for a, b in zip(free.parameters(), before.parameters())])
    assert step.norm().item() == pytest.approx(0.5, rel=1e-4)  # lr 1 x gradient clipped to norm 0.5
    assert free_step.norm().item() > 10


def test_bfloat16_autocast_trains_one_step_on_cpu():
    seen = []
    model = tiny_net()
    model[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    amp = recipe.Amp(torch.bfloat16, "cpu")  # what setup_amp gives where bfloat16 is native (test below)
    before = model[0].weight.detach().clone()
    train_epoch(model, [samples(2)], amp=amp)
    assert seen == [torch.bfloat16]
    assert not amp.scaler.is_enabled()  # bfloat16 needs no loss scaling
    assert torch.isfinite(model[0].weight).all() and not torch.equal(before, model[0].weight)


@pytest.mark.parametrize("amx, avx512_bf16", [(True, False), (False, True), (False, False)])
def test_amp_on_cpu_runs_bfloat16_only_where_it_is_native(monkeypatch, caplog, amx, avx512_bf16):
    """--amp on an x86 CPU: bfloat16 autocast with AMX or AVX512-BF16; elsewhere float32 and one line saying why
    (float16, which needs CUDA, is tried as bfloat16 first)."""
    monkeypatch.setattr(recipe.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    native = amx or avx512_bf16
    assert recipe.native_bf16("cpu") == native
    for dtype in ("bfloat16", "float16"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ailab"):
            amp = recipe.setup_amp(Namespace(amp=True, amp_dtype=dtype), torch.device("cpu"))
        assert amp.dtype == (torch.bfloat16 if native else None) and not amp.scaler.is_enabled()
        assert amp.describe() == ("autocast bfloat16 (no loss scaling needed)" if native else "float32")
        assert ("float16 needs CUDA" in caplog.text) == (dtype == "float16")
        fallback = [r.message for r in caplog.records if "running in float32" in r.message]
        assert len(fallback) == (0 if native else 1)
        assert native or "--amp: running in float32: this CPU has no bfloat16 arithmetic (AMX or AVX512-BF16)" \
            in fallback[0]
    assert recipe.setup_amp(Namespace(amp=False, amp_dtype="bfloat16"), torch.device("cpu")).dtype is None


def test_amp_on_a_gpu_without_native_bfloat16_runs_float16(monkeypatch, caplog):
    """V100/T4 report bfloat16 as supported when emulation counts: --amp must ask for native support only and fall
    back to float16 (setup_amp adds its GradScaler) with one line."""
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    for native in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, native=native: native or including_emulation)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ailab"):
            dtype = recipe.resolve_amp(Namespace(amp=True, amp_dtype="bfloat16"), torch.device("cuda", 0))
        assert dtype == (torch.bfloat16 if native else torch.float16)
        assert ("--amp: running float16 with a GradScaler: this GPU has no native bfloat16" in caplog.text) != native


def test_early_stopping_fires_at_the_right_epoch():
    stopper = recipe.EarlyStopping(patience=2, min_delta=0.01)
    metrics = [0.30, 0.40, 0.405, 0.41, 0.43, 0.42, 0.435, 0.44]
    # 0.405 and 0.41 are within min_delta of 0.40 (epochs 3, 4): two bad epochs -> stop after epoch 4.
    stopped_after = next(epoch for epoch, m in enumerate(metrics, 1) if stopper.update(m, epoch))
    assert stopped_after == 4
    assert (stopper.best, stopper.best_epoch) == (0.40, 2)
    assert "best 0.4000 at epoch 2" in stopper.reason()
    resumed = recipe.EarlyStopping(patience=3, min_delta=0.0)  # counters from a checkpoint carry on
    resumed.load_state_dict({"best": 0.5, "best_epoch": 7, "bad_epochs": 2})
    assert resumed.update(0.49, 8) is True
    fresh = recipe.EarlyStopping(patience=3, min_delta=0.0)
    fresh.load_state_dict({"best": 0.5, "best_epoch": 7, "bad_epochs": 2})
    assert fresh.update(0.6, 8) is False and fresh.bad_epochs == 0
    assert recipe.EarlyStopping().update(0.0, 1) is False  # no patience: never stops


def test_ema_follows_the_weights_slowly():
    model = tiny_net()
    ema = recipe.build_ema(model, decay=0.5)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update_parameters(model)  # the first update copies
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module[0].weight, start + 1.0)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module[0].weight, start + 1.5)  # halfway with decay 0.5
    state = recipe.ema_state(ema)
    assert set(state) == set(model.state_dict())  # loadable as the model itself


def test_ema_equals_torchs_averaged_model_and_keeps_no_counter_tensor():
    """The fused EMA gives torch's AveragedModel (EMA of parameters and buffers) to 1e-6 over a few updates of a model
    with batch norm, and holds no tensor besides the model's (AveragedModel's n_averaged is a tensor that each update
    reads)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    ours = recipe.build_ema(model, 0.9)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        model(torch.randn(2, 3, 8, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ours.update_parameters(model)
        reference.update_parameters(model)
    for (name, mine), theirs in zip(ours.module.state_dict().items(), reference.module.state_dict().values()):
        if mine.is_floating_point():
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6, msg=name)
    assert set(ours.state_dict()) == {f"module.{k}" for k in model.state_dict()}


def test_compile_failure_falls_back_to_eager(caplog):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    model = tiny_net()
    wrapped = recipe.CompileFallback(model, backend=broken_backend)
    x = torch.randn(1, 3, 6, 6)
    with caplog.at_level(logging.WARNING, logger="ailab"):
        out = wrapped(x)
    assert wrapped.failed and "eager mode" in caplog.text
    torch.testing.assert_close(out, model(x))
    assert list(wrapped.state_dict()) == ["eager." + k for k in model.state_dict()]


def test_compile_fallback_lets_other_errors_through():
    """Only torch.compile's own errors fall back; an out-of-memory on a later call propagates (running the forward
    again on one rank would put its DDP collectives out of step)."""
    model = tiny_net()
    wrapped = recipe.CompileFallback(model, backend="eager")
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(wrapped(x), model(x))

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    object.__setattr__(wrapped, "compiled", out_of_memory)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        wrapped(x)
    assert not wrapped.failed


def test_freeze_matches_globs_and_rejects_unknown_patterns():
    model = build_model(Namespace(model_type="deeplabv3p", layers=18, numclasses=5, output_stride=16,
                                  head_channels=16))
    tensors, elements = recipe.freeze(model, ["backbone.layer1*", "backbone.conv1.*"])
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert tensors == len(frozen) and frozen[0] == "backbone.conv1.weight"
    assert all(n.startswith(("backbone.layer1.", "backbone.conv1.")) for n in frozen)
    assert elements == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    with pytest.raises(utils.UserError, match="'head.nothing\\*' matches no parameter"):
        recipe.freeze(model, ["head.nothing*"])


def small_model():
    return build_model(Namespace(model_type="deeplabv3p", layers=18, numclasses=5, output_stride=16,
                                 head_channels=16))


def test_pretrained_loads_prefixed_state_dict_and_reports_mismatches(tmp_path):
    source = small_model()
    state = {"module." + k: v for k, v in source.state_dict().items()}  # as saved from a DDP model
    state["module.head.classifier.weight"] = torch.zeros(21, 16, 1, 1)  # trained with other classes
    state["module.extra.weight"] = torch.zeros(3)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": state}, path)
    target = small_model()
    report = load_pretrained(target, str(path))
    assert "-> model" in report and "unexpected 1 (extra.weight)" in report
    assert "shape mismatch 1 (head.classifier.weight (21, 16, 1, 1) vs (5, 16, 1, 1))" in report
    assert "missing 0" in report
    torch.testing.assert_close(target.backbone.layer1[0].conv1.weight, source.backbone.layer1[0].conv1.weight)
    assert not torch.equal(target.head.classifier.weight, torch.zeros(5, 16, 1, 1))  # left as initialised
    with pytest.raises(utils.UserError, match="--strict_load"):
        load_pretrained(small_model(), str(path), strict=True)


def test_pretrained_torchvision_resnet_goes_into_the_backbone(tmp_path):
    torch.manual_seed(3)
    resnet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    model = small_model()
    report = load_pretrained(model, str(path), strict=True)  # fc.* is the ImageNet classifier: ignored
    assert "-> backbone" in report and "missing 0" in report and "unexpected 0" in report
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(utils.UserError, match="strict_load"):  # a ResNet-50 file for a ResNet-18 model
        load_pretrained(small_model(), str(path), strict=True)
    torch.save({"weights": [1, 2]}, path)
    with pytest.raises(utils.UserError, match="holds no state dict"):
        load_pretrained(small_model(), str(path))
    with pytest.raises(utils.UserError, match="does not exist"):
        load_pretrained(small_model(), str(tmp_path / "missing.pth"))


def test_deterministic_flag_sets_torch_state():
    try:
        recipe.setup_determinism(True, torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_recipe_flags_in_a_real_run(tmp_path, tiny_data, trained):
    """One train.py run with most recipe flags: each must show in the log or in the checkpoint."""
    logdir, _ = trained
    pretrained = os.path.join(logdir, "last.pth")
    out = tmp_path / "recipe"
    proc = run(["train.py", *TINY, "--dataset_path", tiny_data, "--logdir", str(out), "--epochs", "3",
                "--limit_batches", "2", "--pretrained", pretrained, "--freeze", "backbone.layer1*",
                "--amp", "--accum_steps", "2", "--ema_decay", "0.9", "--clip_grad_norm", "1.0", "--channels_last",
                "--sync_bn", "--deterministic", "--early_stop_patience", "1", "--early_stop_min_delta", "1.0"],
               tmp_path)
    log = proc.stdout + proc.stderr
    assert f"pretrained {pretrained} -> model: loaded" in log and "missing 0" in log
    assert "froze 12 parameter tensors" in log  # layer1 of ResNet-18: 2 blocks x (2 convs + 2 BNs x 2)
    assert "--sync_bn ignored: a single process" in log
    assert ("autocast bfloat16" if recipe.native_bf16("cpu") else "--amp: running in float32") in log
    assert "EMA decay 0.9" in log
    assert "early stopping: val mIoU has not risen by more than 1 for 1 epochs" in log
    assert "stopped after epoch 2 of 3" in log
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["early_stop"]["bad_epochs"] == 1 and (out / "best.pth").exists()
    source = torch.load(pretrained, weights_only=True)["model"]
    for name, value in ckpt["model"].items():
        if name.startswith("backbone.layer1.") and ("conv" in name or name.endswith(("weight", "bias"))):
            assert torch.equal(value, source[name]), name  # frozen: bit-identical
    assert not torch.equal(ckpt["model"]["head.classifier.weight"], source["head.classifier.weight"])
    assert set(ckpt["ema"]) == set(ckpt["model"])
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"] if "layer4" in k)
    assert "raw_miou" in ckpt["val"]
    # test.py evaluates the EMA weights on request; a checkpoint without them says so.
    proc = run(["test.py", "--checkpoint", str(out / "last.pth"), "--ema", "--workers", "0",
                "--save_path", str(tmp_path / "ema-test")], tmp_path)
    assert "mIoU" in proc.stdout
    proc = run(["test.py", "--checkpoint", pretrained, "--ema", "--save_path", str(tmp_path / "x")], tmp_path,
               check=False)
    assert proc.returncode == 2 and "holds no EMA weights" in proc.stderr
