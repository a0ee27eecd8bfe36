"""Scribble supervision: the losses against hand-computed values, the criterion, the distance maps, the flags, and the
scribble maps of the built-in data."""
import argparse
import hashlib
import math
import os

import cv2
import numpy as np
import pytest
import torch

from data.distance_maps import DEFAULT_LAMBDA_C, DEFAULT_LAMBDA_S, distance_maps
from data.readers import read_label
from data.synthetic import ensure_builtin_dataset, make_synthetic_voc
from tasks.scribble import (SCRIBBLE_MODES, ScribbleCriterion, add_scribble_args, mode_folders, mode_weights, partial_ce,
                            pseudo_ce, weighted_entropy)
from utils import UserError


def logits_of(*pixels):
    """(1, C, 1, P) logits, one row of P pixels, requiring grad."""
    return torch.tensor(pixels, dtype=torch.float32).t()[None, :, None, :].clone().requires_grad_()


def labels_of(*values):
    return torch.tensor(values, dtype=torch.int64)[None, None, :]


def grad_of(loss, logits):
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    return logits.grad[0, :, 0, :].t()  # (P, C)


# --- losses ------------------------------------------------------------------------------------

def test_partial_ce_averages_over_scribble_pixels_only():
    logits = logits_of((2.0, 0.0), (0.0, 1.0), (50.0, -50.0))
    loss = partial_ce(logits, labels_of(0, 1, 255))
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert loss.dim() == 0 and loss.item() == pytest.approx(expected, rel=1e-6)
    assert (grad_of(loss, logits)[2] == 0).all()  # the unlabelled pixel gets no gradient


def test_pseudo_ce_smooths_the_target():
    logits = logits_of((1.0, 0.0), (0.0, 0.0), (3.0, 1.0))
    loss = pseudo_ce(logits, labels_of(0, 255, 1), label_smooth=0.1)
    nll0, nll1 = math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))       # pixel 1: -log p0, -log p1
    mll0, mll1 = math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))       # pixel 3
    first = 0.9 * nll0 + 0.1 * (nll0 + nll1) / 2
    third = 0.9 * mll1 + 0.1 * (mll0 + mll1) / 2
    assert loss.item() == pytest.approx((first + third) / 2, rel=1e-6)
    assert pseudo_ce(logits, labels_of(0, 255, 1), 0.0).item() == pytest.approx((nll0 + mll1) / 2, rel=1e-6)
    assert (grad_of(loss, logits)[1] == 0).all()


def test_weighted_entropy_weighs_by_the_map():
    third = math.log(3.0)
    logits = logits_of((0.0, 0.0), (third, 0.0), (1e4, -1e4))
    h_uniform, h_quarter = math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    loss = weighted_entropy(logits, torch.tensor([[[255, 51, 0]]], dtype=torch.uint8))
    assert loss.item() == pytest.approx((1.0 * h_uniform + 0.2 * h_quarter) / 1.2, rel=1e-6)
    assert (grad_of(loss, logits)[2] == 0).all()  # zero weight: no gradient even at extreme scores
    as_float = weighted_entropy(logits.detach(), torch.tensor([[[127.5, 0.0, 0.0]]]))
    assert as_float.item() == pytest.approx(h_uniform, rel=1e-6)


@pytest.mark.parametrize("loss_of", [
    lambda x, n: partial_ce(x, torch.full(n, 255)),
    lambda x, n: pseudo_ce(x, torch.full(n, 255), 0.1),
    lambda x, n: weighted_entropy(x, torch.zeros(n, dtype=torch.uint8)),
], ids=["partial_ce", "pseudo_ce", "weighted_entropy"])
@pytest.mark.parametrize("n", [1, 0], ids=["nothing_to_learn", "empty_batch"])
def test_nothing_to_learn_gives_exactly_zero_and_a_zero_gradient(loss_of, n):
    logits = (torch.randn(n, 3, 4, 5) * 100).requires_grad_()
    loss = loss_of(logits, (n, 4, 5))
    assert loss.dim() == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


def test_losses_reject_a_target_of_another_size():
    with pytest.raises(UserError, match="distance map of shape"):
        weighted_entropy(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5))


# --- criterion ---------------------------------------------------------------------------------

def batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = {"scribble": torch.randint(0, 3, (2, 4, 4)), "pseudo": torch.randint(0, 3, (2, 4, 4)),
              "dist_s": torch.randint(0, 256, (2, 4, 4), dtype=torch.uint8),
              "dist_c": torch.randint(0, 256, (2, 4, 4), dtype=torch.uint8)}
    target["scribble"][0, :2] = 255
    return logits, target


def test_criterion_sums_the_weighted_terms_it_names():
    logits, target = batch()
    lorm = torch.tensor(0.7, requires_grad=True)
    criterion = ScribbleCriterion({"segs": 2.0, "pesudo": 0.0, "lorm": 3.0, "ds": 0.5, "dc": 0.25}, label_smooth=0.2)
    total, terms = criterion(logits, target, lorm_loss=lorm)
    assert list(terms) == ["segs", "lorm", "ds", "dc"]  # a zero weight is not computed
    expected = (2 * partial_ce(logits, target["scribble"]) + 3 * lorm + 0.5 * weighted_entropy(logits, target["dist_s"])
                + 0.25 * weighted_entropy(logits, target["dist_c"]))
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(not v.requires_grad and v.dtype == torch.float32 for v in terms.values())
    assert terms["lorm"].item() == pytest.approx(0.7)
    total.backward()
    assert lorm.grad.item() == pytest.approx(3.0) and torch.isfinite(logits.grad).all()
    _, terms = ScribbleCriterion({"pesudo": 1.0}, label_smooth=0.2)(logits, target)
    assert terms["pesudo"].item() == pytest.approx(pseudo_ce(logits, target["pseudo"], 0.2).item())


@pytest.mark.parametrize("weights, missing, message", [
    ({"dc": 1.0}, "dist_c", "--l_dc is 1 but the batch has no boundary distance maps .--distancemap_c."),
    ({"segs": 1.0, "pesudo": 0.5}, "pseudo", "--l_pesudo is 0.5 but the batch has no pseudo labels .--pesudo_path."),
    ({"lorm": 2.0}, None, "--l_lorm is 2 but the model returned no LoRM loss .a \\*_lorm --model_type"),
])
def test_criterion_names_the_flag_of_a_missing_target(weights, missing, message):
    logits, target = batch()
    target.pop(missing, None)
    with pytest.raises(UserError, match=message):
        ScribbleCriterion(weights)(logits, target)


@pytest.mark.parametrize("weights, label_smooth, message", [
    ({"segs": 1.0, "seg": 1.0}, 0.1, "unknown terms \\['seg'\\]"),
    ({"segs": 0.0}, 0.1, "every scribble loss weight is 0"),
    ({"ds": -1.0}, 0.1, "--l_ds -1.0 is not valid"),
    ({"ds": float("nan")}, 0.1, "--l_ds nan is not valid"),
    ({"segs": 1.0}, 1.0, "--label_smooth 1.0 is not valid"),
])
def test_criterion_rejects_bad_settings(weights, label_smooth, message):
    with pytest.raises(UserError, match=message):
        ScribbleCriterion(weights, label_smooth)


# --- distance maps -----------------------------------------------------------------------------

def one_scribble_pixel():
    scribble_label = np.full((5, 5), 255, np.uint8)
    scribble_label[2, 2] = 1
    return scribble_label


def test_dist_s_falls_off_with_the_distance_to_the_scribble():
    uniform = np.zeros((5, 5), np.uint8)
    dist_s, dist_c = distance_maps(one_scribble_pixel(), uniform, lambda_s=1, lambda_c=1)
    yy, xx = np.mgrid[0:5, 0:5]
    d = np.sqrt((yy - 2) ** 2 + (xx - 2) ** 2)
    assert dist_s.dtype == np.uint8 and (dist_s == 255 - np.rint(d)).all()
    assert dist_s[2, 2] == 255 and dist_s[0, 0] == 252 and dist_s[1, 2] == 254 and dist_s[1, 1] == 254
    assert (dist_c == 255).all()  # one pseudo label everywhere: no boundary, full weight

    dist_s, _ = distance_maps(one_scribble_pixel(), uniform, lambda_s=100 ** 2, lambda_c=1)
    assert dist_s[2, 2] == 255 and dist_s[1, 2] == 155 and dist_s[1, 1] == 114 and dist_s[0, 2] == 55
    assert dist_s[0, 1] == 31 and dist_s[0, 0] == 0  # 100 * sqrt(8) > 255 saturates
    dist_s, _ = distance_maps(one_scribble_pixel(), uniform, lambda_s=255 ** 2, lambda_c=1)
    assert dist_s.sum() == 255


def test_dist_c_grows_with_the_distance_to_a_pseudo_boundary():
    split = np.zeros((5, 5), np.uint8)
    split[:, 2:] = 1   # columns 1 and 2 have a neighbour of the other label
    _, dist_c = distance_maps(one_scribble_pixel(), split, lambda_s=1, lambda_c=1)
    assert (dist_c == [1, 0, 0, 1, 2]).all()
    _, dist_c = distance_maps(one_scribble_pixel(), split, lambda_s=1, lambda_c=200 ** 2)
    assert (dist_c == [200, 0, 0, 200, 255]).all()

    corner = np.ones((5, 5), np.uint8)
    corner[0, 0] = 255  # ignore counts as boundary, and so do its neighbours (another label)
    _, dist_c = distance_maps(one_scribble_pixel(), corner, lambda_s=1, lambda_c=1)
    assert dist_c[0, 0] == dist_c[0, 1] == dist_c[1, 0] == 0 and dist_c[1, 1] == 1 and dist_c[4, 4] == 5


def test_distance_maps_edge_cases():
    nothing = np.full((4, 6), 255, np.uint8)
    dist_s, dist_c = distance_maps(nothing, nothing, 64, 256)
    assert dist_s.shape == (4, 6) and (dist_s == 0).all() and (dist_c == 0).all()  # no scribble, all uncertain
    with pytest.raises(UserError, match="same size"):
        distance_maps(nothing, nothing.T, 64, 256)
    with pytest.raises(UserError, match="--lambda_c -1 is not valid"):
        distance_maps(nothing, nothing, 64, -1)


# --- flags and modes ---------------------------------------------------------------------------

def parse(*argv):
    parser = argparse.ArgumentParser()
    add_scribble_args(parser)
    return parser.parse_args(argv)


def test_flags_defaults_and_aliases():
    args = parse()
    assert (args.train_path, args.pesudo_path, args.distancemap_s, args.distancemap_c) == (
        "scribble", "pseudo", "distancemap_s", "distancemap_c")
    assert [args.l_segs, args.l_pesudo, args.l_lorm, args.l_ds, args.l_dc] == [1.0] * 5
    assert (args.label_smooth, args.lambda_s, args.lambda_c) == (0.1, 64.0, 256.0)
    args = parse("--pseudo_path", "cams", "--l_pseudo", "0.5")
    assert args.pesudo_path == "cams" and args.l_pesudo == 0.5
    assert parse("--pesudo_path", "x", "--l_pesudo", "2").l_pesudo == 2.0


def test_modes_pick_the_maps_and_the_weights():
    assert list(SCRIBBLE_MODES) == ["ScribbleOnly", "PseudoOnly", "ScribblePseudo", "ScribblePseudoDs",
                                    "ScribblePseudoDc", "ScribblePseudoDsDc", "Full"]
    args = parse("--l_ds", "0.3", "--distancemap_s", "ds")
    assert mode_folders(args, "ScribblePseudoDs") == {"scribble": "scribble", "pseudo": "pseudo", "dist_s": "ds"}
    assert mode_folders(args, "Full") == {"scribble": "SegmentationClass"}
    assert mode_weights(args, "ScribbleOnly") == {"segs": 1.0, "pesudo": 0.0, "lorm": 1.0, "ds": 0.0, "dc": 0.0}
    assert mode_weights(args, "ScribblePseudoDsDc") == {"segs": 1.0, "pesudo": 1.0, "lorm": 1.0, "ds": 0.3, "dc": 1.0}
    with pytest.raises(UserError, match="scribble mode 'Scribble' is unknown"):
        mode_weights(args, "Scribble")


# --- the built-in data's scribble maps ---------------------------------------------------------

def read_all(root, folder):
    names = sorted(os.listdir(os.path.join(root, folder)))
    return {n: read_label(os.path.join(root, folder, n)) for n in names}


@pytest.fixture(scope="module")
def two_generations(tmp_path_factory):
    base = tmp_path_factory.mktemp("scribble_data")
    return [make_synthetic_voc(str(base / name), n_train=8, n_val=4, size=64, seed=3) for name in "ab"]


def test_builtin_labels_are_those_of_the_scene_generator(two_generations):
    """The scribble maps come from their own random stream: the scenes are what the scene generator alone draws (a
    tuned benchmark depends on them). The hash is of the decoded labels for 4 + 2 images of 64 px, seed 3, as
    version 4 draws them; versions 1-3 drew the same scenes with smaller triangles (hash e3cc573e...)."""
    root = two_generations[0]
    digest = hashlib.sha256()
    for name, label in read_all(root, "SegmentationClass").items():
        if name < "syn_000006":
            digest.update(label.tobytes())
    assert digest.hexdigest() == "7aca9f44f41a7e1cf3b0313f5029b30260af37fb25ea37ffb32504d590f3ae17"


def test_builtin_scribble_maps_are_deterministic_and_plausible(two_generations):
    a, b = two_generations
    for folder in ("scribble", "pseudo", "distancemap_s", "distancemap_c"):
        names = sorted(os.listdir(os.path.join(a, folder)))
        assert names == sorted(os.listdir(os.path.join(b, folder))) and len(names) == 12
        for name in names:
            with open(os.path.join(a, folder, name), "rb") as fa, open(os.path.join(b, folder, name), "rb") as fb:
                assert fa.read() == fb.read(), (folder, name)
    full, scribbles, pseudos = (read_all(a, f) for f in ("SegmentationClass", "scribble", "pseudo"))
    coverage = np.mean([(s != 255).mean() for s in scribbles.values()])
    assert 0.015 < coverage < 0.06
    agree, differ = [], 0
    for name, label in full.items():
        s, p = scribbles[name], pseudos[name]
        known = (label != 255) & (s != 255)
        assert (s[known] == label[known]).all() and (s == 0).any()  # correct strokes, some on the background
        both = (label != 255) & (p != 255)
        agree.append((p[both] == label[both]).mean())
        differ += (p[both] != label[both]).sum()
        dist_s, dist_c = (cv2.imread(os.path.join(a, f, name), cv2.IMREAD_UNCHANGED)
                          for f in ("distancemap_s", "distancemap_c"))
        expected = distance_maps(s, p, DEFAULT_LAMBDA_S, DEFAULT_LAMBDA_C)
        assert dist_s.shape == dist_c.shape == (64, 64) and dist_s.dtype == np.uint8
        assert (dist_s == expected[0]).all() and (dist_c == expected[1]).all()
    assert differ > 0 and np.mean(agree) > 0.85  # CAM-like: wrong in places, right on most pixels
    assert any(set(np.unique(s)) - {0, 255} for s in scribbles.values())  # object strokes too


def test_builtin_dataset_counts_a_missing_distance_map_as_incomplete(tmp_path):
    root = ensure_builtin_dataset(str(tmp_path / "cache"), n_train=2, n_val=1, size=48)
    missing = os.path.join(root, "distancemap_c", "syn_000001.png")
    os.remove(missing)
    assert ensure_builtin_dataset(str(tmp_path / "cache"), n_train=2, n_val=1, size=48) == root
    assert os.path.isfile(missing)
