"""Model registry, backbone strides and head output shapes (CPU, small inputs)."""
from argparse import Namespace

import pytest
import torch
import torchvision

from models import MODELS, build_model
from models.backbone import ResNetBackbone
from engine.optim import param_groups
from utils import UserError

HEADS = ["res50_ASPP", "deeplabv3", "deeplabv3p"]
UNETS = ["unet", "unet_plain"]
ALL_MODELS = HEADS + UNETS


def make_args(**overrides):
    args = dict(model_type="deeplabv3p", layers=18, numclasses=5, output_stride=16, head_channels=32)
    args.update(overrides)
    return Namespace(**args)


@pytest.mark.parametrize("model_type", HEADS)
@pytest.mark.parametrize("layers,output_stride",
                         [(18, 16), (34, 16), (50, 16), (101, 16), (152, 16), (18, 8), (50, 8), (18, 32), (50, 32)])
def test_logits_match_input_size(model_type, layers, output_stride):
    model = build_model(make_args(model_type=model_type, layers=layers, output_stride=output_stride)).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 65, 81))
    assert logits.shape == (2, 5, 65, 81)


@pytest.mark.parametrize("model_type,layers",  # unet_plain has no ResNet: --layers does not apply to it
                         [("unet", 18), ("unet", 34), ("unet", 50), ("unet", 101), ("unet", 152), ("unet_plain", 18)])
def test_unet_logits_match_input_size(model_type, layers):
    model = build_model(make_args(model_type=model_type, layers=layers, head_channels=16)).eval()
    x = torch.randn(2, 3, 65, 81)
    with torch.no_grad():
        assert model(x).shape == (2, 5, 65, 81)
        # The last decoder stage fuses the stride-2 skip (unet) or the full-size level (unet_plain).
        assert model.head(model.backbone(x)).shape[-2:] == ((33, 41) if model_type == "unet" else (65, 81))


@pytest.mark.parametrize("model_type", ALL_MODELS)
def test_trains_with_batch_size_one(model_type):
    # Image pooling sees a 1x1 map here; BatchNorm on it would fail in train mode.
    model = build_model(make_args(model_type=model_type)).train()
    # The 1- vs 2-process equivalence test needs RNG-free forward passes.
    assert not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in model.modules())
    target = torch.randint(0, 5, (1, 64, 64))
    torch.nn.functional.cross_entropy(model(torch.randn(1, 3, 64, 64)), target).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
    assert not missing, f"no finite gradient for {missing[:5]}"


@pytest.mark.parametrize("layers", [18, 50])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_backbone_strides(layers, output_stride):
    backbone = ResNetBackbone(layers, output_stride).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 64))
    strides = {"stem": 2, "low": 4, "c3": min(8, output_stride), "c4": min(16, output_stride), "out": output_stride}
    assert {name: (f.shape[1], 64 // f.shape[-1]) for name, f in features.items()} == {
        name: (backbone.channels[name], stride) for name, stride in strides.items()}
    assert (backbone.low_channels, backbone.out_channels) == ((64, 512) if layers == 18 else (256, 2048))
    assert list(backbone.channels.values()) == ([64, 64, 128, 256, 512] if layers == 18 else
                                                [64, 256, 512, 1024, 2048])


@pytest.mark.parametrize("layers", [18, 50])
def test_backbone_loads_torchvision_state_dict(layers):
    # Dilation must not rename or reshape anything, or ImageNet weights could not be loaded by name.
    reference = getattr(torchvision.models, f"resnet{layers}")(weights=None).state_dict()
    reference = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    ResNetBackbone(layers, output_stride=8).load_state_dict(reference, strict=True)


def test_unet_encoder_is_torchvision_resnet():
    # An ImageNet ResNet state dict (minus fc.*) must load into model.backbone by name, as --pretrained does it.
    model = build_model(make_args(model_type="unet"))
    assert type(model.backbone) is ResNetBackbone and model.backbone.output_stride == 32
    reference = torchvision.models.resnet18(weights=None).state_dict()
    reference = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    model.backbone.load_state_dict(reference, strict=True)
    torch.testing.assert_close(model.state_dict()["backbone.layer4.1.conv2.weight"], reference["layer4.1.conv2.weight"])


@pytest.mark.parametrize("model_type", UNETS)
def test_backbone_lr_mult_splits_encoder_from_decoder(model_type):
    model = build_model(make_args(model_type=model_type))
    groups = {g["name"]: g for g in param_groups(model, 1e-4, backbone_lr_mult=0.1)}
    assert groups["backbone"]["lr_mult"] == 0.1 and groups["head"]["lr_mult"] == 1.0
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in model.head.parameters()}


def test_unet_ignores_output_stride():
    models = [build_model(make_args(model_type="unet", output_stride=os)) for os in (8, 16)]
    shapes = [{k: v.shape for k, v in model.state_dict().items()} for model in models]
    assert shapes[0] == shapes[1]
    assert models[0].backbone.layer4[0].conv2.dilation == (1, 1)


def test_unet_widths_follow_head_channels():
    plain = build_model(make_args(model_type="unet_plain", head_channels=32))
    assert list(plain.backbone.channels.values()) == [8, 16, 32, 64, 128] and plain.backbone.out_channels == 128
    for model in (plain, build_model(make_args(model_type="unet", head_channels=32))):
        assert [stage.fuse[-1][0].out_channels for stage in model.head.stages] == [64, 32, 16, 8]
        assert model.head.classifier.in_channels == 8


def test_new_models_are_registered():
    assert {"deeplabv3", "unet", "unet_plain"} <= set(MODELS.names())


def test_basic_block_dilation_follows_torchvision_convention():
    layer4 = ResNetBackbone(18, output_stride=8).layer4
    assert layer4[0].conv1.stride == (1, 1) and layer4[0].downsample[0].stride == (1, 1)
    assert layer4[0].conv1.dilation == (2, 2)  # previous stage's dilation
    assert [b.conv2.dilation for b in layer4] == [(4, 4), (4, 4)]


def test_alias_builds_same_model():
    assert MODELS.get("deeplabv2") is MODELS.get("res50_ASPP")
    v2 = build_model(make_args(model_type="deeplabv2"))
    assert type(v2.head) is type(build_model(make_args(model_type="res50_ASPP")).head)


def test_deeplabv3_is_aspp_then_classifier():
    for output_stride, rates in ((16, [6, 12, 18]), (8, [12, 24, 36])):
        head = build_model(make_args(model_type="deeplabv3", output_stride=output_stride)).head
        assert [b[0].dilation[0] for b in head.aspp.branches[1:]] == rates
        assert [name for name, _ in head.named_children()] == ["aspp", "classifier"]
        assert head.classifier.kernel_size == (1, 1) and head.classifier.out_channels == 5


def test_aspp_v2_rates_scale_with_output_stride():
    for output_stride, rates in ((8, [6, 12, 18, 24]), (16, [3, 6, 9, 12])):
        head = build_model(make_args(model_type="res50_ASPP", output_stride=output_stride)).head
        assert [b.dilation[0] for b in head.branches] == rates


def test_no_dropout():
    model = build_model(make_args())
    assert not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in model.modules())


@pytest.mark.parametrize("model_type,expected", [("deeplabv3p", 32), ("deeplabv3", 16), ("res50_ASPP", 16),
                                                 ("deeplabv3p_lorm", 16), ("res50_ASPP_lorm", 16)])
def test_without_the_flag_each_deeplab_model_takes_its_own_stride_and_records_it(model_type, expected):
    args = make_args(model_type=model_type, output_stride=None)
    model = build_model(args)
    assert args.output_stride == expected  # saved with the checkpoint, so test.py and infer.py rebuild this model
    assert model.backbone.output_stride == expected
    assert ResNetBackbone(18, expected).layer4[0].conv1.stride == model.backbone.layer4[0].conv1.stride


@pytest.mark.parametrize("overrides,expected", [
    (dict(model_type="deeplabv9"), "deeplabv9"),
    (dict(layers=20), "--layers 20"),
    (dict(output_stride=12), "--output_stride 12"),
    (dict(head_channels=0), "--head_channels 0"),
    (dict(model_type="deeplabv3", output_stride=4), "--output_stride 4"),
    (dict(model_type="unet", layers=20), "--layers 20"),
    (dict(model_type="unet", head_channels=3), "--head_channels 3 is too small for unet"),
    (dict(model_type="unet_plain", head_channels=2), "--head_channels 2 is too small for unet_plain"),
])
def test_bad_args_raise_user_error(overrides, expected):
    with pytest.raises(UserError, match=expected):
        build_model(make_args(**overrides))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("model_type", ALL_MODELS)
def test_model_exports_with_torchscript(model_type):
    model = build_model(make_args(model_type=model_type)).eval()
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))
