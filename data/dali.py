"""The optional NVIDIA DALI loader (--loader dali) for segmentation (VOC layout) and classification (image
folders, splits, list files): train and eval loaders that look to train.py and test.py like data/loaders.py's
(same batches, same sampler interface, same per-sample augmentation). This module is what both tasks share;
data/dali_tasks.py holds what differs (the files, each sample's parameters, the ops after decoding).

Images go through DALI: fn.readers.file (sharded with shard_id/num_shards) and fn.decoders.image, on the GPU
(device="mixed") when the run has one, else on the CPU (device_id=None). An fn.external_source carries, per
sample, its index (checked against the reader's, so the two can never drift apart) and the task's columns: its
augmentation parameters, and for segmentation the mask.

Order and randomness: each epoch's file list is this suite's own order (TrainSampler of every rank, laid out so
that DALI's contiguous shard r is exactly rank r's strided share), and each sample's augmentation is drawn from
sample_seed(--seed, epoch, index) in the same way as the task's TrainTransform draws it. So a resumed run starts at
`start_batch` by leaving those samples out of the list, and continues with exactly the batches (and the
augmentation) the interrupted run would have seen. DALI's own random ops and random_shuffle cannot do that: their
state depends on everything drawn before, which a resumed run has not drawn. Mixup/CutMix (classification) mix
the DALI batch with the training collate's own `mix`, drawing from np.random where the OpenCV loader's collate
finds it: seeded by the batch's last sample and past that sample's augmentation draws.
"""
import numpy as np
import torch

from data import dali_tasks, loaders
from data.loaders import ShardSampler, TrainSampler
from utils import UserError

INSTALL = "pip install -r requirements-dali.txt"
TASKS = ("segmentation", "classification")  # the tasks whose data this loader reads
TORCH_TYPES = {"FLOAT": torch.float32, "UINT8": torch.uint8, "INT32": torch.int32}  # of the pipelines' outputs


def add_loader_args(group):
    group.add_argument("--loader", default="opencv", choices=["opencv", "dali"],
                       help="opencv: DataLoader workers with OpenCV/PIL; dali: NVIDIA DALI pipelines (segmentation on "
                            "VOC-layout data; classification without --rotation, --vflip_prob or --color_jitter; "
                            f"needs `{INSTALL}`)")
    group.add_argument("--dali_threads", type=int, default=2, help="--loader dali: CPU threads per DALI pipeline")


def loader_builders(args, ctx, task_name):
    """(build_train_loader, build_eval_loader) of --loader, both called like data/loaders.py's two builders.
    Called before the run writes anything, so a missing DALI or an unsupported task stops it with one line."""
    if getattr(args, "loader", "opencv") != "dali":
        return loaders.build_train_loader, loaders.build_eval_loader
    if task_name not in TASKS:
        raise UserError(f"--loader dali supports the {' and '.join(TASKS)} tasks, not {task_name}; "
                        f"use --loader opencv")
    import_dali()
    threads, device = args.dali_threads, ctx.device
    if threads < 1:
        raise UserError(f"--dali_threads {threads} is invalid; expected at least 1")
    if task_name == "classification":  # train.py's flags (test.py has none): refused before anything is written
        dali_tasks.check_augmentation({"vflip_prob": getattr(args, "vflip_prob", 0),
                                       "rotation": getattr(args, "rotation", 0),
                                       "jitter": getattr(args, "color_jitter", 0)})

    def train(dataset, batch_size, workers, rank, world_size, seed, drop_last=True, collate_fn=None):
        return build_train_loader(dataset, batch_size, rank, world_size, seed, threads, device, collate_fn)

    def evaluate(dataset, batch_size, workers, rank, world_size, collate_fn=None):
        return build_eval_loader(dataset, batch_size, rank, world_size, threads, device)

    return train, evaluate


def describe(args, ctx):
    """One log line for --loader: which loader reads the data and, for DALI, its version, threads and decoder."""
    if getattr(args, "loader", "opencv") != "dali":
        return f"loader opencv: {args.workers} worker process(es)"
    import nvidia.dali
    where = f"{ctx.device} (mixed)" if torch.device(ctx.device).type == "cuda" else "cpu"
    return f"loader dali: NVIDIA DALI {nvidia.dali.__version__}, {args.dali_threads} threads, images decoded on {where}"


def import_dali():
    """(fn, types, Pipeline, feed_ndarray, TensorListGPU) of nvidia.dali, or a UserError saying how to install it."""
    try:
        from nvidia.dali import Pipeline, fn, types
        from nvidia.dali.plugin.pytorch import feed_ndarray
        from nvidia.dali.tensors import TensorListGPU
    except ImportError as e:
        raise UserError(f"--loader dali needs NVIDIA DALI, which is not installed ({e}); install it with "
                        f"`{INSTALL}`, or use --loader opencv") from None
    return fn, types, Pipeline, feed_ndarray, TensorListGPU


def batch_mixer(collate_fn):
    """The batch-level half of a training collate (MixCollate.mix), None for none; UserError for a collate whose
    work cannot be split from the stacking of samples, which DALI does itself."""
    if collate_fn is None:
        return None
    mix = getattr(collate_fn, "mix", None)
    if not callable(mix):
        raise UserError(f"--loader dali cannot apply the training collate {type(collate_fn).__name__} (it has no "
                        f"batch-level `mix(images, labels)`); use --loader opencv")
    return mix


class DaliLoader:
    """Iterable of (image float NCHW, target) batches of one rank, built from a fresh DALI pipeline per pass; the
    target is an int64 label map NHW (segmentation), or int64 class labels N (classification, on the CPU as the
    OpenCV loader's), or Mixup/CutMix's dict when `mix` mixes the batch.

    `plan()` gives, for the pass about to start, every rank's list of (index, seed) in order (equal lengths, so
    DALI's contiguous shards are the ranks' lists) and how many batches this rank yields with how many real
    samples in each (padding samples, which only fill DALI's shards and last batch, are dropped).
    """

    def __init__(self, dataset, batch_size, rank, world_size, train, threads, device, sampler, mix=None):
        self.fn, self.types, self.Pipeline, self.feed_ndarray, self.TensorListGPU = import_dali()
        self.spec = dali_tasks.spec_for(dataset, train, self.types)
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.train, self.threads, self.device, self.sampler = train, threads, torch.device(device), sampler
        self.gpu, self.mix = self.device.type == "cuda", mix
        if mix is not None and not hasattr(self.spec, "drawn"):
            raise UserError("--loader dali mixes classification batches only (the training collate has a `mix`); "
                            "use --loader opencv")

    # -- what a pass reads -----------------------------------------------------------------------------------------
    def plan(self):
        if self.train:
            lists = []
            for r in range(self.world_size):  # every rank's sampler, to lay out the shards DALI cuts
                other = TrainSampler(self.dataset, self.world_size, r, self.sampler.seed, self.batch_size)
                other.set_epoch(self.sampler.epoch, self.sampler.start // self.batch_size)
                lists.append(list(other))
            batches = len(self)
            lists = [items[:batches * self.batch_size] for items in lists]  # drop_last, as the OpenCV loader
            return lists, [self.batch_size] * batches
        shares = [[(i, 0) for i in ShardSampler(len(self.dataset), r, self.world_size)] for r in range(self.world_size)]
        longest = -(-max(map(len, shares)) // self.batch_size) * self.batch_size
        mine = len(shares[self.rank])
        sizes = [min(self.batch_size, mine - b) for b in range(0, mine, self.batch_size)]
        return [share + [share[0]] * (longest - len(share)) for share in shares], sizes

    def __len__(self):
        if self.train:
            return len(self.sampler) // self.batch_size
        return -(-len(self.sampler) // self.batch_size)

    # -- the pipeline ----------------------------------------------------------------------------------------------
    def _source(self, items):
        """external_source callback: this rank's indices and the task's columns of one DALI iteration."""
        width = 1 + len(self.spec.layouts)

        def batch(info):
            start = info.iteration * self.batch_size % len(items)  # DALI may prefetch past the end: wrap around
            out = [[] for _ in range(width)]
            for index, seed in items[start:start + self.batch_size]:
                for column, value in zip(out, [np.int32(index), *self.spec.columns(index, seed)]):
                    column.append(value)
            return out

        return batch

    def build(self, lists):
        fn, types, spec = self.fn, self.types, self.spec
        order = [index for items in lists for index, _ in items]
        # On a GPU (written for it, not yet run on one): images decode on it (device="mixed") and the task's ops run
        # there; the per-sample arguments stay CPU inputs, as DALI wants.
        pipe = self.Pipeline(batch_size=self.batch_size, num_threads=self.threads,
                             device_id=self.device.index if self.gpu else None, prefetch_queue_depth=2)
        with pipe:
            encoded, label = fn.readers.file(files=[spec.path(i) for i in order],
                                             labels=[spec.reader_label(i) for i in order], shard_id=self.rank,
                                             num_shards=self.world_size, random_shuffle=False, stick_to_shard=True,
                                             pad_last_batch=True, name="images")
            source = fn.external_source(source=self._source(lists[self.rank]), num_outputs=1 + len(spec.layouts),
                                        batch=True, batch_info=True, layout=[None] + spec.layouts)
            # fancy chroma upsampling: what libjpeg (OpenCV) and DALI's CPU decoder do; the GPU's default is not
            image = fn.decoders.image(encoded, device="mixed" if self.gpu else "cpu", output_type=types.RGB,
                                      jpeg_fancy_upsampling=True)
            image, target = spec.graph(fn, types, image, label, source[1:], self.gpu)
            pipe.set_outputs(image, target, label, source[0])
        pipe.build()
        return pipe

    def _to_torch(self, tensor_list):
        tensor = tensor_list.as_tensor()
        gpu = isinstance(tensor_list, self.TensorListGPU)  # the reader's labels stay on the CPU
        out = torch.empty(tensor.shape(), dtype=TORCH_TYPES[tensor_list.dtype.name],
                          device=self.device if gpu else "cpu")
        self.feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(self.device) if gpu else None)
        return out

    def _mixed(self, images, labels, last):
        """The collate's mix of the batch, with np.random as the OpenCV loader leaves it after the batch's last
        sample `last` = (index, seed); the caller's np.random state is kept."""
        saved = np.random.get_state()
        np.random.set_state(self.spec.drawn(*last)[1].get_state())
        try:
            return self.mix(images, labels)
        finally:
            np.random.set_state(saved)

    def __iter__(self):
        lists, sizes = self.plan()
        if not sizes:
            return
        pipe = self.build(lists)
        try:
            for k, real in enumerate(sizes):
                image, target, label, index = pipe.run()
                items = lists[self.rank][k * self.batch_size:k * self.batch_size + real]
                expected = [i for i, _ in items]
                # both are CPU outputs (the reader's labels and the external source's), on a GPU run too
                read = [int(np.asarray(label[j]).reshape(-1)[0]) for j in range(real)]
                if read != [self.spec.reader_label(i) for i in expected] or \
                        [int(np.asarray(index[j])) for j in range(real)] != expected:
                    raise RuntimeError(f"DALI read labels {read} for samples {expected} (rank {self.rank}, batch "
                                       f"{k}): the image reader and the external source are out of step")
                # a mask is N x H x W x 1, the reader's labels N x 1
                image, target = self._to_torch(image)[:real], self._to_torch(target)[:real, ..., 0].long()
                yield self._mixed(image, target, items[-1]) if self.mix else (image, target)
        finally:
            del pipe


def build_train_loader(dataset, batch_size, rank, world_size, seed, threads=2, device="cpu", collate_fn=None):
    """(loader, sampler) like data.loaders.build_train_loader: call sampler.set_epoch(epoch[, start_batch]).
    A `collate_fn` with a batch-level `mix` (MixCollate) mixes each batch as it mixes the OpenCV loader's."""
    loaders.check_full_batch(dataset, batch_size, world_size)
    sampler = TrainSampler(dataset, world_size, rank, seed, batch_size)
    return DaliLoader(dataset, batch_size, rank, world_size, True, threads, device, sampler,
                      batch_mixer(collate_fn)), sampler


def build_eval_loader(dataset, batch_size, rank, world_size, threads=2, device="cpu"):
    """Like data.loaders.build_eval_loader: this rank's ShardSampler share, each image once, full size."""
    sampler = ShardSampler(len(dataset), rank, world_size)
    return DaliLoader(dataset, batch_size, rank, world_size, False, threads, device, sampler)
