"""UNet models: `unet` (a torchvision ResNet encoder) and `unet_plain` (the classic conv encoder), one decoder.

Decoder: starting from the deepest features, each stage upsamples bilinearly to the next skip's exact size (so any
input size works, odd ones such as 65x81 included), concatenates that skip and applies two 3x3 conv-BN-ReLU.
A 1x1 classifier follows at the shallowest skip's resolution, and SegmentationModel upsamples the logits to the
input size.

Widths from --head_channels (h, at least 4): the four decoder stages are 2h, h, h/2 and h/4 wide, deepest first
(256, 128, 64, 32 at the default 128), so the wide convolutions run at low resolution and the cheap ones at high.
unet_plain's encoder mirrors them: five levels h/4, h/2, h, 2h, 4h wide (base h/4, doubling per level).

- unet: the encoder is `ResNetBackbone(--layers)` undilated, with features at strides 2 ("stem"), 4 ("low"),
  8 ("c3"), 16 ("c4") and 32 ("out"); the decoder fuses the skips at 16, 8, 4, 2, so the logits are at stride 2.
  `model.backbone` is that encoder, with torchvision's parameter names, so --backbone_lr_mult applies to it and an
  ImageNet ResNet state dict (minus "fc.*") loads into it by name.
- unet_plain: five levels of two 3x3 conv-BN-ReLU with 2x2 max-pooling between (strides 1 to 16); the decoder fuses
  the skips at 8, 4, 2, 1, so the logits are at full resolution. `model.backbone` is the encoder, `model.head` the
  decoder. --layers does not apply to it.

Both ignore --output_stride: a UNet's encoder strides are fixed by its design.
No dropout (the 1- vs 2-process equivalence test needs RNG-free forward passes), and nothing is pooled to 1x1.
"""
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import register_model
from models.backbone import ResNetBackbone
from models.deeplab import SegmentationModel, _check_positive, conv_bn_relu
from utils import UserError


def double_conv(in_ch, out_ch):
    return nn.Sequential(conv_bn_relu(in_ch, out_ch, 3), conv_bn_relu(out_ch, out_ch, 3))


def decoder_widths(head_channels):
    """Widths of the four decoder stages, deepest first."""
    return [head_channels * 2, head_channels, head_channels // 2, head_channels // 4]


class DecoderStage(nn.Module):
    """Upsample to the skip's exact size, concatenate the skip (named `skip` in the feature dict), two 3x3 convs."""

    def __init__(self, skip: str, in_channels, skip_channels, channels):
        super().__init__()
        self.skip = skip
        self.fuse = double_conv(in_channels + skip_channels, channels)

    def forward(self, x, features: Dict[str, torch.Tensor]):
        skip = features[self.skip]
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x, skip], dim=1))


class UNetDecoder(nn.Module):
    """features[deepest] -> one DecoderStage per skip (deepest first) -> 1x1 classifier.

    `channels` maps feature names to channel counts (an encoder's `.channels`).
    """

    def __init__(self, channels: Dict[str, int], deepest: str, skips: List[str], widths: List[int], num_classes):
        super().__init__()
        self.deepest = deepest
        stages = []
        in_channels = channels[deepest]
        for skip, width in zip(skips, widths):
            stages.append(DecoderStage(skip, in_channels, channels[skip], width))
            in_channels = width
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, features: Dict[str, torch.Tensor]):
        x = features[self.deepest]
        for stage in self.stages:
            x = stage(x, features)
        return self.classifier(x)


class PlainUNetEncoder(nn.Module):
    """The classic UNet encoder: five levels of two 3x3 conv-BN-ReLU, 2x2 max-pooling between, widths base * 2**i.

    forward(x) -> {"level1": stride 1, "level2": 2, "level3": 4, "level4": 8, "out": 16}; `channels` maps each name
    to its width, and `out_channels` is that of "out", as on ResNetBackbone (LoRM sizes itself from it).
    """

    def __init__(self, base_channels, in_channels=3):
        super().__init__()
        self.names = ["level1", "level2", "level3", "level4", "out"]
        widths = [base_channels * 2 ** i for i in range(len(self.names))]
        self.levels = nn.ModuleList(
            double_conv(c_in, c_out) for c_in, c_out in zip([in_channels] + widths[:-1], widths))
        self.pool = nn.MaxPool2d(2)
        self.channels = dict(zip(self.names, widths))
        self.out_channels = widths[-1]

    def forward(self, x):
        features: Dict[str, torch.Tensor] = {}
        for i, level in enumerate(self.levels):
            if i > 0:
                x = self.pool(x)
            x = level(x)
            features[self.names[i]] = x
        return features


def _check_unet_args(args):
    _check_positive(args, "numclasses", "head_channels")
    if args.head_channels < 4:
        raise UserError(f"--head_channels {args.head_channels} is too small for {args.model_type}; expected at "
                        f"least 4 (its narrowest convolutions are head_channels // 4 wide)")


@register_model("unet")
def build_unet(args):
    _check_unet_args(args)
    backbone = ResNetBackbone(args.layers, output_stride=32)  # --output_stride is for the DeepLab models only
    head = UNetDecoder(backbone.channels, "out", ["c4", "c3", "low", "stem"], decoder_widths(args.head_channels),
                       args.numclasses)
    return SegmentationModel(backbone, head)


# Segmentation models whose encoder is no torchvision ResNet, so --pretrained NAME has no weights for them.
WITHOUT_RESNET = ("unet_plain",)


@register_model("unet_plain")
def build_unet_plain(args):
    _check_unet_args(args)
    encoder = PlainUNetEncoder(args.head_channels // 4)
    head = UNetDecoder(encoder.channels, "out", ["level4", "level3", "level2", "level1"],
                       decoder_widths(args.head_channels), args.numclasses)
    return SegmentationModel(encoder, head)
