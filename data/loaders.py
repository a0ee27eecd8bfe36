"""Samplers and loaders, one code path for any world size (1 included)."""
import itertools
import random

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from data.readers import IGNORE_INDEX
from data.workers import make_loader
from utils import UserError

# ---------------------------------------------------------------------------------------------
# Samplers and loaders. One code path for any world size, 1 included.

class ShardSampler(Sampler):
    """Evaluation shard: rank r gets r, r+W, r+2W, ... with no padding, so every index is seen exactly once."""

    def __init__(self, n, rank, world_size):
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is invalid for world size {world_size}; expected 0 <= rank < world size")
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self):
        return len(range(self.rank, self.n, self.world_size))


def pad_collate(batch):
    """Stack (image, label) pairs of different sizes, padding at the bottom/right with 0 (image) and 255 (label)."""
    h = max(label.shape[0] for _, label in batch)
    w = max(label.shape[1] for _, label in batch)
    images = torch.zeros(len(batch), batch[0][0].shape[0], h, w, dtype=batch[0][0].dtype)
    labels = torch.full((len(batch), h, w), IGNORE_INDEX, dtype=torch.int64)
    for i, (image, label) in enumerate(batch):
        images[i, :, :label.shape[0], :label.shape[1]] = image
        labels[i, :label.shape[0], :label.shape[1]] = label
    return images, labels


def sample_seed(seed, epoch, index):
    """A 32-bit seed for one sample's augmentation, from (--seed, epoch, dataset index) only."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class TrainSampler(DistributedSampler):
    """DistributedSampler that yields (index, augmentation seed) and can start part-way through an epoch.

    The seed depends on the sample and the epoch, not on the rank, the worker or what came before, so a run
    resumed mid-epoch (set_epoch(epoch, start_batch)) draws exactly the augmentation it would have drawn.
    """

    def __init__(self, dataset, world_size, rank, seed, batch_size):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.start = batch_size, 0

    def set_epoch(self, epoch, start_batch=0):
        super().set_epoch(epoch)
        self.start = start_batch * self.batch_size

    def __iter__(self):
        for index in itertools.islice(super().__iter__(), self.start, None):
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self):
        return max(0, self.num_samples - self.start)


class SeededSamples(Dataset):
    """Wraps a dataset for TrainSampler: item (index, seed) seeds numpy, random and torch's CPU generator, then loads
    the sample, so any transform that draws from the global generators (ours, or a plugin's) is reproducible
    per sample."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        np.random.seed(seed)
        random.seed(seed)
        # The CPU generator only: transforms draw from it, and torch.manual_seed would also seed (and, before CUDA
        # starts, record stack traces for) every accelerator's generator, about 0.25 ms per sample.
        torch.default_generator.manual_seed(seed)
        return self.dataset[index]


def check_full_batch(dataset, batch_size, world_size):
    """A training loader that drops its last short batch needs at least one full batch on every rank."""
    per_rank = -(-len(dataset) // world_size)
    if per_rank < batch_size:
        raise UserError(f"training split has {len(dataset)} images, {per_rank} per process over {world_size} "
                        f"process(es), fewer than batch_size={batch_size}; expected at least one full batch")


def build_train_loader(dataset, batch_size, workers, rank, world_size, seed, drop_last=True, collate_fn=None):
    """(loader, sampler) with a shuffling TrainSampler; call sampler.set_epoch(epoch[, start_batch]) every epoch."""
    if drop_last:
        check_full_batch(dataset, batch_size, world_size)
    sampler = TrainSampler(dataset, world_size, rank, seed, batch_size)
    return make_loader(SeededSamples(dataset), batch_size, workers, sampler, drop_last, collate_fn), sampler


def build_eval_loader(dataset, batch_size, workers, rank, world_size, collate_fn=pad_collate):
    """Loader over this rank's ShardSampler shard; by default batches of mixed sizes are padded (label 255)."""
    return make_loader(dataset, batch_size, workers, ShardSampler(len(dataset), rank, world_size), False, collate_fn)
