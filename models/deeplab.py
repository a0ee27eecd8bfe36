"""DeepLab heads (V2 ASPP, V3 ASPP, V3+ ASPP with decoder) on a ResNet backbone, and the model wrapper.

No dropout anywhere: the 1- vs 2-process equivalence test needs a forward pass that uses no RNG.
Image-pooling branches carry no BatchNorm, because BN on a (1, C, 1, 1) tensor fails in training.
Heads take the backbone's feature dict, typed so that `torch.jit.script` can export the model.
"""
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import register_model
from models.backbone import ResNetBackbone, check_backbone_args
from utils import UserError


class SegmentationModel(nn.Module):
    """backbone(x) -> feature dict -> head -> logits upsampled to the input size.

    `.backbone` and `.head` stay separate attributes so the optimizer can give them different LRs.
    """

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def conv_bn_relu(in_ch, out_ch, kernel_size=1, dilation=1):
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class ASPPv2Head(nn.Module):
    """DeepLabV2: dilated 3x3 convs straight to class scores, summed, plus an image-pooling branch."""

    def __init__(self, in_channels, num_classes, rates):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r) for r in rates)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, num_classes, 1))
        # DeepLab's small init keeps the summed scores near zero at the start, whatever the fan-in.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: Dict[str, torch.Tensor]):
        x = features["out"]
        scores = self.pool(x)  # (N, K, 1, 1): broadcasts over H, W in the sum
        for branch in self.branches:
            scores = scores + branch(x)
        return scores


class ASPP(nn.Module):
    """DeepLabV3 ASPP: 1x1, three dilated 3x3 and image pooling, concatenated and projected to `channels`."""

    def __init__(self, in_channels, channels, rates):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, channels)] +
            [conv_bn_relu(in_channels, channels, 3, dilation=r) for r in rates])
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True))
        self.project = conv_bn_relu(channels * (len(rates) + 2), channels)

    def forward(self, x):
        outs = [branch(x) for branch in self.branches]
        outs.append(F.interpolate(self.pool(x), size=x.shape[-2:], mode="nearest"))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3Head(nn.Module):
    """DeepLabV3: ASPP on the deep features, then a 1x1 classifier; no decoder."""

    def __init__(self, in_channels, num_classes, channels, rates):
        super().__init__()
        self.aspp = ASPP(in_channels, channels, rates)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Dict[str, torch.Tensor]):
        return self.classifier(self.aspp(features["out"]))


class DeepLabV3PlusHead(nn.Module):
    """ASPP on the deep features, then a decoder that refines with the stride-4 features."""

    def __init__(self, low_channels, out_channels, num_classes, channels, rates):
        super().__init__()
        self.aspp = ASPP(out_channels, channels, rates)
        self.reduce_low = conv_bn_relu(low_channels, 48)
        self.refine = nn.Sequential(
            conv_bn_relu(channels + 48, channels, 3), conv_bn_relu(channels, channels, 3))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Dict[str, torch.Tensor]):
        low = self.reduce_low(features["low"])
        x = self.aspp(features["out"])
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.refine(torch.cat([x, low], dim=1)))


def _check_positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            raise UserError(f"--{name} {value!r} is not valid; expected a positive integer")


def _dilated_backbone(args, default_stride):
    """The ResNet at --output_stride: 8 or 16 (dilated), or 32 (as built). Without the flag, the model's own default,
    which is then recorded in args, so the checkpoint, test.py and infer.py rebuild the same model."""
    if args.output_stride is None:
        args.output_stride = default_stride
    check_backbone_args(args.layers, args.output_stride)
    return ResNetBackbone(args.layers, args.output_stride)


def _v3_rates(output_stride):
    return [r * 16 // output_stride for r in (6, 12, 18)]  # the paper's rates are for stride 16


@register_model("res50_ASPP", "deeplabv2")
def build_deeplabv2(args):
    _check_positive(args, "numclasses")
    backbone = _dilated_backbone(args, 16)
    rates = [r * 8 // args.output_stride for r in (6, 12, 18, 24)]  # the paper's rates are for stride 8
    return SegmentationModel(backbone, ASPPv2Head(backbone.out_channels, args.numclasses, rates))


@register_model("deeplabv3")
def build_deeplabv3(args):
    _check_positive(args, "numclasses", "head_channels")
    backbone = _dilated_backbone(args, 16)
    head = DeepLabV3Head(backbone.out_channels, args.numclasses, args.head_channels, _v3_rates(args.output_stride))
    return SegmentationModel(backbone, head)


@register_model("deeplabv3p")
def build_deeplabv3p(args, default_stride=32):
    """DeepLabV3+. Its decoder adds the stride-4 features, so by default the deep features stay at stride 32: on the
    built-in data that costs 0.01 mIoU (five seeds) for two thirds of stride 16's FLOPs (README, Performance)."""
    _check_positive(args, "numclasses", "head_channels")
    backbone = _dilated_backbone(args, default_stride)
    rates = _v3_rates(args.output_stride)
    head = DeepLabV3PlusHead(backbone.low_channels, backbone.out_channels, args.numclasses,
                             args.head_channels, rates)
    return SegmentationModel(backbone, head)
