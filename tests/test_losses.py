"""Each loss against hand-computed values on a 1x2x2x2 batch, with ignore pixels, an all-ignore batch and gradients."""
import argparse
import math

import numpy as np
import pytest
import torch

from models import losses as losses
from core.schemas import loss_specs_from_tables
from models.losses import LOSSES, build_criterion
from utils import UserError

NAMES = ["ce", "bce", "dice", "focal", "lovasz"]
# One image, two classes, 2x2 pixels; the bottom-left pixel is ignore.
LOGITS = [[[2.0, -1.0], [5.0, 0.5]],     # class 0
          [[0.0, 1.0], [-3.0, -0.5]]]    # class 1
TARGET = [[0, 1], [255, 1]]


def example(logits=LOGITS, target=TARGET):
    return torch.tensor([logits], requires_grad=True), torch.tensor([target])


def loss_fn(name, **flags):
    return LOSSES.get(name)(argparse.Namespace(**flags))


def labelled_numpy(logits=LOGITS, target=TARGET):
    """(P, C) scores and (P,) labels of the labelled pixels, in float64, for the references below."""
    scores, labels = np.array(logits, dtype=np.float64).reshape(2, -1).T, np.array(target).reshape(-1)
    keep = labels != 255
    return scores[keep], labels[keep]


def softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def reference(name, logits=LOGITS, target=TARGET, gamma=2.0):
    """Each loss written out directly from its definition."""
    scores, labels = labelled_numpy(logits, target)
    p, onehot = softmax(scores), np.eye(2)[labels]
    if name == "ce":
        return -np.log(p[np.arange(len(labels)), labels]).mean()
    if name == "bce":
        q = 1 / (1 + np.exp(-scores))
        return -(onehot * np.log(q) + (1 - onehot) * np.log(1 - q)).mean()
    if name == "focal":
        pt = p[np.arange(len(labels)), labels]
        return -((1 - pt) ** gamma * np.log(pt)).mean()
    present = [c for c in range(2) if (labels == c).any()]
    if name == "dice":
        return np.mean([1 - (2 * (p[:, c] * onehot[:, c]).sum() + 1) / (p[:, c].sum() + onehot[:, c].sum() + 1)
                        for c in present])
    assert name == "lovasz"
    return np.mean([lovasz_by_sets(np.abs(onehot[:, c] - p[:, c]), labels == c) for c in present])


def lovasz_by_sets(errors, fg):
    """The Lovász extension as a sum over growing sets of mistakes, each step weighed by its error."""
    def jaccard_loss(mistakes):
        return 1 - (fg & ~mistakes).sum() / (fg | mistakes).sum()
    mistakes, total, previous = np.zeros_like(fg), 0.0, 0.0
    for i in np.argsort(-errors, kind="stable"):
        mistakes[i] = True
        current = jaccard_loss(mistakes)
        total += errors[i] * (current - previous)
        previous = current
    return total


def test_hand_values_at_zero_logits():
    # Every probability is 1/2 and every sigmoid 1/2; 3 labelled pixels: one of class 0, two of class 1.
    logits, target = example(np.zeros((2, 2, 2)).tolist())
    value = {name: loss_fn(name)(logits, target).item() for name in NAMES}
    assert value["ce"] == pytest.approx(math.log(2))
    assert value["bce"] == pytest.approx(math.log(2))
    assert value["focal"] == pytest.approx(0.25 * math.log(2))           # (1 - 1/2)^2 x log 2
    # class 0: 1 - (2 x 0.5 + 1) / (1.5 + 1 + 1) = 3/7; class 1: 1 - (2 x 1 + 1) / (1.5 + 2 + 1) = 1/3
    assert value["dice"] == pytest.approx((3 / 7 + 1 / 3) / 2)
    # All errors are 1/2, so each class's loss is 1/2 x its Jaccard loss with every pixel wrong (1).
    assert value["lovasz"] == pytest.approx(0.5)


@pytest.mark.parametrize("name", NAMES)
def test_matches_reference_and_ignores_255(name):
    logits, target = example()
    assert loss_fn(name)(logits, target).item() == pytest.approx(reference(name), rel=1e-5)
    # Whatever the ignored pixel's scores, the loss is the same.
    changed = torch.tensor(LOGITS)
    changed[:, 1, 0] = torch.tensor([-40.0, 60.0])
    assert loss_fn(name)(changed[None], target).item() == pytest.approx(reference(name), rel=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.0])
def test_focal_gamma(gamma):
    logits, target = example()
    fn = loss_fn("focal", focal_gamma=gamma)
    assert fn(logits, target).item() == pytest.approx(reference("focal", gamma=gamma), rel=1e-5)
    if gamma == 0:
        assert fn(logits, target).item() == pytest.approx(loss_fn("ce")(logits, target).item(), rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_ignored_pixels_get_zero_gradient(name):
    logits, target = example()
    loss_fn(name)(logits, target).backward()
    grad = logits.grad[0]
    assert torch.isfinite(grad).all()
    assert grad[:, 1, 0].abs().max() == 0            # the 255 pixel
    assert grad[:, target[0] != 255].abs().sum() > 0  # the labelled ones learn


@pytest.mark.parametrize("name", NAMES)
def test_all_ignore_is_zero_and_differentiable(name):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    value = loss_fn(name)(logits, torch.full((2, 4, 4), 255))
    assert value.item() == 0.0
    value.backward()
    assert logits.grad is not None and logits.grad.abs().max() == 0


def test_confident_lovasz_is_one_minus_iou():
    # With (almost) hard predictions the errors are 0/1 and the Lovász extension equals the Jaccard loss itself.
    pred = torch.tensor([[0, 0, 1], [1, 2, 2], [2, 2, 0]])
    target = torch.tensor([[0, 1, 1], [255, 2, 2], [2, 0, 0]])
    logits = 30.0 * torch.nn.functional.one_hot(pred, 3).permute(2, 0, 1)[None].float()
    # IoU = overlap / union over the 8 labelled pixels: class 0: 2 / 4, class 1: 1 / 2, class 2: 3 / 4
    expected = np.mean([1 - 2 / 4, 1 - 1 / 2, 1 - 3 / 4])
    assert losses.lovasz_softmax(logits, target[None]).item() == pytest.approx(expected, abs=1e-6)


def test_focal_with_small_gamma_stays_finite_on_confident_pixels():
    logits = torch.tensor([[[[60.0]], [[-60.0]]]], requires_grad=True)   # p = 1 in float32
    value = loss_fn("focal", focal_gamma=0.5)(logits, torch.tensor([[[0]]]))
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-12) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("gamma", [-1.0, float("nan"), float("inf")])
def test_bad_focal_gamma_is_a_clear_error(gamma):
    with pytest.raises(UserError, match="--focal_gamma .* expected a number >= 0"):
        loss_fn("focal", focal_gamma=gamma)


def test_criterion_weighs_and_reports_each_term():
    logits, target = example()
    criterion = build_criterion(argparse.Namespace(loss=["ce", "dice:0.5", "focal:0.25", "lovasz:2"],
                                                   focal_gamma=2.0))
    total, terms = criterion(logits, target)
    assert list(terms) == ["ce", "dice", "focal", "lovasz"]
    expected = reference("ce") + 0.5 * reference("dice") + 0.25 * reference("focal") + 2 * reference("lovasz")
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert terms["dice"].item() == pytest.approx(reference("dice"), rel=1e-5)


def test_criterion_tables_become_loss_specs():
    tables = [{"type": "ce"}, {"type": "dice", "weight": 0.5}, {"type": "lovasz", "weight": 2}]
    assert loss_specs_from_tables(tables, "'criterion' in x.toml") == ["ce:1.0", "dice:0.5", "lovasz:2.0"]


@pytest.mark.parametrize("tables, message", [
    ([], "is not a list of tables"),
    ({"type": "dice"}, "is not a list of tables"),
    ([{"type": "dice", "wieght": 0.5}], "entry 1: .* other keys"),
    ([{"type": "ce"}, {"weight": 0.5}], "entry 2: type None is not a loss name"),
    ([{"type": "dice", "weight": "half"}], "entry 1: weight 'half' is not a number"),
])
def test_bad_criterion_tables_are_clear_errors(tables, message):
    with pytest.raises(UserError, match=r"^'criterion' in x\.toml.*" + message):
        loss_specs_from_tables(tables, "'criterion' in x.toml")
