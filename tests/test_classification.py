"""Classification end to end with real processes: DDP training, bit-identical resume after SIGTERM, test.py metrics
that do not depend on the number of processes, infer.py's JSON and CSV, export, config files and bad input."""
import csv
import json
import os
import signal
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import ROOT, run, torchrun
from test_faults import assert_bit_identical, signal_at_step, start

CLASSES = ("circle", "cross", "square", "stripes")
# 9 images per class split 0.6/0.2/0.2: 5 train, 2 val, 2 test each (20/8/8): 8 is not a multiple of 3.
SPLIT = ["--split_ratio", "0.6", "0.2", "0.2"]
CLS_TINY = ["--task", "classification", "--image_size", "16", "--batchsize", "4", "--epochs", "1", "--workers", "0",
            "--log_interval", "1", "--lr", "0.01", *SPLIT]


def draw(kind, rng, size=20):
    """A 20 px picture of one of four shapes in random colours on a noisy background."""
    image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    colour = tuple(int(c) for c in rng.integers(120, 256, 3))
    c, r = size // 2 + int(rng.integers(-2, 3)), int(rng.integers(4, 8))
    if kind == "circle":
        cv2.circle(image, (c, c), r, colour, -1)
    elif kind == "cross":
        cv2.line(image, (c - r, c - r), (c + r, c + r), colour, 2)
        cv2.line(image, (c - r, c + r), (c + r, c - r), colour, 2)
    elif kind == "square":
        cv2.rectangle(image, (c - r, c - r), (c + r, c + r), colour, -1)
    else:
        image[::4] = colour
    return image


def make_tree(root, per_class=9, seed=0):
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        os.makedirs(os.path.join(root, kind), exist_ok=True)
        for i in range(per_class):
            cv2.imwrite(os.path.join(root, kind, f"{i:02d}.png"), draw(kind, rng))
    return str(root)


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("cls") / "shapes")


@pytest.fixture(scope="module")
def cls_trained(tmp_path_factory, cls_data):
    logdir = tmp_path_factory.mktemp("clsrun") / "run"
    proc = run(["train.py", *CLS_TINY, "--epochs", "2", "--dataset_path", cls_data, "--logdir", str(logdir)])
    return str(logdir), proc


def test_two_process_training_records_every_metric(tmp_path, cls_data):
    logdir = tmp_path / "run"
    proc = torchrun(2, ["train.py", *CLS_TINY, "--dataset_path", cls_data, "--logdir", str(logdir)], tmp_path=tmp_path)
    assert "2 process(es)" in proc.stdout and "classification data" in proc.stdout
    assert "val top-1" in proc.stdout and "top-4" in proc.stdout  # --topk 5 capped at 4 classes
    ckpt = torch.load(logdir / "last.pth", weights_only=True)
    assert ckpt["args"]["task"] == "classification" and ckpt["class_names"] == list(CLASSES)
    assert ckpt["best_metric"] == "top1" and ckpt["val"]["top1"] == ckpt["best_score"]
    split = json.load(open(logdir / "split.json"))
    assert {k: len(v) for k, v in split["splits"].items()} == {"train": 20, "val": 8, "test": 8}
    with open(logdir / "summary.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["val_top1"]) == pytest.approx(ckpt["val"]["top1"], abs=1e-6)
    assert {"val_top4", "val_macro_f1", "val_weighted_precision", "val_f1_circle", "val_recall_stripes"} <= set(row)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(logdir / "tb"), size_guidance={"images": 0}).Reload()
    assert {"val/top1", "val/top4", "val/precision/square"} <= set(events.Tags()["scalars"])
    assert "val/predictions" in events.Tags()["images"]


def test_sigterm_then_resume_with_mixing_is_bit_identical(tmp_path, cls_data):
    flags = [*CLS_TINY, "--epochs", "2", "--deterministic", "--mixup_prob", "0.4", "--cutmix_prob", "0.4",
             "--dataset_path", cls_data]  # 5 steps per epoch
    reference = tmp_path / "a"
    run(["train.py", *flags, "--logdir", str(reference)], tmp_path)
    interrupted = tmp_path / "b"
    cmd = [sys.executable, "train.py", *flags, "--logdir", str(interrupted), "--resume", "auto"]
    code, out = signal_at_step(start(cmd, tmp_path), interrupted, 7, signal.SIGTERM)  # mid-epoch 2
    assert code == 143, out
    proc = run(cmd[1:], tmp_path)
    assert "resumed from" in proc.stdout and "epoch 2, batch" in proc.stdout
    assert_bit_identical(reference / "last.pth", interrupted / "last.pth")


def test_test_py_is_the_same_for_one_two_and_three_processes(tmp_path, cls_trained):
    logdir, _ = cls_trained
    results = []
    for n in (1, 2, 3):
        out = tmp_path / f"n{n}"
        args = ["test.py", "--checkpoint", os.path.join(logdir, "last.pth"), "--split", "test", "--workers", "0",
                "--save_path", str(out)]
        proc = run(args) if n == 1 else torchrun(n, [*args, "--distributed"])
        assert "top-1" in proc.stdout and "precision" in proc.stdout
        metrics = json.load(open(out / "metrics.json"))
        assert metrics["samples"] == 8 and metrics["processes"] == n and metrics["task"] == "classification"
        mistakes = open(out / "misclassified.csv").read()
        results.append(({k: metrics[k] for k in ("top1", "top4", "macro_f1", "precision", "recall", "confusion")},
                        mistakes))
        assert os.path.exists(out / "confusion.png")
    assert results[1] == results[0] and results[2] == results[0]
    metrics, mistakes = results[0]
    assert sum(map(sum, metrics["confusion"])) == 8
    wrong = 8 - sum(metrics["confusion"][i][i] for i in range(4))
    assert len(mistakes.strip().splitlines()) == 1 + wrong  # a header and one row per misclassified image


def test_infer_writes_topk_json_and_csv_and_skips_what_exists(tmp_path, cls_trained, cls_data):
    logdir, _ = cls_trained
    inputs = tmp_path / "in"
    os.makedirs(inputs)
    for name in ("a.png", "b.PNG"):
        cv2.imwrite(str(inputs / name), cv2.imread(os.path.join(cls_data, "circle", "00.png")))
    (inputs / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    args = ["infer.py", "--checkpoint", os.path.join(logdir, "best.pth"), "--input", str(inputs), "--output", str(out),
            "--workers", "0", "--save_csv", "--topk", "3"]
    proc = run(args, check=False)
    assert proc.returncode == 1 and "broken.png" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert [os.path.basename(r["path"]) for r in records] == ["a.png", "b.PNG"]
    for r in records:
        probs = [t["prob"] for t in r["topk"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
        assert r["class"] == r["topk"][0]["class"] in CLASSES
    assert records[0]["topk"] == records[1]["topk"]  # the same picture
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["topk1_class"] for r in rows] == [r["class"] for r in records]
    again = run(args, check=False)
    assert "2 skipped (outputs exist)" in again.stdout
    two = torchrun(2, [*args, "--distributed", "--overwrite", "--output", str(tmp_path / "two")], check=False)
    assert two.returncode == 1
    assert [json.loads(line) for line in open(tmp_path / "two" / "predictions.jsonl")] == records


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_round_trip(tmp_path, cls_trained, fmt):
    if fmt == "onnx":
        for package in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(package)
    logdir, _ = cls_trained
    path = tmp_path / f"model.{fmt}"
    proc = run(["infer.py", "--checkpoint", os.path.join(logdir, "best.pth"), "--export", fmt,
                "--export_path", str(path)])
    assert "max abs difference from PyTorch" in proc.stdout
    sys.path.insert(0, ROOT)
    import tasks
    from evaluation import export
    _, model, _, _ = tasks.load_from_checkpoint(os.path.join(logdir, "best.pth"))
    x = torch.randn(3, 3, 16, 16)  # a batch of another size than the example's: the batch is dynamic
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.allclose(export.load_exported(fmt, str(path))(x), expected, atol=1e-4)


def test_classification_metrics_match_scikit_learn():
    from sklearn import metrics as sk
    sys.path.insert(0, ROOT)
    from evaluation.metrics import ClassificationMetrics
    rng = np.random.default_rng(0)
    probs = torch.from_numpy(rng.dirichlet(np.ones(6), 200)).float()
    target = torch.from_numpy(rng.integers(0, 5, 200))  # class 5 never occurs: precision 0 where predicted
    metric = ClassificationMetrics(6, "cpu", topk=3)
    for chunk in range(0, 200, 64):
        metric.add(probs[chunk:chunk + 64], target[chunk:chunk + 64])
    got = metric.reduce().compute()
    pred = probs.argmax(1).numpy()
    present = list(range(5))
    assert got["top1"] == pytest.approx(sk.accuracy_score(target, pred))
    assert got["top3"] == pytest.approx(sk.top_k_accuracy_score(target, probs.numpy(), k=3, labels=range(6)))
    for average in ("macro", "weighted"):
        p, r, f, _ = sk.precision_recall_fscore_support(target, pred, labels=present, average=average,
                                                        zero_division=0)
        assert (got[f"{average}_precision"], got[f"{average}_recall"], got[f"{average}_f1"]) == \
            pytest.approx((p, r, f))
    assert got["recall"][5] is None and got["support"][5] == 0


def test_mixing_keeps_the_label_shares():
    sys.path.insert(0, ROOT)
    from data.mixing import MixCollate, MixedCriterion
    batch = [(torch.full((3, 8, 8), float(i)), i) for i in range(4)]
    np.random.seed(3)
    images, target = MixCollate(0.0, 1.0, 0.2, 1.0)(batch)  # always CutMix
    lam = float(target["lam"])
    own = (images[0] == 0).float().mean().item()  # sample 0 keeps its pixels outside the pasted box
    assert own == pytest.approx(lam) and 0 < lam < 1
    assert target["mixed"].tolist() == [3, 2, 1, 0]
    images, target = MixCollate(1.0, 0.0, 0.2, 1.0)(batch)  # always Mixup
    lam = float(target["lam"])
    assert images[0, 0, 0, 0].item() == pytest.approx(3 * (1 - lam), abs=1e-5)

    def base(logits, labels):
        value = torch.nn.functional.cross_entropy(logits, labels)
        return value, {"ce": value}

    logits = torch.randn(4, 4)
    total, terms = MixedCriterion(base)(logits, target)
    expected = lam * base(logits, target["label"])[0] + (1 - lam) * base(logits, target["mixed"])[0]
    assert total.item() == pytest.approx(expected.item()) and terms["ce"].item() == pytest.approx(expected.item())


def test_presplit_folders_and_list_files(tmp_path, cls_data):
    presplit = tmp_path / "presplit"
    make_tree(presplit / "train", per_class=4, seed=1)
    make_tree(presplit / "val", per_class=2, seed=2)
    proc = run(["train.py", *CLS_TINY, "--dataset_path", str(presplit), "--logdir", str(tmp_path / "a")], tmp_path)
    assert "16 train / 8 val images" in proc.stdout
    assert not os.path.exists(tmp_path / "a" / "split.json")  # nothing to remember: the folders are the split
    lists = tmp_path / "lists"
    make_tree(lists / "images", per_class=4, seed=3)
    for split, picks in (("train", range(3)), ("val", range(3, 4))):
        with open(lists / f"{split}.txt", "w") as f:
            for label, kind in enumerate(CLASSES):
                for i in picks:  # labels by index in train, by name in val
                    f.write(f"images/{kind}/{i:02d}.png {label if split == 'train' else kind}\n")
    (lists / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    proc = run(["train.py", *CLS_TINY, "--dataset_path", str(lists), "--logdir", str(tmp_path / "b")], tmp_path)
    assert "12 train / 4 val images" in proc.stdout


def bad_tree(tmp_path, kind):
    root = make_tree(tmp_path / "data", per_class=6)
    if kind == "empty class":
        os.makedirs(os.path.join(root, "empty"))
        return root, "empty"
    if kind == "corrupt image":  # all of a class, so that the train and val splits have some
        for i in range(6):
            with open(os.path.join(root, "square", f"{i:02d}.png"), "wb") as f:
                f.write(b"\x89PNG garbage")
        return root, os.path.join("square", "0")
    if kind == "no images":
        for kind_ in CLASSES:
            for name in os.listdir(os.path.join(root, kind_)):
                os.remove(os.path.join(root, kind_, name))
        return root, "no image"
    if kind == "label out of range":
        with open(os.path.join(root, "train.txt"), "w") as f:
            f.write("circle/00.png 0\ncross/00.png 7\n")
        with open(os.path.join(root, "val.txt"), "w") as f:
            f.write("circle/01.png 0\n")
        (tmp_path / "data" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
        return root, "7"
    if kind == "listed val class not in train":
        for split, lines in (("train", "circle/00.png circle\ncross/00.png cross\n"), ("val", "square/00.png square\n")):
            with open(os.path.join(root, f"{split}.txt"), "w") as f:
                f.write(lines)
        (tmp_path / "data" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
        return root, "'square'"
    if kind == "val class not in train":
        os.makedirs(os.path.join(root, "train"))
        os.makedirs(os.path.join(root, "val"))
        make_tree(os.path.join(root, "train"), per_class=2)
        make_tree(os.path.join(root, "val"), per_class=1)
        os.makedirs(os.path.join(root, "val", "zebra"))
        cv2.imwrite(os.path.join(root, "val", "zebra", "z.png"), np.zeros((8, 8, 3), np.uint8))
        return root, "zebra"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["empty class", "corrupt image", "no images", "label out of range",
                                  "val class not in train", "listed val class not in train"])
def test_bad_data_is_one_line_and_exit_2(tmp_path, kind):
    root, name = bad_tree(tmp_path, kind)
    proc = run(["train.py", *CLS_TINY, "--dataset_path", root, "--logdir", str(tmp_path / "run")], tmp_path,
               check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], \
        proc.stderr
    assert not os.path.exists(tmp_path / "run" / "last.pth")


def test_config_file_sets_the_task_and_flags_still_win(tmp_path):
    proc = run(["train.py", "--config", "configs/ddp_quick_test.toml", "--print_config"], tmp_path)
    assert 'task = "classification"' in proc.stdout and 'model_type = "resnet18"' in proc.stdout
    proc = run(["train.py", "--config", "configs/ddp_quick_test.toml", "--task", "segmentation", "--print_config"],
               tmp_path)
    assert 'task = "segmentation"' in proc.stdout
    proc = run(["train.py", "--config", "configs/ddp_example.toml", "--print_config"], tmp_path)
    assert 'task = "classification"' in proc.stdout and "image_size = 224" in proc.stdout


def test_pretrained_torchvision_weights_load_except_the_classifier(tmp_path, cls_data):
    import torchvision
    source = torchvision.models.resnet18(num_classes=1000)
    weights = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), weights)
    logdir = tmp_path / "run"
    proc = run(["train.py", *CLS_TINY, "--stem", "imagenet", "--pretrained", str(weights), "--lr", "0",
                "--warmup_epochs", "0", "--dataset_path", cls_data, "--logdir", str(logdir)], tmp_path)
    assert "fc.weight" in proc.stdout
    trained = torch.load(logdir / "last.pth", weights_only=True)["model"]
    assert torch.equal(trained["layer1.0.conv1.weight"], source.state_dict()["layer1.0.conv1.weight"])
    assert trained["fc.weight"].shape == (4, 512)


def test_task_defaults_stay_with_their_task():
    """A classification default (label smoothing 0.1) must not change segmentation's loss, and back."""
    sys.path.insert(0, ROOT)
    import tasks
    import train
    from core import config
    from models.losses import build_criterion, cross_entropy

    def parse(argv):
        return config.parse_args(train.get_args_parser(), argv, task_defaults=tasks.task_defaults)

    seg, cls = parse([]), parse(["--task", "classification"])
    assert seg.label_smoothing == 0.0 and seg.model_type == "deeplabv3p" and seg.hflip_prob == 0.5
    assert build_criterion(seg).terms[0][2] is cross_entropy  # plain cross-entropy, as before classification
    assert cls.label_smoothing == 0.1 and cls.model_type == "resnet" and cls.hflip_prob == 0.0
    assert parse(["--task", "classification", "--label_smoothing", "0", "--hflip_prob", "0.5"]).hflip_prob == 0.5


def test_plugin_classifier_best_metric_and_the_saved_split(tmp_path):
    data = make_tree(tmp_path / "data", per_class=9, seed=5)
    plugin = tmp_path / "my_classifier.py"
    plugin.write_text("import torch.nn as nn\nfrom tasks.classification import register_classifier\n\n\n"
                      "@register_classifier('tiny_cls')\ndef tiny(args):\n"
                      "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
                      "                         nn.Linear(8, args.numclasses))\n")
    logdir = tmp_path / "run"
    flags = [*CLS_TINY, "--dataset_path", data, "--plugin", str(plugin), "--model_type", "tiny_cls"]
    proc = run(["train.py", *flags, "--best_metric", "top_one", "--logdir", str(logdir)], tmp_path, check=False)
    assert proc.returncode == 2 and "--best_metric 'top_one' is not a classification metric" in proc.stderr
    run(["train.py", *flags, "--best_metric", "macro_f1", "--logdir", str(logdir)], tmp_path)
    ckpt = torch.load(logdir / "best.pth", weights_only=True)
    assert ckpt["best_metric"] == "macro_f1" and ckpt["best_score"] == ckpt["val"]["macro_f1"]
    # New images after training do not change the split that test.py evaluates: it reads the run's split.json.
    for kind in CLASSES:
        cv2.imwrite(os.path.join(data, kind, "99.png"), draw(kind, np.random.default_rng(9)))
    out = tmp_path / "test"
    run(["test.py", "--checkpoint", str(logdir / "best.pth"), "--split", "val", "--workers", "0",
         "--save_path", str(out)], tmp_path)
    assert json.load(open(out / "metrics.json"))["samples"] == 8


@pytest.mark.parametrize("name, nproc", [("ddp_example.toml", 1), ("ddp_quick_test.toml", 2)])
def test_shipped_classification_configs_run(tmp_path, cls_data, name, nproc):
    """Each shipped classification config, on the tiny shapes and for two steps (ResNet-18 at 32 px for the
    ImageNet template, so that it fits a CPU test; every other setting is the file's)."""
    args = ["train.py", "--config", os.path.join("configs", name), "--dataset_path", cls_data, *SPLIT,
            "--epochs", "1", "--limit_batches", "2", "--workers", "0", "--batchsize", "4", "--logdir", str(tmp_path / "run")]
    if name == "ddp_example.toml":
        args += ["--model_type", "resnet18", "--image_size", "32", "--val_resize", "36"]
    proc = run(args, tmp_path) if nproc == 1 else torchrun(nproc, args, tmp_path=tmp_path)
    assert f"{nproc} process(es)" in proc.stdout and "val top-1" in proc.stdout
    ckpt = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert ckpt["args"]["task"] == "classification"
