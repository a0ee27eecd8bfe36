"""torchvision ResNet trunks that return their features at every stage, dilated to output stride 8 or 16, or left
undilated at output stride 32 (DeepLabV3+'s default, and the UNet encoder)."""
import torch.nn as nn

from utils import UserError

# torchvision is imported when a backbone is built, not here: importing it costs over a second (it pulls in
# torch._dynamo), which --help, --print_config and errors found before the model is built need not pay.
RESNETS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101", 152: "resnet152"}
# Which of layer2..layer4 trade their stride for dilation, per output stride (torchvision's convention).
DILATE = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}


def check_backbone_args(layers, output_stride):
    """UserError unless `layers` is a known depth and `output_stride` 8, 16 or 32."""
    if layers not in RESNETS:
        raise UserError(f"--layers {layers!r} is not supported; expected one of {', '.join(map(str, RESNETS))}")
    if output_stride not in DILATE:
        raise UserError(f"--output_stride {output_stride!r} is not supported; "
                        f"expected {', '.join(map(str, sorted(DILATE)))}")


def _dilate_basic_layer(layer, dilation, previous_dilation):
    """Turn a strided BasicBlock stage into a dilated one in place, as torchvision does for Bottleneck."""
    first = layer[0]
    first.stride = 1
    first.conv1.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    for i, block in enumerate(layer):
        # The first conv still sees the previous stage's resolution, so it keeps that stage's dilation.
        for conv, d in ((block.conv1, previous_dilation if i == 0 else dilation), (block.conv2, dilation)):
            conv.dilation = (d, d)
            conv.padding = (d, d)


class ResNetBackbone(nn.Module):
    """ResNet without avgpool/fc. forward(x) -> the output of every stage, by name:

        "stem": conv1-bn1-relu, stride 2     "low": layer1, stride 4     "c3": layer2, stride min(8, OS)
        "c4": layer3, stride min(16, OS)     "out": layer4, stride OS (output_stride: 8, 16 or 32)

    All of them are computed on the way to "out" anyway; heads take the ones they need.
    `channels` maps each name to its channel count. Submodule names match torchvision's, so an ImageNet
    state dict (minus "fc.*") loads by name.
    """

    def __init__(self, layers, output_stride=16):
        super().__init__()
        check_backbone_args(layers, output_stride)
        import torchvision

        dilate = DILATE[output_stride]
        bottleneck = layers >= 50
        make = getattr(torchvision.models, RESNETS[layers])
        if bottleneck:
            net = make(weights=None, replace_stride_with_dilation=dilate)
        else:
            # torchvision's BasicBlock refuses dilation at construction, so patch the convs afterwards.
            net = make(weights=None)
            dilation = 1
            for stage, dilated in zip((net.layer2, net.layer3, net.layer4), dilate):
                if dilated:
                    _dilate_basic_layer(stage, dilation * 2, dilation)
                    dilation *= 2
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if bottleneck else 1
        self.channels = {"stem": 64, "low": 64 * expansion, "c3": 128 * expansion, "c4": 256 * expansion,
                         "out": 512 * expansion}
        self.low_channels = self.channels["low"]
        self.out_channels = self.channels["out"]
        self.output_stride = output_stride

    def forward(self, x):
        stem = self.relu(self.bn1(self.conv1(x)))
        low = self.layer1(self.maxpool(stem))
        c3 = self.layer2(low)
        c4 = self.layer3(c3)
        return {"stem": stem, "low": low, "c3": c3, "c4": c4, "out": self.layer4(c4)}
