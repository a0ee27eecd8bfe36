"""--pretrained NAME: torchvision's weights by name from torch's hub cache (TORCH_HOME), which the tests fill with
generated state dicts under the file names torchvision expects; the network is never used (tests/offline_plugin.py
records every download and serves it from a local file, or fails it as without network)."""
import os

import pytest
import torch
import torchvision

from conftest import TINY, run, torchrun
from core import distributed
from models import weights as model_weights
from test_classification import CLASSES, CLS_TINY, cls_data  # noqa: F401 - the fixture
from test_schemas import parse, seed002_example
from utils import UserError

OFFLINE = ["--plugin", os.path.join("tests", "hub_plugin.py")]


def fill_cache(torch_home, weights, model):
    """Save `model`'s state dict where torch's hub looks for `weights`; returns the state dict."""
    folder = os.path.join(torch_home, "hub", "checkpoints")
    os.makedirs(folder, exist_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(folder, os.path.basename(weights.url)))
    return state


def offline_env(tmp_path):
    home = tmp_path / "torch_home"
    return str(home), {"TORCH_HOME": str(home), "AILAB_DOWNLOAD_LOG": str(tmp_path / "downloads.txt")}


def downloads(tmp_path):
    path = tmp_path / "downloads.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_names_resolve_for_the_models_architecture():
    enum = torchvision.models.ResNet50_Weights
    assert model_weights.resolve("DEFAULT", "resnet50", "resnet") is enum.DEFAULT
    assert model_weights.resolve("IMAGENET1K_V1", "resnet50", "resnet") is enum.IMAGENET1K_V1
    assert model_weights.resolve("ResNet50_Weights.IMAGENET1K_V2", "resnet50", "resnet") is enum.IMAGENET1K_V2
    assert [model_weights.is_weights_name(s) for s in ("DEFAULT", "IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V2",
                                                       "resnet18.pth", "runs/x/best.pth", "default")] == [
        True, True, True, False, False, False]
    for spec, arch, model_type, message in [
        ("ResNet18_Weights.IMAGENET1K_V1", "resnet50", "resnet", "ResNet18_Weights are not resnet50's weights; "
                                                                 "expected DEFAULT or one of IMAGENET1K_V1, IMAGENET1K_V2"),
        ("IMAGENET1K_V9", "resnet50", "resnet", "resnet50 has no weights named IMAGENET1K_V9"),
        ("DEFAULT", None, "unet_plain", "model unet_plain has no torchvision architecture with published weights; "
                                        "expected a local weights file"),
    ]:
        with pytest.raises(UserError) as e:
            model_weights.resolve(spec, arch, model_type)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_preprocessing_comes_from_the_weights():
    weights = torchvision.models.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1
    mean, std, resize, crop = model_weights.preprocessing(weights)
    assert (resize, crop) == (384, 384) and mean == [0.485, 0.456, 0.406] and std == [0.229, 0.224, 0.225]


def test_a_classifier_loads_default_weights_from_the_cache_without_network(tmp_path, cls_data):
    home, env = offline_env(tmp_path)
    torch.manual_seed(1)
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    state = fill_cache(home, weights, torchvision.models.resnet18())
    logdir = tmp_path / "run"
    proc = run(["train.py", *CLS_TINY, *OFFLINE, "--model_type", "resnet18", "--stem", "imagenet",
                "--pretrained", "DEFAULT", "--lr", "0", "--warmup_epochs", "0", "--dataset_path", cls_data,
                "--logdir", str(logdir)], tmp_path, env=env)
    log = proc.stdout + proc.stderr
    assert downloads(tmp_path) == []
    assert "pretrained ResNet18_Weights.IMAGENET1K_V1: normalisation mean (0.485, 0.456, 0.406) (the weights'), " \
           "std (0.229, 0.224, 0.225) (the weights'); the weights were trained on 224 px crops" in log
    assert "loaded 120 of 122 tensors from ResNet18_Weights.IMAGENET1K_V1" in log
    assert "the classifier fc is re-initialised for 4 classes (the weights have 1000)" in log
    trained = torch.load(logdir / "last.pth", weights_only=True)
    assert torch.equal(trained["model"]["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])
    assert trained["model"]["fc.weight"].shape == (4, 512)
    assert trained["args"]["mean"] == [0.485, 0.456, 0.406]  # resolved, so test.py normalises alike


def test_a_segmentation_backbone_downloads_once_per_machine_under_ddp(tmp_path, tiny_data):
    """Three processes and an empty cache: the first downloads (from the plugin's stand-in server) while the others
    wait, then all three load the file; the backbone gets the weights."""
    home, env = offline_env(tmp_path)
    torch.manual_seed(2)
    server = tmp_path / "server.pth"
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, server)
    logdir = tmp_path / "run"
    proc = torchrun(3, ["train.py", "--distributed", *TINY, *OFFLINE, "--pretrained", "IMAGENET1K_V1",
                        "--lr", "0", "--warmup_epochs", "0", "--limit_batches", "1", "--dataset_path", tiny_data,
                        "--logdir", str(logdir)], tmp_path=tmp_path, env={**env, "AILAB_FAKE_SERVER": str(server)})
    log = proc.stdout + proc.stderr
    assert downloads(tmp_path) == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert os.listdir(os.path.join(home, "hub", "checkpoints")) == ["resnet18-f37072fd.pth"]
    assert "pretrained ResNet18_Weights.IMAGENET1K_V1 -> backbone: loaded 120/120 tensors" in log
    assert "the transforms normalise with ImageNet's" in log and "which differ" not in log
    trained = torch.load(logdir / "last.pth", weights_only=True)["model"]
    assert torch.equal(trained["backbone.layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])


def test_seed002_fragments_verbatim_train_with_the_default_weights(tmp_path, cls_data):
    path = seed002_example(tmp_path, "pretrained = true")  # the document's own line
    assert parse(["--config", path]).pretrained == "DEFAULT"
    home, env = offline_env(tmp_path)
    state = fill_cache(home, torchvision.models.ResNet18_Weights.DEFAULT, torchvision.models.resnet18())
    logdir = tmp_path / "run"
    classes = sorted(CLASSES)
    proc = run(["train.py", "--config", path, *CLS_TINY, *OFFLINE, "--dataset", "folder", "--dataset_kwargs", "{}",
                "--dataset_path", cls_data, "--classes", *classes, "--numclasses", str(len(classes)),
                "--device", "cpu", "--stem", "imagenet", "--amp_dtype", "bfloat16",
                "--logdir", str(logdir)], tmp_path, env=env)
    assert "pretrained ResNet18_Weights.IMAGENET1K_V1" in proc.stdout + proc.stderr and downloads(tmp_path) == []
    trained = torch.load(logdir / "last.pth", weights_only=True)
    assert trained["args"]["pretrained"] == "DEFAULT"
    assert trained["model"]["layer1.0.conv1.weight"].shape == state["layer1.0.conv1.weight"].shape


def test_without_network_and_cache_one_line_exit_2_and_nothing_written(tmp_path, cls_data):
    home, env = offline_env(tmp_path)
    logdir = tmp_path / "run"
    proc = run(["train.py", *CLS_TINY, *OFFLINE, "--model_type", "resnet18", "--pretrained", "DEFAULT",
                "--dataset_path", cls_data, "--logdir", str(logdir)], tmp_path, env=env, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [l for l in proc.stderr.splitlines() if "resnet18-f37072fd.pth" in l]
    assert len(lines) == 1, proc.stderr
    folder = os.path.join(home, "hub", "checkpoints")
    assert (f"--pretrained ResNet18_Weights.IMAGENET1K_V1: resnet18-f37072fd.pth is not in torch's hub cache {folder} "
            f"and could not be downloaded (<urlopen error no network for {torchvision.models.ResNet18_Weights.DEFAULT.url}"
            in lines[0])
    assert "download https://download.pytorch.org/models/resnet18-f37072fd.pth where there is network" in lines[0]
    assert downloads(tmp_path) == [torchvision.models.ResNet18_Weights.DEFAULT.url]  # one machine, one attempt
    assert not os.path.exists(logdir / "last.pth") and not os.path.exists(logdir / "config.toml")
    assert not os.path.isdir(folder) or os.listdir(folder) == []  # no partial file left in the cache


def test_a_truncated_cache_file_is_named(tmp_path):
    home, env = offline_env(tmp_path)
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    folder = os.path.join(home, "hub", "checkpoints")
    os.makedirs(folder)
    with open(os.path.join(folder, os.path.basename(weights.url)), "wb") as f:
        f.write(b"PK\x03\x04 cut short")
    os.environ["TORCH_HOME"] = home
    try:
        with pytest.raises(UserError) as e:
            model_weights.fetch(weights, distributed.Dist())
    finally:
        del os.environ["TORCH_HOME"]
    assert "resnet18-f37072fd.pth could not be read" in str(e.value) and "delete it" in str(e.value)
