"""Image classification: ImageFolder trees, list files or the built-in digits, any torchvision classifier,
cross-entropy/focal with label smoothing, class weights, Mixup and CutMix, top-1/top-k and per-class metrics."""
import csv
import io
import os
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np
import torch

from core.distributed import barrier, gather_objects
from core.registry import Registry, check_no_kwargs
from data import check_cache, cls_transforms, digits, folder
from data.mixing import MixCollate, MixedCriterion
from data.unreadable import SkipUnreadable, Unreadable
from evaluation import inference
from evaluation.metrics import ClassificationMetrics
from models import classifiers
from models import weights as model_weights
from models.losses import build_criterion
from models.registry import MODELS, build_model
from tasks.base import log
from tasks.segmentation import denormalize
from utils import UserError, write_atomic

# Classification datasets by --dataset name; a plugin registers more with `register_classification_dataset`.
DATASETS = Registry("classification dataset")
register_classification_dataset = DATASETS.register
# Classification models by --model_type; every torchvision architecture is available without registering.
CLASSIFIERS = Registry("classification model")
register_classifier = CLASSIFIERS.register
SPLIT_FILE = "split.json"


class ClassificationTask:
    name = "classification"
    accuracy = "top1"  # what "accuracy" means in --metrics
    primary = "top1"
    labels = {**{f"top{k}": f"top-{k}" for k in range(1, 21)}, "macro_f1": "macro F1", "raw_top1": "raw weights top-1"}
    datasets = DATASETS
    outputs = "predictions"  # what infer.py writes per image
    eval_collate = SkipUnreadable()  # an unreadable val image is dropped from its batch (evaluation logs it)
    # Defaults that suit the built-in digits on a CPU (like segmentation's suit its built-in scenes), here for the
    # flags both tasks share; configs/ddp_example.toml is the template for ImageNet-like data on GPUs.
    defaults = {"model_type": "resnet", "dataset": "folder", "epochs": 4, "batchsize": 64, "val_batchsize": 64,
                "lr": 0.04, "lr_scheduler": "cosine", "weight_decay": 5e-4, "warmup_epochs": 0.5, "hflip_prob": 0.0,
                "vis_images": 16, "workers": 1, "label_smoothing": 0.1, "optimizer": "sgd", "loss": ["ce"]}

    def __init__(self):
        self.splits = None

    # -- flags ------------------------------------------------------------------------------------
    @staticmethod
    def add_train_args(parser):
        g = parser.add_argument_group("classification")
        g.add_argument("--image_size", type=int, default=16,
                       help="side of the square network input in pixels (16 suits the built-in 8x8 digits; 224 is "
                            "ImageNet's)")
        g.add_argument("--val_resize", type=int, default=None,
                       help="evaluation: shorter side resized to this, then a centre crop of --image_size "
                            "(default: --image_size, no crop)")
        g.add_argument("--train_crop", default="random_resized", choices=["random_resized", "resize"],
                       help="random_resized: a random area (--rrc_scale) and aspect (--rrc_ratio) resized to "
                            "--image_size; resize: the whole image resized")
        g.add_argument("--rrc_scale", type=float, nargs=2, default=[0.35, 1.0], metavar=("MIN", "MAX"),
                       help="area fraction range of the random resized crop")
        g.add_argument("--rrc_ratio", type=float, nargs=2, default=[3 / 4, 4 / 3], metavar=("MIN", "MAX"),
                       help="aspect-ratio range of the random resized crop")
        g.add_argument("--vflip_prob", type=float, default=0.0)
        g.add_argument("--rotation", type=float, default=10.0, help="random rotation within +-DEG degrees")
        g.add_argument("--color_jitter", type=float, nargs=4, default=[0.0, 0.0, 0.0, 0.0],
                       metavar=("BRIGHTNESS", "CONTRAST", "SATURATION", "HUE"),
                       help="random colour changes: factors in [1-x, 1+x], hue shift up to +-HUE of the circle")
        g.add_argument("--mean", type=float, nargs=3, default=None,
                       help="normalisation mean of R, G, B (0..1); default: the --pretrained weights' by name, "
                            "else ImageNet's")
        g.add_argument("--std", type=float, nargs=3, default=None, help="likewise the standard deviations")
        g.add_argument("--split_ratio", type=float, nargs="+", default=[0.8, 0.1, 0.1], metavar="R",
                       help="train val [test] shares of one image-folder tree (stratified, stable per --split_seed; "
                            "saved as split.json in the run folder)")
        g.add_argument("--split_seed", type=int, default=0)
        g.add_argument("--image_check", default="header", choices=["full", "header", "none"],
                       help="before training, every image of a folder or list dataset is decoded (full), has its "
                            "header read (header) or is not checked (none); files that passed keep a record in "
                            "--data_cache, so a restart checks only changed files. An image that cannot be decoded "
                            "during training is skipped, logged and counted")
        g.add_argument("--stem", default="auto", choices=["auto", "imagenet", "small"],
                       help="ResNet stem: small is a 3x3 stride-1 conv without max-pool for 8-64 px inputs; "
                            "auto picks it for ResNets at --image_size <= 64")
        g.add_argument("--topk", type=int, default=5, help="top-k accuracy (capped at the number of classes)")
        g.add_argument("--label_smoothing", type=float, default=0.0, help="cross-entropy label smoothing in [0, 1)")
        g.add_argument("--class_weights", type=float, nargs="+", default=None, metavar="W",
                       help="cross-entropy weight of each class (one per class)")
        g.add_argument("--mixup_prob", type=float, default=0.0, help="chance that a batch is mixed with Mixup")
        g.add_argument("--cutmix_prob", type=float, default=0.0, help="chance that a batch is mixed with CutMix")
        g.add_argument("--mixup_alpha", type=float, default=0.2, help="Beta(a, a) of the Mixup weight")
        g.add_argument("--cutmix_alpha", type=float, default=1.0, help="Beta(a, a) of the CutMix area")
        return [g]

    # -- data -------------------------------------------------------------------------------------
    def prepare_data(self, args, ctx):
        """(root, class names) of the run, with its splits kept on the task. Sets args.numclasses."""
        root = resolve_root(args.dataset_path, args.data_cache, ctx)
        self.classes, self.splits = load_splits(args, root, args.logdir)
        if ctx.is_main and self.splits.get("written") is None and self.splits["kind"] == "ratio":
            folder.write_split(os.path.join(args.logdir, SPLIT_FILE), self.splits["samples"], self.classes,
                               {"ratio": args.split_ratio, "seed": args.split_seed, "root": os.path.abspath(root)})
        check_numclasses(args, len(self.classes))
        return root, list(self.classes)

    def build_datasets(self, args, root):
        build = DATASETS.get(args.dataset)
        return (build(args, root, self.split(args.train_split), self.classes, train=True),
                build(args, root, self.split(args.val_split), self.classes, train=False))

    def split(self, name):
        samples = self.splits["samples"]
        if name not in samples:
            raise UserError(f"split '{name}' does not exist in {self.splits['where']}; expected one of "
                            f"{', '.join(samples)}")
        return samples[name]

    @staticmethod
    def train_collate(args):
        mix = (MixCollate(args.mixup_prob, args.cutmix_prob, args.mixup_alpha, args.cutmix_alpha)
               if args.mixup_prob or args.cutmix_prob else None)
        if getattr(args, "loader", "opencv") == "dali":  # DALI decodes and stacks itself: only the mix applies
            return mix
        return SkipUnreadable(mix, (3, args.image_size, args.image_size))

    # -- model, loss, metric ------------------------------------------------------------------------
    @staticmethod
    def build_model(args):
        if MODELS.takes_kwargs(args.model_type):  # a class registered with MODELS.register_module() (seed 001)
            return build_model(args)
        check_no_kwargs(getattr(args, "model_kwargs", None), "--model_kwargs", f"model {args.model_type}",
                        allowed={"num_classes"})
        if args.model_type in CLASSIFIERS:
            return CLASSIFIERS.get(args.model_type)(args)
        arch = classifiers.resolve_arch(args.model_type, args.layers)
        return classifiers.build_classifier(arch, args.numclasses, args.layers, args.stem, args.image_size)

    @staticmethod
    def describe_model(model, args):
        if MODELS.takes_kwargs(args.model_type):
            return f"{args.model_type}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters"
        arch = args.model_type if args.model_type in CLASSIFIERS else classifiers.resolve_arch(args.model_type,
                                                                                                args.layers)
        small = arch in classifiers.classifier_names() and classifiers.uses_small_stem(arch, args.stem,
                                                                                       args.image_size)
        return (f"{arch}{' (small-input stem)' if small else ''}, {args.image_size} px input: "
                f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")

    @staticmethod
    def weights_arch(args):
        """The torchvision architecture whose published weights --pretrained NAME loads (None: a custom model)."""
        if MODELS.takes_kwargs(args.model_type) or args.model_type in CLASSIFIERS:
            return None
        return classifiers.resolve_arch(args.model_type, args.layers)

    @staticmethod
    def resolve_normalisation(args, weights):
        """--mean/--std: given, else the named weights', else ImageNet's; the line to log, or None."""
        return model_weights.resolve_normalisation(args, weights)

    @staticmethod
    def load_pretrained(model, path, strict, state=None):
        """What fits from a torchvision state dict; a classifier of another shape stays as initialised."""
        return classifiers.load_classifier_weights(model, path, strict, state)

    @staticmethod
    def build_criterion(args, model):
        if args.class_weights is not None and len(args.class_weights) != args.numclasses:
            raise UserError(f"--class_weights has {len(args.class_weights)} values; expected one per class "
                            f"({args.numclasses})")
        return MixedCriterion(build_criterion(args))

    @staticmethod
    def new_metric(numclasses, device, args):
        return ClassificationMetrics(numclasses, device, args.topk)

    @staticmethod
    def metric_names(args):
        return ClassificationMetrics(max(args.numclasses or 10, 1), "cpu", args.topk).compute().keys()

    @staticmethod
    def predict(model, image, options=None):
        """Class probabilities N x K."""
        with inference.autocast(image.device, options.amp_dtype if options else None):
            return model(image).float().softmax(1)

    @staticmethod
    @torch.no_grad()
    def prediction_grid(model, dataset, count, device, class_names):
        """The first `count` val images in a grid, each captioned 'true>predicted' (red when wrong)."""
        model.eval()
        tiles = []
        for index in range(min(count, len(dataset))):
            item = dataset[index]
            if isinstance(item, Unreadable):
                continue
            image, label = item
            pred = int(model(image[None].to(device)).argmax(1)[0])
            tile = cv2.resize(denormalize(image), (96, 96), interpolation=cv2.INTER_NEAREST)
            tile = cv2.copyMakeBorder(tile, 0, 18, 0, 0, cv2.BORDER_CONSTANT, value=(255, 255, 255))
            colour = (0, 128, 0) if pred == label else (200, 0, 0)
            cv2.putText(tile, f"{class_names[label]}>{class_names[pred]}"[:14], (2, 110), cv2.FONT_HERSHEY_SIMPLEX,
                        0.38, colour, 1, cv2.LINE_AA)
            tiles.append(cv2.copyMakeBorder(tile, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=(255, 255, 255)))
        columns = 8
        tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % columns)
        return np.concatenate([np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)])

    # -- test.py ----------------------------------------------------------------------------------
    def resolve_eval_root(self, trained, args, ctx):
        return resolve_root(args.dataset_path or trained.dataset_path, args.data_cache, ctx)

    def eval_dataset(self, trained, root, split, run_dir=None):
        self.classes, self.splits = load_splits(trained, root, run_dir)
        return DATASETS.get(trained.dataset)(trained, root, self.split(split), self.classes, train=False)

    @staticmethod
    def predict_options(args, trained, device):
        return CropOptions(amp_dtype=inference.resolve_amp(args, device), image_size=trained.image_size,
                           resize=trained.val_resize)

    @staticmethod
    def test_batchsize(trained):
        return trained.val_batchsize  # every image is resized and cropped to one size

    @staticmethod
    def per_class_table(names, metrics):
        return [("precision", metrics["precision"]), ("recall", metrics["recall"]), ("F1", metrics["f1"]),
                ("support", metrics["support"])]

    @staticmethod
    def test_writer(args, dataset, names, save_path):
        return MistakeWriter(dataset, names, save_path, args.topk)

    # -- infer.py ---------------------------------------------------------------------------------
    @staticmethod
    def infer_transform(trained):
        return eval_transform(trained)

    @staticmethod
    def example_size(trained):
        return (trained.image_size, trained.image_size)

    @staticmethod
    def output_files(stem, args):
        return {}  # everything goes into predictions.jsonl (and predictions.csv)

    @staticmethod
    def infer_record(probs, item, job, names, args):
        top = probs.float().topk(max(1, min(args.topk, len(names))))
        ranked = [{"class": names[i], "index": int(i), "prob": round(float(p), 6)}
                  for p, i in zip(top.values.tolist(), top.indices.tolist())]
        return {"path": job["path"], "class": ranked[0]["class"], "index": ranked[0]["index"],
                "prob": ranked[0]["prob"], "topk": ranked}


@dataclass
class CropOptions(inference.PredictOptions):
    """How a classifier sees an image: its shorter side resized, a centre crop, one pass (and autocast)."""
    image_size: int = 224
    resize: Optional[int] = None

    def as_dict(self):
        return {"image_size": self.image_size, "resize": self.resize or self.image_size,
                "amp_dtype": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else None}

    def describe(self):
        return (f"shorter side resized to {self.resize or self.image_size} px, centre crop {self.image_size} px"
                + (f", autocast {str(self.amp_dtype).replace('torch.', '')}" if self.amp_dtype else ""))


# ---------------------------------------------------------------------------------------------
# Data sources: the built-in digits, pre-split folders, list files, or one tree split by ratio.

def resolve_root(dataset_path, cache_dir, ctx):
    """--dataset_path, else the built-in digits, written once per machine by local rank 0."""
    if dataset_path:
        if not os.path.isdir(dataset_path):
            raise UserError(f"--dataset_path {dataset_path} does not exist; expected an image folder "
                            f"(root/<class>/<image>), train/ and val/ folders, or train.txt and val.txt lists")
        return dataset_path
    root = None
    if ctx.local_rank == 0:
        root = digits.ensure_digits(cache_dir)
    barrier()
    return root or digits.ensure_digits(cache_dir)


def load_splits(args, root, run_dir):
    """(classes, {"kind", "where", "samples": {split: [(path, label)]}}) for the layout found at `root`.

    A split.json in `run_dir` (a resumed run, test.py) wins, so every later use sees the split the run trained on.
    """
    saved = os.path.join(run_dir, SPLIT_FILE) if run_dir else None
    if saved and os.path.isfile(saved):
        classes, samples = folder.read_split(saved)
        return classes, {"kind": "ratio", "where": saved, "samples": samples, "written": True}
    presplit = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, s))]
    lists = [s for s in ("train", "val", "test") if os.path.isfile(os.path.join(root, s + ".txt"))]
    if {"train", "val"} <= set(presplit):
        classes, train = folder.scan_image_folder(os.path.join(root, "train"))
        samples = {"train": [(f"train/{p}", y) for p, y in train]}
        for name in presplit[1:]:
            found, items = folder.scan_image_folder(os.path.join(root, name))
            where = os.path.join(root, name)
            missing = sorted(set(found) - set(classes))
            if missing:
                raise UserError(f"class '{missing[0]}' is in {where} but not in {os.path.join(root, 'train')}; "
                                f"expected every {name} class to have training images")
            samples[name] = [(f"{name}/{p}", classes.index(found[y])) for p, y in items]
        return classes, {"kind": "folders", "where": root, "samples": samples}
    if {"train", "val"} <= set(lists):
        names_file = os.path.join(root, "classes.txt")
        classes = read_names(names_file) if os.path.isfile(names_file) else None
        classes, train = folder.read_list_file(os.path.join(root, "train.txt"), root, classes)
        samples = {"train": train}
        for name in lists[1:]:
            _, samples[name] = folder.read_list_file(os.path.join(root, name + ".txt"), root, classes)
            folder.check_val_classes(train, samples[name], classes, os.path.join(root, name + ".txt"))
        return classes, {"kind": "lists", "where": root, "samples": samples}
    classes, items = folder.scan_image_folder(root)
    return classes, {"kind": "ratio", "where": f"{root} (split by --split_ratio)",
                     "samples": folder.stratified_split(items, args.split_ratio, args.split_seed)}


def read_names(path):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def check_numclasses(args, found):
    if args.numclasses and args.numclasses != found:
        raise UserError(f"--numclasses {args.numclasses}, but the data has {found} classes; drop the flag or fix "
                        f"the data")
    args.numclasses = found


@register_classification_dataset("folder")
def build_folder_dataset(args, root, samples, classes, train):
    """Images by path relative to `root`, checked before the first step at --image_check (a file that passed
    before, unchanged, is not read again); an image unreadable later is skipped by the loader."""
    if not samples:
        raise UserError(f"a split of {root} has no images; expected at least one per split")
    cache_dir, level = getattr(args, "data_cache", None), getattr(args, "image_check", "header")
    if level != "none":
        log.info(folder.check_images_per_machine(root, samples, level,
                                                 check_cache.cache_file(cache_dir, root) if cache_dir else None))
    transform = train_transform(args) if train else eval_transform(args)
    return folder.ClassificationDataset(root, samples, classes, transform, skip_unreadable=True)


def train_transform(args):
    return cls_transforms.TrainTransform(
        args.image_size, scale=tuple(args.rrc_scale) if args.train_crop == "random_resized" else None,
        ratio=tuple(args.rrc_ratio), hflip_prob=args.hflip_prob, vflip_prob=args.vflip_prob,
        rotation=args.rotation, color_jitter=tuple(args.color_jitter), **normalisation(args))


def eval_transform(args):
    return cls_transforms.EvalTransform(args.image_size, args.val_resize, **normalisation(args))


def normalisation(args):
    """--mean/--std; train.py resolves them (models.weights.resolve_normalisation), other callers get ImageNet's."""
    return {"mean": tuple(args.mean or cls_transforms.IMAGENET_MEAN), "std": tuple(args.std or cls_transforms.IMAGENET_STD)}


class MistakeWriter:
    """test.py's per-sample output: the misclassified images with their top-k predictions, gathered to rank 0."""

    def __init__(self, dataset, names, save_path, topk):
        self.dataset, self.names, self.save_path = dataset, names, save_path
        self.k, self.mistakes = max(1, min(topk, len(names))), []

    def __call__(self, index, probs, image):
        label = self.dataset.labels[index]
        top = probs.float().topk(self.k)
        if int(top.indices[0]) != label:
            self.mistakes.append({"path": self.dataset.paths[index], "true": self.names[label],
                                  "topk": [[self.names[i], round(float(p), 6)]
                                           for p, i in zip(top.values.tolist(), top.indices.tolist())]})

    def finish(self, metrics):
        """Gather every rank's mistakes (a collective call); rank 0 writes misclassified.csv."""
        shards = gather_objects(self.mistakes)
        if shards is None:
            return ""
        rows = sorted((m for shard in shards for m in shard), key=lambda m: m["path"])
        text = io.StringIO()
        out = csv.writer(text, lineterminator="\n")
        out.writerow(["path", "true", "predicted", "probability", "top_k"])
        for m in rows:
            out.writerow([m["path"], m["true"], m["topk"][0][0], f"{m['topk'][0][1]:.6f}",
                          " ".join(f"{name}:{p:.4f}" for name, p in m["topk"])])
        path = os.path.join(self.save_path, "misclassified.csv")
        write_atomic(path, text.getvalue())
        return f", {len(rows)} misclassified images to {path}"

