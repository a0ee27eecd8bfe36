"""Model registry, backbone strides and head output shapes (CPU, small inputs)."""
from argparse import Namespace

import pytest
import torch
import torchvision

from models import MODELS, build_model
from models.backbone import ResNetBackbone
from utils import UserError

HEADS = ["res50_ASPP", "deeplabv3p"]


def make_args(**overrides):
    args = dict(model_type="deeplabv3p", layers=18, numclasses=5, output_stride=16, head_channels=32)
    args.update(overrides)
    return Namespace(**args)


@pytest.mark.parametrize("model_type", HEADS)
@pytest.mark.parametrize("layers,output_stride",
                         [(18, 16), (34, 16), (50, 16), (101, 16), (152, 16), (18, 8), (50, 8)])
def test_logits_match_input_size(model_type, layers, output_stride):
    model = build_model(make_args(model_type=model_type, layers=layers, output_stride=output_stride)).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 65, 81))
    assert logits.shape == (2, 5, 65, 81)


@pytest.mark.parametrize("model_type", HEADS)
def test_trains_with_batch_size_one(model_type):
    # Image pooling sees a 1x1 map here; BatchNorm on it would fail in train mode.
    model = build_model(make_args(model_type=model_type)).train()
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    assert model.backbone.conv1.weight.grad is not None
    assert all(p.grad is not None for p in model.head.parameters())


@pytest.mark.parametrize("layers", [18, 50])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_backbone_strides(layers, output_stride):
    backbone = ResNetBackbone(layers, output_stride).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 64))
    size = 64 // output_stride
    assert features["low"].shape == (1, backbone.low_channels, 16, 16)
    assert features["out"].shape == (1, backbone.out_channels, size, size)
    assert (backbone.low_channels, backbone.out_channels) == ((64, 512) if layers == 18 else (256, 2048))


@pytest.mark.parametrize("layers", [18, 50])
def test_backbone_loads_torchvision_state_dict(layers):
    # Dilation must not rename or reshape anything, or ImageNet weights could not be loaded by name.
    reference = getattr(torchvision.models, f"resnet{layers}")(weights=None).state_dict()
    reference = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    ResNetBackbone(layers, output_stride=8).load_state_dict(reference, strict=True)


def test_basic_block_dilation_follows_torchvision_convention():
    layer4 = ResNetBackbone(18, output_stride=8).layer4
    assert layer4[0].conv1.stride == (1, 1) and layer4[0].downsample[0].stride == (1, 1)
    assert layer4[0].conv1.dilation == (2, 2)  # previous stage's dilation
    assert [b.conv2.dilation for b in layer4] == [(4, 4), (4, 4)]


def test_alias_builds_same_model():
    assert MODELS.get("deeplabv2") is MODELS.get("res50_ASPP")
    v2 = build_model(make_args(model_type="deeplabv2"))
    assert type(v2.head) is type(build_model(make_args(model_type="res50_ASPP")).head)


def test_aspp_v2_rates_scale_with_output_stride():
    for output_stride, rates in ((8, [6, 12, 18, 24]), (16, [3, 6, 9, 12])):
        head = build_model(make_args(model_type="res50_ASPP", output_stride=output_stride)).head
        assert [b.dilation[0] for b in head.branches] == rates


def test_no_dropout():
    model = build_model(make_args())
    assert not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in model.modules())


@pytest.mark.parametrize("overrides,expected", [
    (dict(model_type="deeplabv9"), "deeplabv9"),
    (dict(layers=20), "--layers 20"),
    (dict(output_stride=32), "--output_stride 32"),
    (dict(head_channels=0), "--head_channels 0"),
])
def test_bad_args_raise_user_error(overrides, expected):
    with pytest.raises(UserError, match=expected):
        build_model(make_args(**overrides))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("model_type", HEADS)
def test_model_exports_with_torchscript(model_type):
    model = build_model(make_args(model_type=model_type)).eval()
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))
