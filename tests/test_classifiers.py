"""models/classifiers.py: names, stems, building torchvision classifiers, and loading local weight files."""
import pytest
import torch
from torch import nn

from models.classifiers import (build_classifier, classifier_head_keys, classifier_names, load_classifier_weights,
                                resolve_arch, uses_small_stem)
from utils import UserError


@pytest.fixture(autouse=True)
def no_grad():
    torch.manual_seed(0)
    with torch.no_grad():
        yield


def one_line(error):
    text = str(error.value)
    assert "\n" not in text, text
    return text


def avgpool_input_size(model, size):
    """The spatial size of the feature map that reaches model.avgpool, and the output, for one size x size image."""
    seen = []
    handle = model.avgpool.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[-2:]))
    out = model.eval()(torch.randn(1, 3, size, size))
    handle.remove()
    return tuple(seen[0]), out


def test_names_include_family_alias_and_torchvision_architectures():
    names = classifier_names()
    assert names == sorted(names)
    assert {"resnet", "resnet18", "vit_b_16", "mobilenet_v3_small", "squeezenet1_0"} <= set(names)
    assert not any(n.startswith(("fasterrcnn", "deeplab", "raft")) for n in names)  # classification only


def test_resolve_arch():
    assert resolve_arch("resnet", 50) == "resnet50"
    assert resolve_arch("resnet", 18) == "resnet18"
    assert resolve_arch("efficientnet_b0", 50) == "efficientnet_b0"
    with pytest.raises(UserError) as e:
        resolve_arch("resnet5", 18)
    assert "resnet5" in one_line(e) and "did you mean resnet50" in one_line(e)
    assert "any torchvision classification architecture" in one_line(e)
    with pytest.raises(UserError) as e:
        resolve_arch("resnet", 7)
    assert "7" in one_line(e) and "152" in one_line(e)


def test_uses_small_stem():
    assert uses_small_stem("resnet18", "auto", 32)
    assert uses_small_stem("wide_resnet50_2", "auto", 64)
    assert not uses_small_stem("resnet18", "auto", 96)
    assert not uses_small_stem("mobilenet_v3_small", "auto", 32)
    assert uses_small_stem("resnext50_32x4d", "small", 224)
    assert not uses_small_stem("resnet18", "imagenet", 32)
    with pytest.raises(UserError) as e:
        uses_small_stem("mobilenet_v3_small", "small", 32)
    assert "mobilenet_v3_small" in one_line(e) and "resnet" in one_line(e)
    with pytest.raises(UserError) as e:
        uses_small_stem("resnet18", "tiny", 32)
    assert "tiny" in one_line(e)


def test_small_stem_keeps_resolution_for_small_images():
    model = build_classifier("resnet", 10, layers=18, stem="small", image_size=32)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.bias is None
    size, out = avgpool_input_size(model, 32)
    assert size == (4, 4) and out.shape == (1, 10)
    auto = build_classifier("resnet18", 10, image_size=32)  # auto: small stem at <= 64 px
    assert avgpool_input_size(auto, 32)[0] == (4, 4)
    imagenet = build_classifier("resnet18", 10, stem="imagenet", image_size=32)
    size, out = avgpool_input_size(imagenet, 32)
    assert size == (1, 1) and out.shape == (1, 10)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "googlenet"])
def test_other_architectures_build_and_classify(name):
    model = build_classifier(name, 7, image_size=64).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)


def test_googlenet_returns_a_tensor_in_training_mode():
    out = build_classifier("googlenet", 3, image_size=64).train()(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)  # no auxiliary-logit namedtuple


def test_vit_follows_image_size():
    model = build_classifier("vit_b_16", 5, image_size=32).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(UserError) as e:
        build_classifier("vit_b_16", 5, image_size=40)
    assert "40" in one_line(e) and "16" in one_line(e)


def test_build_errors():
    with pytest.raises(UserError) as e:
        build_classifier("mobilenet_v3_small", 10, stem="small", image_size=32)
    assert "mobilenet_v3_small" in one_line(e)
    with pytest.raises(UserError) as e:
        build_classifier("resnet18", 0)
    assert "0" in one_line(e)
    with pytest.raises(UserError):
        build_classifier("no_such_net", 10)


def test_classifier_head_keys():
    assert sorted(classifier_head_keys(build_classifier("resnet18", 10))) == ["fc.bias", "fc.weight"]
    model = build_classifier("mobilenet_v3_small", 10)
    last_linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert sorted(classifier_head_keys(model)) == [f"{last_linear}.bias", f"{last_linear}.weight"]
    assert model.get_submodule(last_linear).out_features == 10
    assert sorted(classifier_head_keys(build_classifier("squeezenet1_1", 10))) == [
        "classifier.1.bias", "classifier.1.weight"]


def test_load_weights_with_a_different_class_count(tmp_path):
    saved = build_classifier("resnet18", 1000, stem="imagenet").state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(saved, path)
    model = build_classifier("resnet18", 10, stem="imagenet")
    initial_fc = model.fc.weight.clone()
    report = load_classifier_weights(model, str(path))
    assert "\n" not in report and "fc.weight" in report
    assert f"loaded {len(saved) - 2} of {len(saved)}" in report
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, saved[key]), key
    assert torch.equal(model.fc.weight, initial_fc)
    with pytest.raises(UserError) as e:
        load_classifier_weights(model, str(path), strict=True)
    assert "fc.weight" in one_line(e)


def test_load_wrapped_and_prefixed_weights(tmp_path):
    saved = build_classifier("resnet18", 10, stem="small").state_dict()
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in saved.items()}}, path)
    model = build_classifier("resnet18", 10, stem="small")
    report = load_classifier_weights(model, str(path), strict=True)
    assert f"loaded {len(saved)} of {len(saved)}" in report
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    # ImageNet-stem weights into a small-stem model: conv1 differs in shape and stays as initialised.
    imagenet = tmp_path / "imagenet.pth"
    torch.save({"model": build_classifier("resnet18", 10, stem="imagenet").state_dict()}, imagenet)
    conv1 = model.conv1.weight.clone()
    report = load_classifier_weights(model, str(imagenet))
    assert "conv1.weight" in report and torch.equal(model.conv1.weight, conv1)


def test_load_weights_errors(tmp_path):
    model = build_classifier("resnet18", 10)
    missing = tmp_path / "missing.pth"
    with pytest.raises(UserError) as e:
        load_classifier_weights(model, str(missing))
    assert str(missing) in one_line(e) and "weights by name (e.g. DEFAULT)" in one_line(e)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(UserError) as e:
        load_classifier_weights(model, str(listed))
    assert str(listed) in one_line(e) and "state dict" in one_line(e)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError) as e:
        load_classifier_weights(model, str(garbage))
    assert str(garbage) in one_line(e)
    other = tmp_path / "other.pth"
    torch.save({"backbone.weight": torch.zeros(3)}, other)
    with pytest.raises(UserError) as e:
        load_classifier_weights(model, str(other))
    assert str(other) in one_line(e) and "no tensor" in one_line(e)
