# Seed 001's user script: it defines and registers its own model, dataset and loss, and trains from cfg.
# The test copies it next to seed001_config.py as train.py and config.py, the names the document uses.
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ailab import ailab_train
from ailab.registry import DATASETS, LOSSES, MODELS
from config import cfg


@MODELS.register_module()
class MyModel(nn.Module):
    def __init__(self, num_classes, width=8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).mean((2, 3)))


@DATASETS.register_module()
class MyDataset(Dataset):
    """Class k: an image whose channel k is bright. Deterministic from `seed`."""
    classes = ["red", "green", "blue"]

    def __init__(self, size, seed):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (size,), generator=g)
        self.images = torch.rand(size, 3, 16, 16, generator=g) * 0.5
        self.images[torch.arange(size), self.labels] += 0.5

    def __getitem__(self, idx):
        return self.images[idx], int(self.labels[idx])

    def __len__(self):
        return len(self.labels)


@LOSSES.register_module()
class MyLoss(nn.Module):
    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale

    def forward(self, output, target):
        return self.scale * F.cross_entropy(output, target)


if __name__ == '__main__':
    ailab_train(cfg)
