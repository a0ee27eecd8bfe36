"""The optional NVIDIA DALI loader (--loader dali) for VOC-layout segmentation: train and eval loaders that look to
train.py and test.py like data/loaders.py's (same batches, same sampler interface, same per-sample augmentation).

Images go through DALI: fn.readers.file (sharded with shard_id/num_shards) and fn.decoders.image, on the GPU
(device="mixed") when the run has one, else on the CPU (device_id=None). Masks are palette PNGs whose pixel values
are palette indices (class ids); DALI's decoders expand a palette to colours (GRAY would be the colour's luminance,
not the class), so masks are read by data.readers.read_label (PIL) in an fn.external_source, which also carries
each sample's augmentation parameters. Resize, crop, pad and flip then run in DALI, identically on image and mask.

Order and randomness: each epoch's file list is this suite's own order (TrainSampler of every rank, laid out so
that DALI's contiguous shard r is exactly rank r's strided share), and each sample's scale, crop window and flip
are drawn from sample_seed(--seed, epoch, index) in the same way as TrainTransform draws them. So a resumed run
starts at `start_batch` by leaving those samples out of the list, and continues with exactly the batches (and the
augmentation) the interrupted run would have seen. DALI's own random ops and random_shuffle cannot do that: their
state depends on everything drawn before, which a resumed run has not drawn.
"""
import numpy as np
import torch

from data import loaders
from data.loaders import ShardSampler, TrainSampler
from data.readers import IGNORE_INDEX, read_label
from data.transforms import EvalTransform, TrainTransform
from utils import UserError

INSTALL = "pip install -r requirements-dali.txt"
TASKS = ("segmentation",)  # the tasks whose data this loader reads


def add_loader_args(group):
    group.add_argument("--loader", default="opencv", choices=["opencv", "dali"],
                       help="opencv: DataLoader workers with OpenCV/PIL; dali: NVIDIA DALI pipelines (segmentation on "
                            f"VOC-layout data; needs `{INSTALL}`)")
    group.add_argument("--dali_threads", type=int, default=2, help="--loader dali: CPU threads per DALI pipeline")


def loader_builders(args, ctx, task_name):
    """(build_train_loader, build_eval_loader) of --loader, both called like data/loaders.py's two builders.
    Called before the run writes anything, so a missing DALI or an unsupported task stops it with one line."""
    if getattr(args, "loader", "opencv") != "dali":
        return loaders.build_train_loader, loaders.build_eval_loader
    if task_name not in TASKS:
        raise UserError(f"--loader dali supports the {' and '.join(TASKS)} task, not {task_name}; "
                        f"use --loader opencv")
    import_dali()
    threads, device = args.dali_threads, ctx.device
    if threads < 1:
        raise UserError(f"--dali_threads {threads} is invalid; expected at least 1")

    def train(dataset, batch_size, workers, rank, world_size, seed, drop_last=True, collate_fn=None):
        return build_train_loader(dataset, batch_size, rank, world_size, seed, threads, device)

    def evaluate(dataset, batch_size, workers, rank, world_size, collate_fn=None):
        return build_eval_loader(dataset, batch_size, rank, world_size, threads, device)

    return train, evaluate


def import_dali():
    """(fn, types, Pipeline, feed_ndarray) of nvidia.dali, or a UserError saying how to install it."""
    try:
        from nvidia.dali import Pipeline, fn, types
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError as e:
        raise UserError(f"--loader dali needs NVIDIA DALI, which is not installed ({e}); install it with "
                        f"`{INSTALL}`, or use --loader opencv") from None
    return fn, types, Pipeline, feed_ndarray


def check_dataset(dataset, train):
    """The DALI path reads VOC-layout files itself: it needs the dataset's root, ids and plain label PNGs."""
    transform = TrainTransform if train else EvalTransform
    if not (hasattr(dataset, "root") and hasattr(dataset, "ids") and not getattr(dataset, "maps", None)
            and type(dataset.transform) is transform):
        raise UserError(f"--loader dali supports VOC-layout segmentation data (--dataset voc, or the built-in scenes) "
                        f"with the suite's own transforms; got {type(dataset).__name__}; use --loader opencv")


class DaliLoader:
    """Iterable of (image float NCHW, label int64 NHW) batches of one rank, built from a fresh DALI pipeline per pass.

    `plan()` gives, for the pass about to start, every rank's list of (index, seed) in order (equal lengths, so
    DALI's contiguous shards are the ranks' lists) and how many batches this rank yields with how many real
    samples in each (padding samples, which only fill DALI's shards and last batch, are dropped).
    """

    def __init__(self, dataset, batch_size, rank, world_size, train, threads, device, sampler):
        self.fn, self.types, self.Pipeline, self.feed_ndarray = import_dali()
        check_dataset(dataset, train)
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.train, self.threads, self.device, self.sampler = train, threads, torch.device(device), sampler
        self.gpu = self.device.type == "cuda"

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
    def _paths(self, index):
        root, image_id = self.dataset.root, self.dataset.ids[index]
        return f"{root}/JPEGImages/{image_id}.jpg", f"{root}/SegmentationClass/{image_id}.png"

    def _source(self, items):
        """external_source callback: this rank's masks, indices (and augmentation parameters) of one DALI iteration."""
        transform = self.dataset.transform

        def batch(info):
            start = info.iteration * self.batch_size % len(items)  # DALI may prefetch past the end: wrap around
            out = [[] for _ in range(7 if self.train else 2)]
            for index, seed in items[start:start + self.batch_size]:
                mask = read_label(self._paths(index)[1])
                values = [mask[..., None], np.int32(index)]
                if self.train:
                    h, w, y0, x0, flip = transform.draw(*mask.shape, np.random.RandomState(seed))
                    values += [np.float32(h), np.float32(w), np.array([y0, x0], np.int32),
                               np.array([transform.crop_h, transform.crop_w], np.int32), np.int32(flip)]
                for column, value in zip(out, values):
                    column.append(value)
            return out

        return batch

    def build(self, lists):
        fn, types = self.fn, self.types
        files = [self._paths(index)[0] for items in lists for index, _ in items]
        mine = lists[self.rank]
        transform = self.dataset.transform
        mean, std = transform.mean, transform.std
        # On a GPU (written for it, not yet run on one): JPEGs decode on it (device="mixed"), the masks are copied to
        # it, and resize/normalise/slice/flip/pad run there; the per-sample arguments stay CPU inputs, as DALI wants.
        pipe = self.Pipeline(batch_size=self.batch_size, num_threads=self.threads,
                             device_id=self.device.index if self.gpu else None, prefetch_queue_depth=2)
        with pipe:
            jpegs, index = fn.readers.file(files=files, labels=[i for items in lists for i, _ in items],
                                           shard_id=self.rank, num_shards=self.world_size, random_shuffle=False,
                                           stick_to_shard=True, pad_last_batch=True, name="images")
            source = fn.external_source(source=self._source(mine), num_outputs=7 if self.train else 2, batch=True,
                                        batch_info=True, layout=["HWC"] + [None] * (6 if self.train else 1))
            mask, mask_index = source[0], source[1]
            image = fn.decoders.image(jpegs, device="mixed" if self.gpu else "cpu", output_type=types.RGB)
            mask = mask.gpu() if self.gpu else mask
            if self.train:
                out_h, out_w, start, shape, flip = source[2:]
                # bilinear without antialiasing and nearest at pixel centres: cv2's INTER_LINEAR and
                # INTER_NEAREST_EXACT, as TrainTransform resizes
                image = fn.resize(image, resize_y=out_h, resize_x=out_w, interp_type=types.INTERP_LINEAR,
                                  antialias=False)
                mask = fn.resize(mask, resize_y=out_h, resize_x=out_w, interp_type=types.INTERP_NN, antialias=False)
            image = fn.crop_mirror_normalize(image, dtype=types.FLOAT, output_layout="CHW",
                                             mean=[255 * m for m in mean], std=[255 * s for s in std])
            if self.train:
                # a window that sticks out of the image is padding: 0 (the mean) for the image, ignore for the mask
                image = fn.slice(image, start=start, shape=shape, axis_names="HW", out_of_bounds_policy="pad",
                                 fill_values=0.0)
                mask = fn.slice(mask, start=start, shape=shape, axis_names="HW", out_of_bounds_policy="pad",
                                fill_values=float(IGNORE_INDEX))
                image, mask = fn.flip(image, horizontal=flip), fn.flip(mask, horizontal=flip)
            else:  # images of one batch may differ in size: pad at the bottom/right, like pad_collate
                image = fn.pad(image, axis_names="HW", fill_value=0.0)
                mask = fn.pad(mask, axis_names="HW", fill_value=float(IGNORE_INDEX))
            pipe.set_outputs(image, mask, index, mask_index)
        pipe.build()
        return pipe

    def _to_torch(self, tensor_list, dtype):
        tensor = tensor_list.as_tensor()
        out = torch.empty(tensor.shape(), dtype=dtype, device=self.device)
        self.feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(self.device) if self.gpu else None)
        return out

    def __iter__(self):
        lists, sizes = self.plan()
        if not sizes:
            return
        pipe = self.build(lists)
        try:
            for k, real in enumerate(sizes):
                image, mask, index, mask_index = pipe.run()
                expected = [i for i, _ in lists[self.rank][k * self.batch_size:k * self.batch_size + real]]
                # both indices are CPU outputs (the reader's labels and the external source's), on a GPU run too
                read = [int(np.asarray(index[j]).reshape(-1)[0]) for j in range(real)]
                if read != expected or [int(np.asarray(mask_index[j])) for j in range(real)] != expected:
                    raise RuntimeError(f"DALI read samples {read} where {expected} were expected (rank {self.rank}, "
                                       f"batch {k}): the image reader and the mask source are out of step")
                yield (self._to_torch(image, torch.float32)[:real],
                       self._to_torch(mask, torch.uint8)[:real, ..., 0].long())
        finally:
            del pipe


def build_train_loader(dataset, batch_size, rank, world_size, seed, threads=2, device="cpu"):
    """(loader, sampler) like data.loaders.build_train_loader: call sampler.set_epoch(epoch[, start_batch])."""
    loaders.check_full_batch(dataset, batch_size, world_size)
    sampler = TrainSampler(dataset, world_size, rank, seed, batch_size)
    return DaliLoader(dataset, batch_size, rank, world_size, True, threads, device, sampler), sampler


def build_eval_loader(dataset, batch_size, rank, world_size, threads=2, device="cpu"):
    """Like data.loaders.build_eval_loader: this rank's ShardSampler share, each image once, full size."""
    sampler = ShardSampler(len(dataset), rank, world_size)
    return DaliLoader(dataset, batch_size, rank, world_size, False, threads, device, sampler)
