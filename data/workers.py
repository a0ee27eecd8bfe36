"""Loader worker processes: how they start, how a dataset reaches them, how they are seeded, and the DataLoader
that ties these together (data/loaders.py's and infer.py's use it)."""
import multiprocessing
import random

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from core.registry import import_plugins, imported_plugins


# Loader workers are forks of a fork server, never of the process that owns the loader. By the time a loader
# starts its workers that process has threads (gloo's, OpenCV's, check_dataset's), and fork() copies every lock
# one of them holds, still locked, into a child that has no thread to release it. Seen: a check_dataset thread
# that Python had already joined was still in OpenCV's thread-exit cleanup, holding OpenCV's TLS mutex; the
# forked worker's first cv2.imread waited on it forever and the other ranks waited in the next all-reduce.
# The fork server is a fresh interpreter, started once per process when its first loader is built; it stays
# single-threaded and imports these modules once (~2 s of CPU), so each worker then starts in ~0.1 s (a fork and
# the main script's own imports) instead of importing torch as a `spawn` worker does. Like `spawn` workers, they
# re-run the main script's imports: keep its work under `if __name__ == "__main__"`.
WORKER_PRELOAD = ["numpy", "cv2", "PIL.Image", "torch"]


def worker_context(workers):
    """`multiprocessing_context` for a DataLoader with `workers` processes (None without workers)."""
    if workers <= 0:
        return None
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows
        return multiprocessing.get_context("spawn")
    from multiprocessing import forkserver  # POSIX only
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    forkserver.ensure_running()  # now: it imports torch while this process builds the rest
    return context


class _ImportPlugins:
    """Unpickles as import_plugins(specs): pickled ahead of a dataset, it makes the plugins' modules exist first."""

    def __init__(self, specs):
        self.specs = specs

    def __reduce__(self):
        return import_plugins, (self.specs,)


def _unwrap(_plugins, dataset):
    return dataset


class PluginDataset(Dataset):
    """A dataset as loader workers receive it once --plugin files were imported. A worker is a fresh process in
    which the plugins' modules (`ailab_plugin_<name>`, the home of a plugin's dataset or transform classes) do not
    exist, so this pickles as 'import the plugins, then unpickle the dataset' and arrives as the dataset itself."""

    def __init__(self, dataset, plugins):
        self.dataset, self.plugins = dataset, list(plugins)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __reduce__(self):
        return _unwrap, (_ImportPlugins(self.plugins), self.dataset)


def worker_dataset(dataset, workers):
    """`dataset` as it goes to `workers` loader processes: in a PluginDataset when plugins were imported."""
    plugins = imported_plugins() if workers > 0 else []
    return PluginDataset(dataset, plugins) if plugins else dataset


def seed_worker(worker_id):
    """DataLoader worker_init_fn: give numpy and `random` the worker's own torch seed."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)
    cv2.setNumThreads(0)    # loader workers are the parallelism; OpenCV threads on top only oversubscribe



def make_loader(dataset, batch_size, workers, sampler, drop_last=False, collate_fn=None):
    """The suite's one DataLoader: workers from the fork server, seeded by seed_worker, kept across epochs."""
    return DataLoader(worker_dataset(dataset, workers), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), drop_last=drop_last, collate_fn=collate_fn,
                      worker_init_fn=seed_worker, persistent_workers=workers > 0,
                      multiprocessing_context=worker_context(workers))
