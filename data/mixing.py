"""Mixup and CutMix: a batch is mixed with itself reversed, in the loader (where the augmentation of its samples is
seeded, so a resumed run mixes the same way), and the loss of a mixed batch weighs the two labels by their shares."""
import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import default_collate

from utils import UserError


class MixCollate:
    """Collate, then mix the batch with CutMix (chance `cutmix_prob`) or Mixup (chance `mixup_prob`).

    A mixed batch's target is {"label", "mixed" (the partner's label), "lam" (the share of "label")}.
    """

    def __init__(self, mixup_prob, cutmix_prob, mixup_alpha, cutmix_alpha):
        if mixup_prob < 0 or cutmix_prob < 0 or mixup_prob + cutmix_prob > 1:
            raise UserError(f"--mixup_prob {mixup_prob:g} and --cutmix_prob {cutmix_prob:g}: expected chances >= 0 "
                            f"that add up to at most 1")
        self.mixup_prob, self.cutmix_prob = mixup_prob, cutmix_prob
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha

    def __call__(self, batch):
        return self.mix(*default_collate(batch))

    def mix(self, images, labels):
        """The batch-level half: mix a collated batch, drawing from np.random (data/dali.py calls it on its own
        batches, with np.random where the OpenCV loader's collate finds it)."""
        draw = np.random.random()
        if draw < self.cutmix_prob:
            lam = np.random.beta(self.cutmix_alpha, self.cutmix_alpha)
            h, w = images.shape[-2:]
            ch, cw = round(h * np.sqrt(1 - lam)), round(w * np.sqrt(1 - lam))
            cy, cx = np.random.randint(h), np.random.randint(w)
            y0, y1 = np.clip([cy - ch // 2, cy + ch - ch // 2], 0, h)
            x0, x1 = np.clip([cx - cw // 2, cx + cw - cw // 2], 0, w)
            images[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the share that is really left after clipping
        elif draw < self.cutmix_prob + self.mixup_prob:
            lam = np.random.beta(self.mixup_alpha, self.mixup_alpha)
            images = lam * images + (1 - lam) * images.flip(0)
        else:
            return images, labels
        return images, {"label": labels, "mixed": labels.flip(0), "lam": torch.tensor(float(lam))}


class MixedCriterion(nn.Module):
    """The base criterion on plain labels; on a mixed batch, the two labels' losses weighted by their shares."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, logits, target):
        if not isinstance(target, dict):
            return self.base(logits, target)
        lam = target["lam"]
        first, first_terms = self.base(logits, target["label"])
        second, second_terms = self.base(logits, target["mixed"])
        return lam * first + (1 - lam) * second, {k: lam * first_terms[k] + (1 - lam) * second_terms[k]
                                                  for k in first_terms}
