"""Data-pipeline benchmark: the suite's OpenCV training pipelines against torchvision transforms.v2 doing the same work.

    python benchmarks/data_pipeline.py [--repeats 5] [--workers 0 1 2] [--task segmentation classification]
                                       [--passes 3] [--data_cache DIR] [--out FILE.md]

segmentation: the suite's "voc" dataset (data/voc.py's registry: cv2 JPEG + PIL palette PNG reads, TrainTransform) vs
  PIL decodes (image RGB, label palette indices) -> RandomScale (below) -> RandomCrop(pad_if_needed, fill image =
  mean colour, mask = 255) -> RandomHorizontalFlip -> ToDtype(image float32 scaled, mask int64) -> Normalize,
  on the built-in 128 px scenes.
classification: the suite's "folder" dataset (cv2 read, cls_transforms.TrainTransform) vs PIL decode (RGB) ->
  RandomResizedCrop -> RandomHorizontalFlip -> ToDtype -> Normalize -> RandomRotation(fill 0), on the built-in digits.
Settings are the training defaults (train.py / tasks/*.py), except classification's hflip_prob 0.5 (default 0) so
that the flip is part of the work. Both pipelines run in the same loader: data.loaders.build_train_loader, i.e. the
suite's make_loader (forkserver workers, persistent) with its per-sample seeding, as training uses it.
The "loader only" row times the same loader over one precomputed sample: what a batch costs with no pipeline work,
the ceiling that every pipeline's figure is under (with workers: collate into shared memory and the hand-over).
Throughput = images / wall second over `--passes` epochs after one untimed warm-up epoch (worker start excluded);
the pipelines are measured alternately (A B A B ...) and the table shows medians over `--repeats`.
Cores: 0 workers -> 1 core (the main process does the work), N workers -> N cores (the main process only collates).
The measuring process runs torch.set_num_threads(1) and cv2.setNumThreads(0); workers get the same from the loader.
"""
import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from argparse import Namespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import tv_tensors  # noqa: E402
from torchvision.transforms import v2  # noqa: E402
from torchvision.transforms.v2 import functional as F  # noqa: E402

from data import digits, folder, synthetic, voc  # noqa: E402
from data.loaders import build_train_loader  # noqa: E402
from data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from tasks.classification import DATASETS as CLS_DATASETS  # noqa: E402
from utils import IGNORE_INDEX  # noqa: E402

# Training defaults: train.py (--hflip_prob, --batchsize), tasks/segmentation.py, tasks/classification.py.
SEG = dict(crop_size=96, scale_range=(0.75, 1.5), hflip_prob=0.5, batch=8, numclasses=len(synthetic.SYNTHETIC_CLASSES))
CLS = dict(image_size=16, rrc_scale=(0.35, 1.0), rrc_ratio=(3 / 4, 4 / 3), hflip_prob=0.5, rotation=10.0, batch=64)
MEAN_RGB = tuple(round(255 * m) for m in IMAGENET_MEAN)   # padding with this is ~0 after normalising, like the suite


# ---------------------------------------------------------------------------------------------
# The suite's pipelines, built the way training builds them (its dataset registries).

def suite_segmentation(root, cfg=SEG):
    args = Namespace(crop_size=cfg["crop_size"], scale_range=list(cfg["scale_range"]), hflip_prob=cfg["hflip_prob"],
                     numclasses=cfg["numclasses"])
    return voc.DATASETS.get("voc")(args, root, "train", train=True)


def suite_classification(root, cfg=CLS):
    classes, samples = folder.scan_image_folder(root)
    args = Namespace(image_size=cfg["image_size"], train_crop="random_resized", rrc_scale=list(cfg["rrc_scale"]),
                     rrc_ratio=list(cfg["rrc_ratio"]), hflip_prob=cfg["hflip_prob"], vflip_prob=0.0,
                     rotation=cfg["rotation"], color_jitter=[0.0] * 4, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    return CLS_DATASETS.get("folder")(args, root, samples, classes, train=True)


# ---------------------------------------------------------------------------------------------
# The torchvision v2 pipelines. Randomness from torch's generator, which build_train_loader seeds per sample.

class RandomScale(v2.Transform):
    """Resize by one factor drawn uniformly from `scale_range` (v2.RandomResize draws a size, not a factor): images
    bilinear without antialiasing (cv2.INTER_LINEAR), masks NEAREST_EXACT (cv2.INTER_NEAREST_EXACT), as the suite."""

    def __init__(self, scale_range):
        super().__init__()
        self.low, self.high = scale_range

    def make_params(self, flat_inputs):
        return {"scale": self.low + (self.high - self.low) * float(torch.rand(()))}

    def transform(self, inpt, params):
        h, w = F.get_size(inpt)
        size = [max(1, round(h * params["scale"])), max(1, round(w * params["scale"]))]
        mask = isinstance(inpt, tv_tensors.Mask)
        mode = v2.InterpolationMode.NEAREST_EXACT if mask else v2.InterpolationMode.BILINEAR
        return self._call_kernel(F.resize, inpt, size, interpolation=mode, antialias=False)


def v2_segmentation_transform(cfg=SEG):
    return v2.Compose([
        RandomScale(cfg["scale_range"]),
        v2.RandomCrop(cfg["crop_size"], pad_if_needed=True, fill={tv_tensors.Image: MEAN_RGB, tv_tensors.Mask: 255}),
        v2.RandomHorizontalFlip(cfg["hflip_prob"]),
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def v2_classification_transform(cfg=CLS):
    return v2.Compose([
        v2.RandomResizedCrop(cfg["image_size"], scale=cfg["rrc_scale"], ratio=cfg["rrc_ratio"], antialias=True),
        v2.RandomHorizontalFlip(cfg["hflip_prob"]),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.RandomRotation(cfg["rotation"], interpolation=v2.InterpolationMode.BILINEAR, fill=0.0)])


class V2Segmentation(torch.utils.data.Dataset):
    """The same split and files as the suite's dataset, decoded by PIL (torchvision.io's decoders are deprecated in
    0.29): the JPEG as an RGB tv_tensors.Image, the palette PNG's indices as a tv_tensors.Mask."""

    def __init__(self, root, transform, split="train"):
        self.root, self.ids, self.transform = root, voc._read_list(root, split), transform

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image_path, label_path = voc._sample_paths(self.root, self.ids[index])
        with Image.open(image_path) as im:
            image = tv_tensors.Image(F.pil_to_tensor(im.convert("RGB")))
        with Image.open(label_path) as im:
            mask = tv_tensors.Mask(torch.from_numpy(np.array(im)))
        image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


class V2Classification(torch.utils.data.Dataset):
    def __init__(self, root, transform):
        self.transform = transform
        _, samples = folder.scan_image_folder(root)
        self.items = [(os.path.join(root, rel), label) for rel, label in samples]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, label = self.items[index]
        with Image.open(path) as im:
            image = tv_tensors.Image(F.pil_to_tensor(im.convert("RGB")))
        return self.transform(image).as_subclass(torch.Tensor), label


class LoaderOnly(torch.utils.data.Dataset):
    """The loader's own ceiling: the suite's first sample, computed once and returned for every index, so timing it
    measures only what every pipeline pays per batch (sampler, per-sample seeding, collate into shared memory,
    passing the batch between processes)."""

    def __init__(self, dataset):
        self.sample, self.length = _seeded(dataset, 0, 0), len(dataset)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return self.sample


def build_pipelines(task, cache):
    """(root, {name: dataset}) of a task; the data is generated locally and deterministically under `cache`."""
    if task == "segmentation":
        root = synthetic.ensure_builtin_dataset(cache)
        return root, {"suite": suite_segmentation(root), "v2": V2Segmentation(root, v2_segmentation_transform())}
    root = digits.ensure_digits(cache)
    return root, {"suite": suite_classification(root), "v2": V2Classification(root, v2_classification_transform())}


def dali_loader(task, root, cfg, workers, batch):
    """The third column: (loader, sampler) of data/dali.py's pipeline on the same dataset, with max(1, workers) DALI
    threads in place of loader workers; None when NVIDIA DALI is not installed, and for classification: CLS rotates
    (--rotation 10, the task's default), which the DALI loader does not reproduce."""
    if task != "segmentation" or importlib.util.find_spec("nvidia") is None \
            or importlib.util.find_spec("nvidia.dali") is None:
        return None
    from data import dali
    return dali.build_train_loader(suite_segmentation(root, cfg), batch, 0, 1, seed=0, threads=max(1, workers))


# ---------------------------------------------------------------------------------------------
# Equivalence: what each pipeline gives for one sample must agree in shape, dtype and value range.

def _seeded(dataset, index, seed):
    np.random.seed(seed)
    torch.manual_seed(seed)
    return dataset[index]


def check_equivalence(task, datasets, samples=4, cfg=None):
    """AssertionError unless the v2 pipeline's samples match the suite's in shape, dtype, value range and targets."""
    cfg = cfg or (SEG if task == "segmentation" else CLS)
    lo = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1) - 1e-4
    hi = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1) + 1e-4
    size = (cfg["crop_size"],) * 2 if task == "segmentation" else (cfg["image_size"],) * 2
    for index in range(samples):
        (a_img, a_tgt), (b_img, b_tgt) = (_seeded(datasets[name], index, 1000 + index) for name in ("suite", "v2"))
        for name, img in (("suite", a_img), ("v2", b_img)):
            assert type(img) is torch.Tensor and img.dtype == torch.float32 and img.shape == (3, *size), \
                f"{task} {name} image #{index}: {img.dtype} {tuple(img.shape)}; expected float32 3x{size}"
            assert bool(((img >= lo) & (img <= hi)).all()), f"{task} {name} image #{index} is outside normalised 0..1"
        assert abs(float(a_img.mean() - b_img.mean())) < 1.0, f"{task}: image means differ (normalisation?)"
        if task == "segmentation":
            for name, mask in (("suite", a_tgt), ("v2", b_tgt)):
                assert mask.dtype == torch.int64 and mask.shape == size, \
                    f"segmentation {name} mask #{index}: {mask.dtype} {tuple(mask.shape)}; expected int64 {size}"
                bad = mask[(mask >= cfg["numclasses"]) & (mask != IGNORE_INDEX)]
                assert bad.numel() == 0, f"segmentation {name} mask #{index} has class id {int(bad[0])}"
                assert (mask != IGNORE_INDEX).any(), f"segmentation {name} mask #{index} is all ignore"
        else:
            assert isinstance(a_tgt, int) and a_tgt == b_tgt, f"classification label #{index}: {a_tgt} vs {b_tgt}"


def check_identity_settings(task, root):
    """With every random step made a no-op (scale 1, no flip, crop = whole image / full-area crop, no rotation) both
    pipelines must give the same sample: same decode, same normalisation, same mask. Max |difference| is returned."""
    if task == "segmentation":
        size = voc.SegmentationDataset(root, "train").image_size(0)[0]
        cfg = dict(SEG, crop_size=size, scale_range=(1.0, 1.0), hflip_prob=0.0)
        a, b = suite_segmentation(root, cfg)[0], V2Segmentation(root, v2_segmentation_transform(cfg))[0]
        assert torch.equal(a[1], b[1]), "segmentation: masks differ at identity settings"
    else:
        side = folder.read_rgb(os.path.join(root, folder.scan_image_folder(root)[1][0][0])).shape[0]
        cfg = dict(CLS, image_size=side, rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), hflip_prob=0.0, rotation=0.0)
        a, b = suite_classification(root, cfg)[0], V2Classification(root, v2_classification_transform(cfg))[0]
    diff = float((a[0] - b[0]).abs().max())
    assert diff < 0.1, f"{task}: images differ by {diff:.3f} (normalised units) at identity settings"
    return diff


# ---------------------------------------------------------------------------------------------
# Timing.

def images_per_second(loader, sampler, passes):
    count, start = 0, time.perf_counter()
    for epoch in range(passes):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for batch in loader:
            count += len(batch[0])
    return count / (time.perf_counter() - start)


def measure(task, root, datasets, workers, repeats, passes):
    """{(name, workers): [img/s per repeat]}, pipelines interleaved within each repeat."""
    cfg = SEG if task == "segmentation" else CLS
    rates = {}
    for w in workers:
        timed = dict(datasets, **{"loader only": LoaderOnly(datasets["suite"])})
        loaders = {name: build_train_loader(ds, cfg["batch"], w, 0, 1, seed=0) for name, ds in timed.items()}
        dali = dali_loader(task, root, cfg, w, cfg["batch"])
        if dali is not None:
            loaders["dali"] = dali
        for name, (loader, sampler) in loaders.items():
            images_per_second(loader, sampler, 1)                  # warm-up: worker start, first batches
        for _ in range(repeats):
            for name, (loader, sampler) in loaders.items():
                rates.setdefault((name, w), []).append(images_per_second(loader, sampler, passes))
        del loaders
    return rates


def table(task, rates, workers):
    lines = [f"| {task} | workers | cores | median img/s (min-max) | img/s per core | suite / v2 |",
             "|---|---:|---:|---:|---:|---:|"]
    for w in workers:
        cores = max(1, w)
        base = statistics.median(rates[("v2", w)])
        for name in [n for (n, ww) in rates if ww == w]:
            r = rates[(name, w)]
            med = statistics.median(r)
            ratio = "-" if name == "loader only" else "1.00" if name == "v2" else f"{med / base:.2f}"
            lines.append(f"| {name} | {w} | {cores} | {med:.0f} ({min(r):.0f}-{max(r):.0f}) | {med / cores:.0f} "
                         f"| {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--passes", type=int, default=3, help="epochs per timed measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--task", nargs="+", default=["segmentation", "classification"],
                   choices=["segmentation", "classification"])
    p.add_argument("--data_cache", default=None, help="where the built-in data is generated (default: a temp folder)")
    p.add_argument("--out", default=None, help="also write the report to this markdown file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(0)
    tmp = tempfile.TemporaryDirectory(prefix="pipebench-") if args.data_cache is None else None
    cache = args.data_cache or tmp.name
    report = [f"Command: `python benchmarks/data_pipeline.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
              f"Machine: {os.cpu_count()} logical CPUs, load average at start {os.getloadavg()[0]:.2f}; "
              f"torch {torch.__version__}; OpenCV {cv2.__version__}",
              "Loader: build_train_loader (suite's make_loader, per-sample seeding) for every pipeline; "
              "torch threads 1, OpenCV threads 0; cores = max(1, workers).",
              f"Timing: 1 warm-up epoch, then {args.passes} epochs per measurement, A/B interleaved, "
              f"median of {args.repeats}.", ""]
    print("\n".join(report), flush=True)
    for task in args.task:
        root, datasets = build_pipelines(task, cache)
        diff = check_identity_settings(task, root)
        check_equivalence(task, datasets)
        cfg = SEG if task == "segmentation" else CLS
        block = [f"{task}: {len(datasets['suite'])} images, batch {cfg['batch']}, "
                 f"{ {k: v for k, v in cfg.items() if k != 'batch'} }; equivalence checked (max |suite - v2| "
                 f"at identity settings: {diff:.1e})"]
        if dali_loader(task, root, cfg, 0, cfg["batch"]) is None:
            block.append("dali: not timed (NVIDIA DALI not installed, or no DALI loader for this task)")
        rates = measure(task, root, datasets, args.workers, args.repeats, args.passes)
        block += ["", table(task, rates, args.workers), ""]
        print("\n".join(block), flush=True)
        report += block
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(report) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
