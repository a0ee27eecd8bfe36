"""--image_check: the up-front check reads only files that changed since the last start (its record lives in the
data cache), `none` reads nothing, and an image that turns out unreadable while training or evaluating is skipped,
logged and counted instead of stopping the run. Everything runs in a few seconds on 2 CPU cores."""
import os
import time

import cv2
import numpy as np
import pytest
import torch

from conftest import run, torchrun
from data import check_cache
from data.folder import ClassificationDataset, check_images, scan_image_folder
from data.loaders import build_eval_loader
from data.unreadable import SkipUnreadable, Unreadable
from evaluation.evaluate import evaluate
from evaluation.metrics import ClassificationMetrics
from test_classification import CLS_TINY, make_tree
from utils import UserError


def small_tree(root, n=6):
    os.makedirs(root / "cat", exist_ok=True)
    for i in range(n):
        assert cv2.imwrite(str(root / "cat" / f"{i}.png"), np.full((5, 6, 3), 10 * i, np.uint8))
    return scan_image_folder(str(root))[1]


def replace_file(path, image):
    """Write `image` to a new name and rename it over `path`, as most tools that update a file do: the folder's
    mtime changes. The pause keeps that mtime from falling in the same clock tick as the last check's."""
    time.sleep(0.05)
    assert cv2.imwrite(str(path) + ".new.png", image)
    os.replace(str(path) + ".new.png", path)


def test_second_check_reads_only_changed_files(tmp_path):
    samples = small_tree(tmp_path / "data")
    root, record = str(tmp_path / "data"), str(tmp_path / "cache" / "record.txt")
    cat = tmp_path / "data" / "cat"
    assert check_images(root, samples, level="header", cache=record) == 6
    assert check_images(root, samples, level="header", cache=record) == 0
    # a file replaced (its folder changes): the folder's files are stat'ed and only that one is read again
    replace_file(cat / "4.png", np.zeros((9, 9, 3), np.uint8))
    assert check_images(root, samples, level="header", cache=record) == 1
    assert check_images(root, samples, level="header", cache=record) == 0
    # a new mtime on a file of a changed folder is a change
    st = os.stat(cat / "2.png")
    os.utime(cat / "2.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    replace_file(cat / "5.png", np.full((5, 6, 3), 50, np.uint8))
    assert check_images(root, samples, level="header", cache=record) == 2
    # a new file: only it is read
    time.sleep(0.05)
    assert cv2.imwrite(str(cat / "6.png"), np.zeros((4, 4, 3), np.uint8))
    assert check_images(root, samples + [("cat/6.png", 0)], level="header", cache=record) == 1
    # a file rewritten in place leaves its folder's mtime alone: not re-read at the start (training skips it
    # if it has become unreadable: test_training_skips_an_image_corrupted_after_the_check)
    os.utime(cat / "3.png", ns=(st.st_atime_ns, st.st_mtime_ns + 5000))
    assert check_images(root, samples, level="header", cache=record) == 0
    # a header read does not vouch for a decode; a decode vouches for a header
    assert check_images(root, samples, level="full", cache=record) == 6
    assert check_images(root, samples, level="header", cache=record) == 0
    assert check_images(root, samples, level="full", cache=record) == 0


def test_a_file_corrupted_after_its_check_is_found_again_when_its_folder_changed(tmp_path):
    samples = small_tree(tmp_path / "data")
    root, record = str(tmp_path / "data"), str(tmp_path / "record.txt")
    check_images(root, samples, level="full", cache=record)
    time.sleep(0.05)
    (tmp_path / "data" / "cat" / "3.tmp").write_bytes(b"not a png at all")
    os.replace(tmp_path / "data" / "cat" / "3.tmp", tmp_path / "data" / "cat" / "3.png")
    with pytest.raises(UserError, match="3.png"):
        check_images(root, samples, level="full", cache=record)


def test_none_reads_nothing_and_a_bad_record_only_costs_a_recheck(tmp_path):
    samples = small_tree(tmp_path / "data")
    root = str(tmp_path / "data")
    (tmp_path / "data" / "cat" / "3.png").write_bytes(b"not a png at all")
    assert check_images(root, samples, level="none") == 0
    os.remove(tmp_path / "data" / "cat" / "3.png")
    samples = [s for s in samples if s[0] != "cat/3.png"]
    for garbage in (b"", b"\xff\xfe\x00 not text", check_cache.HEADER.encode() + b"\nfolders 1\nh\tx\tcat\n",
                    check_cache.HEADER.encode() + b"\nfolders 0\nnames h 3\ncat/0.png\n"):
        record = tmp_path / "bad.txt"
        record.write_bytes(garbage)
        assert check_images(root, samples, level="header", cache=str(record), write_cache=False) == 5
    # a record that cannot be written (its folder is a file) is not an error
    assert check_images(root, samples, level="header", cache=str(tmp_path / "bad.txt" / "record.txt")) == 5
    # only the process that writes the record saves anyone work
    record = str(tmp_path / "record.txt")
    assert check_images(root, samples, level="header", cache=record, write_cache=False) == 5
    assert not os.path.exists(record)


def test_collate_drops_unreadable_samples_and_reports_them():
    good = (torch.ones(3, 2, 2), 1)
    bad = Unreadable(4, "a/b.png", "cannot be decoded")
    images, labels, skipped = SkipUnreadable(empty_shape=(3, 2, 2))([good, bad, good])
    assert images.shape == (2, 3, 2, 2) and labels.tolist() == [1, 1] and skipped == [bad]
    images, labels, skipped = SkipUnreadable(empty_shape=(3, 2, 2))([bad])
    assert images.shape == (0, 3, 2, 2) and labels.shape == (0,) and skipped == [bad]
    assert len(SkipUnreadable()([good, good])) == 2  # nothing dropped: the usual (images, labels)


def test_evaluation_leaves_unreadable_images_out_and_keeps_indices(tmp_path):
    samples = small_tree(tmp_path / "data", n=7)
    for i in (1, 2, 3):  # 2 and 3 end a batch of 4 together with 1: the next batch's indices must still match
        (tmp_path / "data" / "cat" / f"{i}.png").write_bytes(b"broken")
    dataset = ClassificationDataset(str(tmp_path / "data"), samples, ["cat", "dog"], skip_unreadable=True)
    loader = build_eval_loader(dataset, 4, 0, 0, 1, collate_fn=SkipUnreadable())
    seen = []
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))
    metrics = evaluate(model, loader,
                       ClassificationMetrics(2, "cpu", 1), lambda model, image: model(image).softmax(1),
                       on_prediction=lambda index, probs, image: seen.append((index, float(image.mean()))))
    assert [index for index, _ in seen] == [0, 4, 5, 6]
    assert [mean for _, mean in seen] == [pytest.approx(float(dataset[i][0].mean())) for i in (0, 4, 5, 6)]
    assert metrics["support"] == [4, 0]


def test_training_skips_an_image_corrupted_after_the_check(tmp_path):
    root = tmp_path / "data"
    make_tree(root / "train")
    make_tree(root / "val", per_class=2)
    broken = os.path.join(str(root), "train", "cross", "03.png")
    with open(broken, "wb") as f:
        f.write(b"\x89PNG garbage")
    proc = run(["train.py", *CLS_TINY, "--image_check", "none", "--dataset_path", str(root),
                "--logdir", str(tmp_path / "run")], tmp_path)
    assert f"skipped image '{broken}' (cannot be decoded) on rank 0" in proc.stdout
    assert "skipped 1 unreadable images" in proc.stdout
    assert os.path.isfile(tmp_path / "run" / "last.pth")


def test_two_processes_log_their_own_skips_and_count_them_together(tmp_path):
    root = tmp_path / "data"
    make_tree(root / "train")
    make_tree(root / "val", per_class=2)
    broken = [os.path.join(str(root), "train", kind, "04.png") for kind in ("circle", "stripes", "square")]
    for path in broken:
        with open(path, "wb") as f:
            f.write(b"")
    proc = torchrun(2, ["train.py", *CLS_TINY, "--image_check", "none", "--dataset_path", str(root),
                        "--logdir", str(tmp_path / "run")], tmp_path=tmp_path)
    assert "skipped 3 unreadable images" in proc.stdout
    for path in broken:  # rank 0 logs to stdout, rank 1 its warnings to stderr
        assert f"skipped image '{path}' (cannot be decoded)" in proc.stdout + proc.stderr


def test_one_process_per_machine_reads_the_images_and_a_restart_reads_none(tmp_path):
    """Three processes, an empty record: local rank 0 reads every header while the others wait, then they check
    against its record; the same command again reads nothing."""
    root = tmp_path / "data"
    make_tree(root / "train")
    make_tree(root / "val", per_class=2)
    reads = tmp_path / "reads.txt"
    env = {"AILAB_CHECK_LOG": str(reads)}
    command = ["train.py", *CLS_TINY, "--plugin", os.path.join("tests", "count_checks_plugin.py"),
               "--dataset_path", str(root), "--limit_batches", "1"]
    proc = torchrun(3, [*command, "--logdir", str(tmp_path / "run1")], tmp_path=tmp_path, env=env)
    lines = reads.read_text().splitlines()
    total = len(os.listdir(root / "train" / "circle")) * 4 + len(os.listdir(root / "val" / "circle")) * 4
    assert len(lines) == total and {line.split()[0] for line in lines} == {"0"}, lines
    assert f"image check (header) of {total - 8} images under {root}: {total - 8} read, 0 unchanged" in proc.stdout
    proc = torchrun(3, [*command, "--logdir", str(tmp_path / "run2")], tmp_path=tmp_path, env=env)
    assert len(reads.read_text().splitlines()) == total
    assert f"image check (header) of {total - 8} images under {root}: 0 read, {total - 8} unchanged" in proc.stdout
