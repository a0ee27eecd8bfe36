"""Semantic segmentation: VOC-layout data or the built-in scenes, segmentation models, pixel losses (and the
scribble-supervised modes), confusion-matrix metrics, palette-PNG masks."""
import os

import cv2
import numpy as np
import torch

import models
from data import readers, synthetic, voc
from data.loaders import pad_collate
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_normalized_tensor
from evaluation import inference
from evaluation.metrics import ConfusionMatrix, class_map
from models import weights as model_weights
from models.backbone import RESNETS
from models.losses import build_criterion
from models.pretrained import load_pretrained
from models.registry import MODELS
from tasks import scribble
from tasks.base import log
from utils import replacing


class SegmentationTask:
    name = "segmentation"
    accuracy = "acc"  # what "accuracy" means in --metrics
    primary = "miou"
    labels = {"miou": "mIoU", "acc": "pixel acc", "mean_class_acc": "mean class acc", "fwiou": "fwIoU",
              "raw_miou": "raw weights mIoU"}
    defaults = {}  # the flags' own defaults are segmentation's
    datasets = voc.DATASETS
    outputs = "masks"  # what infer.py writes per image
    eval_collate = staticmethod(pad_collate)

    @staticmethod
    def train_collate(args):
        return None

    @staticmethod
    def metric_names(args):
        return ["miou", "acc", "mean_class_acc", "fwiou"]

    # -- flags ------------------------------------------------------------------------------------
    @staticmethod
    def add_train_args(parser):
        g = parser.add_argument_group("segmentation")
        g.add_argument("--crop_size", type=int, default=96, help="square training crop in pixels")
        g.add_argument("--scale_range", type=float, nargs=2, default=[0.75, 1.5], metavar=("MIN", "MAX"),
                       help="random rescale range for training images")
        return [g, scribble.add_scribble_args(parser)]

    # -- training ---------------------------------------------------------------------------------
    @staticmethod
    def prepare_data(args, ctx):
        """(root, class names); the built-in scenes are generated once per machine. Sets args.numclasses."""
        root = synthetic.resolve_root(args.dataset_path, args.data_cache, ctx)
        args.numclasses = args.numclasses or (21 if args.dataset_path else len(synthetic.SYNTHETIC_CLASSES))
        return root, readers.class_names(root, args.numclasses)

    @classmethod
    def build_datasets(cls, args, root):
        build = cls.datasets.get(args.dataset)
        return build(args, root, args.train_split, train=True), build(args, root, args.val_split, train=False)

    @staticmethod
    def build_model(args):
        return models.build_model(args)

    @staticmethod
    def describe_model(model, args):
        return models.describe_model(model, args)

    @staticmethod
    def weights_arch(args):
        """The torchvision architecture whose published weights --pretrained NAME loads: the ResNet backbone's."""
        if MODELS.takes_kwargs(args.model_type) or args.model_type in models.WITHOUT_RESNET:
            return None
        return RESNETS[args.layers]

    @staticmethod
    def resolve_normalisation(args, weights):
        """Segmentation normalises with ImageNet's values (no flags): say whether the weights were trained so."""
        return model_weights.imagenet_normalisation_note(weights)

    @staticmethod
    def load_pretrained(model, path, strict, state=None):
        return load_pretrained(model, path, strict, state)

    @staticmethod
    def build_criterion(args, model):
        if args.dataset in scribble.SCRIBBLE_MODES:
            criterion = scribble.build_scribble_criterion(args, args.dataset, hasattr(model, "lorm"))
        else:
            criterion = build_criterion(args)
        if hasattr(model, "lorm") and not getattr(criterion, "uses_lorm", False):
            model.lorm.requires_grad_(False)  # unused here: DDP must not wait for its gradients
            log.info("the model's LoRM is not trained in this run (it needs --l_lorm > 0 and pseudo labels)")
        return criterion

    @staticmethod
    def new_metric(numclasses, device, args=None):
        return ConfusionMatrix(numclasses, device)

    @staticmethod
    def predict(model, image, options=None):
        """Class probabilities N x K x H x W at the input's size (scales, flips, windows from `options`)."""
        return inference.predict_probs(model, image, options)

    @staticmethod
    @torch.no_grad()
    def prediction_grid(model, dataset, count, device, class_names):
        """Rows of image | ground truth | prediction for the first `count` samples, as one uint8 HxWx3 picture."""
        model.eval()
        rows = []
        for index in range(min(count, len(dataset))):
            image, label = dataset[index]
            pred = class_map(model(image[None].to(device)))[0].cpu().numpy()
            rows.append(np.concatenate([denormalize(image), readers.VOC_PALETTE[label.numpy().astype(np.uint8)],
                                        readers.VOC_PALETTE[pred.astype(np.uint8)]], axis=1))
        width = max(r.shape[1] for r in rows)
        rows = [cv2.copyMakeBorder(r, 0, 2, 0, width - r.shape[1], cv2.BORDER_CONSTANT, value=(255, 255, 255))
                for r in rows]
        return np.concatenate(rows, axis=0)

    # -- test.py ----------------------------------------------------------------------------------
    @staticmethod
    def eval_dataset(trained, root, split, run_dir=None):
        return voc.DATASETS.get(getattr(trained, "dataset", "voc"))(trained, root, split, train=False)

    @staticmethod
    def resolve_eval_root(trained, args, ctx):
        return synthetic.resolve_root(args.dataset_path or trained.dataset_path, args.data_cache, ctx)

    @staticmethod
    def predict_options(args, trained, device):
        return inference.options_from_args(args, device, getattr(trained, "crop_size", None) or 512)

    @staticmethod
    def test_batchsize(trained):
        return 1  # images keep their own sizes

    @staticmethod
    def per_class_table(names, metrics):
        return [("IoU", metrics["iou"]), ("Dice", metrics["dice"]), ("acc", metrics["class_acc"])]

    @staticmethod
    def test_writer(args, dataset, names, save_path):
        return MaskWriter(args, dataset, save_path)

    # -- infer.py ---------------------------------------------------------------------------------
    @staticmethod
    def infer_transform(trained):
        return to_normalized_tensor

    @staticmethod
    def example_size(trained):
        return (getattr(trained, "crop_size", None) or 512,) * 2

    @staticmethod
    def output_files(stem, args):
        files = {"mask": stem + ".png"}
        if args.save_overlay:
            files["overlay"] = stem + "_overlay.jpg"
        if args.save_probs:
            files["probs"] = stem + "_probs.npy"
        return files

    @staticmethod
    def infer_record(probs, item, job, names, args):
        """Write the image's files; return its predictions.jsonl record."""
        mask = class_map(probs, 0).to(torch.uint8).cpu().numpy()
        write_outputs(job["files"], mask, probs, item["rgb"])
        height, width = mask.shape
        return {"path": job["path"], "mask": os.path.relpath(job["files"]["mask"], args.output),
                "height": height, "width": width,
                "fractions": dict(zip(names, inference.class_fractions(mask, len(names))))}


def denormalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Normalised 3xHxW tensor -> RGB uint8 HxWx3, for overlays and grids."""
    rgb = image.cpu().numpy().transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)


class MaskWriter:
    """test.py's per-image output: a palette PNG per image (and an overlay with --save_overlay), written by the rank
    that predicted it."""

    def __init__(self, args, dataset, save_path):
        self.args, self.dataset = args, dataset
        self.pred_dir, self.overlay_dir = os.path.join(save_path, "pred"), os.path.join(save_path, "overlay")

    def __call__(self, index, probs, image):
        if self.args.no_save_pred:
            return
        name = str(self.dataset.ids[index]) if hasattr(self.dataset, "ids") else f"{index:06d}"
        mask = class_map(probs, 0).to(torch.uint8).cpu().numpy()
        os.makedirs(os.path.dirname(os.path.join(self.pred_dir, name)), exist_ok=True)
        readers.save_palette_png(os.path.join(self.pred_dir, name + ".png"), mask)
        if self.args.save_overlay:
            os.makedirs(os.path.dirname(os.path.join(self.overlay_dir, name)), exist_ok=True)
            blend = inference.overlay(denormalize(image), mask, readers.VOC_PALETTE)
            cv2.imwrite(os.path.join(self.overlay_dir, name + ".jpg"), cv2.cvtColor(blend, cv2.COLOR_RGB2BGR))

    def finish(self, metrics):
        """What the log says was written, besides metrics.json and confusion.png (a collective call: none here)."""
        if self.args.no_save_pred:
            return ""
        return f", {len(self.dataset)} masks to {self.pred_dir}" + (
            f", overlays to {self.overlay_dir}" if self.args.save_overlay else "")


def write_outputs(files, mask, probs, rgb):
    """Write each output through a temporary name, so an interrupted run never leaves a half-written file."""
    os.makedirs(os.path.dirname(files["mask"]) or ".", exist_ok=True)
    writers = {"mask": lambda tmp: readers.save_palette_png(tmp, mask),
               "overlay": lambda tmp: cv2.imwrite(tmp, cv2.cvtColor(
                   inference.overlay(np.asarray(rgb), mask, readers.VOC_PALETTE), cv2.COLOR_RGB2BGR)),
               "probs": lambda tmp: np.save(tmp, probs.float().cpu().numpy())}
    for kind, path in files.items():
        with replacing(path) as tmp:
            writers[kind](tmp)
