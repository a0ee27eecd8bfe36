"""Localisation rectification module (LoRM) for scribble-supervised training, and the models that carry it.

LoRM runs self-attention among the pseudo-label foreground positions of each image's deep features, and its loss pulls
each foreground feature towards its attention-weighted aggregate of that image's foreground. That aggregate is the
"consensus" of the related foreground, so discriminative and non-discriminative parts of an object come to look
alike in feature space, and the classifier's response spreads over the whole object.

The module is a training-time regulariser only: a model built here returns the same logits as the plain DeepLab model
when called without pseudo labels or in eval mode, so evaluation, inference and export never pay for it.
"""
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import IGNORE_INDEX
from models.registry import register_model
from models.deeplab import SegmentationModel, build_deeplabv2, build_deeplabv3p
from utils import UserError


def foreground_mask(pseudo, size: Tuple[int, int], ignore_index: int = IGNORE_INDEX):
    """(N, h, w) bool: pixels of `pseudo` (N, H, W class indices) that are neither background (0) nor ignore,
    after a nearest-neighbour resize to `size`. `pseudo` itself is never written to."""
    # to(float32) makes a new tensor: interpolate needs floats, and class ids <= 255 are exact in float32.
    labels = F.interpolate(pseudo[:, None].to(torch.float32), size=size, mode="nearest")[:, 0]
    return (labels != 0) & (labels != float(ignore_index))


class LoRM(nn.Module):
    """Foreground self-attention on a feature map; forward(features, pseudo) -> scalar loss.

    features: (N, C, h, w) with C = `in_channels`, the backbone's `out_channels` (512 or 2048 for ResNets).
    pseudo:   (N, H, W) integer pseudo labels, 0 = background, `ignore_index` = ignore; resized to (h, w) with
              nearest neighbour into a new tensor.

    For image n with foreground features f_1..f_P (P > 0):
        q_i = Wq f_i,  k_j = Wk f_j  (1x1 projections to d = max(C // reduction, min_dim) channels, no bias:
                                     a key bias adds the same q_i . b to every key's score and cancels in the softmax)
        a_ij = softmax_j(q_i . k_j / sqrt(d))   over the foreground keys of the same image, itself included
        g_i = sum_j a_ij sg(f_j)                the aggregate; the values are the features themselves
        loss = mean over every foreground position of the batch of (1 - cos(f_i, g_i))

    Design choices:
    - Values are the raw features (no value projection), so g_i is a convex combination of the image's own
      foreground features and lives in the same space as f_i; comparing f_i with a projected value would compare
      two different spaces.
    - 1 - cosine rather than MSE: MSE can be lowered just by shrinking every feature (a shortcut that fights the
      classifier), and its scale grows with C and the feature magnitude, so one loss weight would not suit both
      ResNet-18 (512) and ResNet-50 (2048). 1 - cos is scale-free and lies in [0, 2].
    - The values in g_i are detached (sg): g_i is a target, and each feature moves towards it. Without sg every key
      would also be pulled towards every query attending to it, which doubles the attraction and makes collapsing
      the whole foreground of an image to one vector the quickest way down. The attention weights are not detached,
      so Wq and Wk (and, through them, the backbone) are trained to attend to features that agree.
      The attention's own trivial minimum is attending only to itself (loss 0); the softmax temperature and the
      shared 1x1 projections keep it from getting there quickly, but keep the loss weight modest.
    - A batch without foreground gives exactly 0.0, and every parameter still enters the graph (times 0), so that
      DistributedDataParallel with find_unused_parameters=False works on such a batch.
    - Attention runs over every position with a mask that lets each query see only its image's foreground keys:
      (h*w)^2 scores per image (52 MB at 60x60 features in fp32), through scaled_dot_product_attention, which uses
      a fused kernel where the device has one for these shapes. Gathering each image's foreground positions
      instead would need their count on the host, which on a GPU waits for the device once per image.
    """

    def __init__(self, in_channels: int, reduction: int = 8, min_dim: int = 16, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise UserError(f"LoRM in_channels {in_channels!r} is not valid; expected a positive integer")
        self.in_channels = in_channels
        self.dim = max(in_channels // reduction, min_dim)
        self.ignore_index = ignore_index
        self.query = nn.Conv2d(in_channels, self.dim, 1, bias=False)
        self.key = nn.Conv2d(in_channels, self.dim, 1, bias=False)

    @torch.jit.unused  # training only: a scripted (exported) model leaves it out
    def forward(self, features: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise UserError(f"LoRM got features of shape {tuple(features.shape)}; "
                            f"expected (N, {self.in_channels}, h, w)")
        if pseudo.dim() != 3 or pseudo.shape[0] != features.shape[0]:
            raise UserError(f"LoRM got pseudo labels of shape {tuple(pseudo.shape)}; "
                            f"expected (N, H, W) with N = {features.shape[0]}")
        fg = foreground_mask(pseudo.to(features.device), features.shape[-2:], self.ignore_index).flatten(1)
        q = self.query(features).flatten(2).transpose(1, 2)  # (N, h*w, d)
        k = self.key(features).flatten(2).transpose(1, 2)
        f = features.flatten(2).transpose(1, 2)  # (N, h*w, C)
        # Every query attends to its image's foreground keys (an image without foreground to all keys, so that no
        # row is all masked and NaN; its queries are left out of the loss below). A mask, not a gather of each
        # image's foreground positions: the gather needs their count on the host, a wait for the device per image.
        keys = fg[:, None, :] | ~fg.any(1)[:, None, None]  # (N, 1, h*w), True = attended to
        # Default scale 1/sqrt(d). Under autocast q and k may be half precision while the features are not.
        aggregate = F.scaled_dot_product_attention(q, k, f.detach().to(q.dtype), attn_mask=keys).to(f.dtype)
        per_position = (1.0 - F.cosine_similarity(f, aggregate, dim=2)) * fg  # background queries count 0
        # 0 x (every parameter): the loss is exactly 0 without foreground, yet DDP sees all parameters used.
        # Adding it to a +0.0 turns the -0.0 that 0 x (a negative sum) gives into the 0.0 a log should show.
        total = features.new_zeros(()) + sum(p.sum() for p in self.parameters()) * 0.0 + per_position.sum()
        return total / fg.sum().clamp(min=1)


class PaperLoRM(nn.Module):
    """LoRM as the method's public code computes it (--lorm paper), with its bugs fixed; forward -> scalar loss.

    For image n with features x (C, h*w) and foreground mask m (h*w):
        q = Wq x + bq,  k = Wk x + bk          1x1 convolutions C -> C with bias, Xavier-uniform weights, zero bias
        A_ij = softmax_j(cos(q_i, k_j))         over all h*w key positions, no temperature
        A_ij = 0 where query i is not foreground (its row of the output is 0)
        out = gamma A x^T                      gamma: a learnable scalar, 1 at the start; x is not detached
        loss = sum((x - out)^2) / (number of non-zero (x - out)^2), over the whole batch and every position
    The foreground mask is the pseudo label's foreground (not background 0, not ignore) resized bilinearly with
    align_corners=True to the feature size and taken where > 0: resizing the class-index map as the code does and
    thresholding at 0 gives the same mask, because bilinear weights are non-negative.

    Fixed here: ignore pixels are kept out of the foreground without writing to the caller's labels (the code sets
    them to 0 in place); a zero-length query or key gives a cosine of 0 instead of NaN, and a batch whose squared
    differences are all 0 gives 0 instead of 0/0; the channels come from the backbone (the code hard-codes 2048).
    Background rows of `out` are 0, so the loss also pulls background features towards 0, as in the code.
    """

    def __init__(self, in_channels: int, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.in_channels = in_channels
        self.ignore_index = ignore_index
        self.query = nn.Conv2d(in_channels, in_channels, 1)
        self.key = nn.Conv2d(in_channels, in_channels, 1)
        for conv in (self.query, self.key):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.gamma = nn.Parameter(torch.ones(1))

    @torch.jit.unused
    def forward(self, features: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        n, c, h, w = features.shape
        if c != self.in_channels:
            raise UserError(f"LoRM got features of shape {tuple(features.shape)}; expected (N, {self.in_channels}, h, w)")
        pseudo = pseudo.to(features.device)
        fg = ((pseudo != 0) & (pseudo != self.ignore_index)).to(torch.float32)[:, None]
        fg = F.interpolate(fg, size=(h, w), mode="bilinear", align_corners=True).flatten(1) > 0  # (N, h*w)
        q = F.normalize(self.query(features).flatten(2), dim=1)  # (N, C, h*w), unit length (0 stays 0)
        k = F.normalize(self.key(features).flatten(2), dim=1)
        attention = torch.bmm(q.transpose(1, 2), k).softmax(-1) * fg[:, :, None].to(q.dtype)  # (N, query, key)
        x = features.flatten(2)
        out = self.gamma * torch.bmm(x, attention.transpose(1, 2).to(x.dtype))  # (N, C, query)
        squared = (x - out) ** 2
        return squared.sum() / torch.count_nonzero(squared).clamp(min=1)


LORM_STYLES = {"consensus": LoRM, "paper": PaperLoRM}


class LoRMSegmentationModel(SegmentationModel):
    """A SegmentationModel (`.backbone`, `.head`) plus `.lorm` on the backbone's "out" features.

    forward(x) or forward(x, pseudo) in eval mode -> logits (N, K, H, W) at the input size, with no LoRM cost.
    forward(x, pseudo) in training mode -> (logits, lorm_loss), where pseudo is (N, H, W) integer labels of x.
    """

    def __init__(self, backbone, head, lorm):
        super().__init__(backbone, head)
        self.lorm = lorm

    def forward(self, x, pseudo: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        features: Dict[str, torch.Tensor] = self.backbone(x)
        logits = F.interpolate(self.head(features), size=x.shape[-2:], mode="bilinear", align_corners=False)
        if pseudo is None or not self.training:
            return logits
        return logits, self._lorm_loss(features["out"], x, pseudo)

    @torch.jit.unused  # training only: a scripted (exported) model leaves it out
    def _lorm_loss(self, out: torch.Tensor, x: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        if not isinstance(pseudo, torch.Tensor) or pseudo.is_floating_point() or pseudo.dtype == torch.bool or \
                pseudo.is_complex():
            raise UserError("pseudo labels must be an integer tensor; got "
                            f"{pseudo.dtype if isinstance(pseudo, torch.Tensor) else type(pseudo).__name__}")
        expected = (x.shape[0], *x.shape[-2:])
        if tuple(pseudo.shape) != expected:
            raise UserError(f"pseudo labels of shape {tuple(pseudo.shape)} do not match the image batch "
                            f"{tuple(x.shape)}; expected {expected} (N, H, W)")
        return self.lorm(out, pseudo)


def with_lorm(model, style="consensus"):
    """Add LoRM (`style`: consensus, the suite's, or paper, the method's code), sized from the backbone's
    `out_channels`, to a plain SegmentationModel."""
    if style not in LORM_STYLES:
        raise UserError(f"--lorm {style!r} is unknown; expected one of {', '.join(LORM_STYLES)}")
    return LoRMSegmentationModel(model.backbone, model.head, LORM_STYLES[style](model.backbone.out_channels))


@register_model("res50_ASPP_lorm")
def build_deeplabv2_lorm(args):
    """DeepLabV2 (ASPP v2 with the same rates as res50_ASPP) + LoRM on the backbone's deep features."""
    return with_lorm(build_deeplabv2(args), getattr(args, "lorm", "consensus"))


@register_model("deeplabv3p_lorm")
def build_deeplabv3p_lorm(args):
    """DeepLabV3+ + LoRM on the backbone's deep features, by default at stride 16: a low-rank map needs more than
    the few positions of stride 32 on a small crop."""
    return with_lorm(build_deeplabv3p(args, default_stride=16), getattr(args, "lorm", "consensus"))
