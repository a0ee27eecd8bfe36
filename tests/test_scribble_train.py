"""Scribble supervision end to end: every --dataset mode trains, DDP with LoRM, joint transforms of the maps,
missing maps, and the flag aliases."""
import csv
import os
import shutil

import numpy as np
import pytest
import torch

from data.transforms import TrainTransform
from conftest import TINY, run, torchrun
from tasks.scribble import SCRIBBLE_MODES

# The loss terms each mode trains with a LoRM model (--l_lorm needs pseudo labels).
TERMS = {"ScribbleOnly": ["segs"], "PseudoOnly": ["pesudo", "lorm"], "ScribblePseudo": ["segs", "pesudo", "lorm"],
         "ScribblePseudoDs": ["segs", "pesudo", "lorm", "ds"], "ScribblePseudoDc": ["segs", "pesudo", "lorm", "dc"],
         "ScribblePseudoDsDc": ["segs", "pesudo", "lorm", "ds", "dc"], "Full": ["segs"]}


def loss_columns(logdir):
    with open(os.path.join(logdir, "summary.csv")) as f:
        header = next(csv.reader(f))
    return sorted(c[len("train_loss_"):] for c in header if c.startswith("train_loss_"))


def test_every_mode_is_covered():
    assert set(TERMS) == set(SCRIBBLE_MODES)


@pytest.mark.parametrize("mode", list(TERMS))
def test_every_mode_trains_one_step(tmp_path, tiny_data, mode):
    out = tmp_path / "run"
    proc = run(["train.py", *TINY, "--dataset_path", tiny_data, "--numclasses", "5", "--dataset", mode,
                "--model_type", "deeplabv3p_lorm", "--limit_batches", "1", "--logdir", str(out)], tmp_path)
    assert loss_columns(out) == sorted(TERMS[mode])
    assert "val mIoU" in proc.stdout + proc.stderr
    if "lorm" not in TERMS[mode]:
        assert "LoRM is not trained in this run" in proc.stdout + proc.stderr


def test_lorm_model_under_two_processes(tmp_path, tiny_data):
    out = tmp_path / "ddp"
    proc = torchrun(2, ["train.py", *TINY, "--dataset_path", tiny_data, "--numclasses", "5",
                        "--dataset", "ScribblePseudoDsDc", "--model_type", "res50_ASPP_lorm", "--limit_batches", "2",
                        "--logdir", str(out)], tmp_path=tmp_path)
    assert "2 process(es)" in proc.stdout + proc.stderr
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert any(k.startswith("lorm.") for k in ckpt["model"]) and ckpt["world_size"] == 2
    assert loss_columns(out) == sorted(TERMS["ScribblePseudoDsDc"])


def test_a_plain_model_drops_the_lorm_term_with_a_note(tmp_path, tiny_data):
    out = tmp_path / "plain"
    proc = run(["train.py", *TINY, "--dataset_path", tiny_data, "--numclasses", "5", "--dataset", "ScribblePseudo",
                "--limit_batches", "1", "--logdir", str(out)], tmp_path)
    assert "--l_lorm ignored: model deeplabv3p has no LoRM" in proc.stdout + proc.stderr
    assert loss_columns(out) == ["pesudo", "segs"]


def test_maps_share_the_geometry_and_pad_by_kind():
    np.random.seed(0)
    image = np.random.randint(0, 255, (10, 12, 3), np.uint8)
    pattern = (np.arange(120).reshape(10, 12) % 200 + 1).astype(np.uint8)  # no 0 and no 255 inside the image
    transform = TrainTransform(16, scale_range=(1.0, 1.0), hflip_prob=0.5, weight_maps=("dist_s",))
    for _ in range(6):  # random crop offsets and flips
        _, maps = transform(image, {"scribble": pattern, "dist_s": pattern})
        scribble, dist = maps["scribble"], maps["dist_s"]
        assert scribble.dtype == torch.int64 and dist.dtype == torch.uint8
        inside = scribble != 255
        assert inside.sum() == 120  # the whole 10x12 image lies inside the 16x16 crop
        assert torch.equal(scribble[inside], dist[inside].long())  # the same pixels in the same places
        assert (dist[~inside] == 0).all()  # padding: weight 0 for distance maps, 255 (ignore) for labels


def test_missing_map_is_one_clear_line(tmp_path, tiny_data):
    root = tmp_path / "voc"
    shutil.copytree(tiny_data, root)
    first = sorted(os.listdir(root / "distancemap_c"))[0]
    os.remove(root / "distancemap_c" / first)
    proc = run(["train.py", *TINY, "--dataset_path", str(root), "--numclasses", "5", "--dataset",
                "ScribblePseudoDsDc", "--logdir", str(tmp_path / "x")], tmp_path, check=False)
    assert proc.returncode == 2
    assert f"has no file '{root / 'distancemap_c' / first}'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_pseudo_spellings_are_aliases(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('dataset = "ScribblePseudo"\npseudo_path = "cams"\nl_pseudo = 0.25\n')
    proc = run(["train.py", "--config", str(config), "--print_config"])
    assert 'pesudo_path = "cams"' in proc.stdout and "l_pesudo = 0.25" in proc.stdout
    proc = run(["train.py", "--pseudo_path", "x", "--l_pesudo", "2", "--print_config"])
    assert 'pesudo_path = "x"' in proc.stdout and "l_pesudo = 2.0" in proc.stdout
