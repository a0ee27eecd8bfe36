"""Images that cannot be read while training: the dataset returns an Unreadable marker, the collate drops it from
the batch and passes it on, and the loop logs and counts it. Loader workers are other processes, so the news
travels inside the batch: (images, target) becomes (images, target, [Unreadable, ...]) when a sample was dropped.
"""
from dataclasses import dataclass

import torch
from torch.utils.data import default_collate


@dataclass(frozen=True)
class Unreadable:
    """A sample whose image could not be read: its dataset index, path and the reason."""
    index: int
    path: str
    reason: str


class SkipUnreadable:
    """Collate the readable samples with `collate` (default: default_collate), then append the dropped markers.

    A batch with no readable sample at all becomes an empty one: images of shape (0, *empty_shape) and no labels,
    so that every rank still runs its step (DDP's gradient all-reduce needs all ranks)."""

    def __init__(self, collate=None, empty_shape=(3, 1, 1)):
        self.collate, self.empty_shape = collate, tuple(empty_shape)

    def __call__(self, batch):
        skipped = [item for item in batch if isinstance(item, Unreadable)]
        if not skipped:
            return (self.collate or default_collate)(batch)
        readable = [item for item in batch if not isinstance(item, Unreadable)]
        if not readable:
            return torch.zeros((0, *self.empty_shape)), torch.zeros(0, dtype=torch.int64), skipped
        return (*(self.collate or default_collate)(readable), skipped)


def split_batch(batch):
    """(images, target, [Unreadable, ...]) of a loader's batch, with or without dropped samples."""
    return batch[0], batch[1], (batch[2] if len(batch) > 2 else ())
