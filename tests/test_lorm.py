"""LoRM: the models' outputs, the loss's value by hand, its edge cases (no foreground, ignore), and export."""
import math
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

import models.lorm  # noqa: F401 - registers the *_lorm models
from models import build_model
from models.lorm import LORM_STYLES, LoRM
from utils import UserError

LORM_MODELS = ["res50_ASPP_lorm", "deeplabv3p_lorm"]


def make_model(model_type="deeplabv3p_lorm", layers=18, output_stride=16):
    torch.manual_seed(0)
    args = Namespace(model_type=model_type, layers=layers, numclasses=5, output_stride=output_stride,
                     head_channels=16)
    return build_model(args)


def images_and_pseudo(n=2, size=64):
    """Random images and pseudo labels: background, a square of class 2, an ignore strip along the top."""
    torch.manual_seed(1)
    pseudo = torch.zeros(n, size, size, dtype=torch.long)
    pseudo[:, size // 4:3 * size // 4, size // 4:3 * size // 4] = 2
    pseudo[:, :size // 8] = 255
    return torch.randn(n, 3, size, size), pseudo


@pytest.mark.parametrize("model_type", LORM_MODELS)
@pytest.mark.parametrize("layers,output_stride", [(18, 16), (50, 16), (18, 8)])
def test_logits_and_loss_by_mode(model_type, layers, output_stride):
    model = make_model(model_type, layers, output_stride)
    assert model.lorm.in_channels == model.backbone.out_channels  # 512 or 2048, taken from the backbone
    x, pseudo = images_and_pseudo(n=1)
    with torch.no_grad():
        logits, loss = model.train()(x, pseudo)
        assert logits.shape == (1, 5, 64, 64) and loss.dim() == 0 and loss.item() > 0
        for out in (model(x), model.eval()(x), model(x, pseudo)):  # train without pseudo, eval, eval with pseudo
            assert isinstance(out, torch.Tensor) and out.shape == (1, 5, 64, 64)


@pytest.mark.parametrize("fill", [0, 255], ids=["all-background", "all-ignore"])
def test_no_foreground_gives_zero_and_gradients_everywhere(fill):
    model = make_model().train()
    x, _ = images_and_pseudo(size=32)
    pseudo = torch.full((2, 32, 32), fill, dtype=torch.long)
    logits, loss = model(x, pseudo)
    assert loss.item() == 0.0 and math.copysign(1.0, loss.item()) > 0  # 0.0, not -0.0
    # DDP with find_unused_parameters=False needs every parameter in the graph, even on such a batch.
    (logits.sum() + loss).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.lorm.parameters())


def test_image_without_foreground_adds_nothing():
    lorm = LoRM(8, min_dim=4)
    torch.manual_seed(2)
    features = torch.randn(2, 8, 4, 4)
    pseudo = torch.zeros(2, 8, 8, dtype=torch.long)
    pseudo[0, 2:6, 2:6] = 1  # only image 0 has foreground
    both = lorm(features, pseudo)
    alone = lorm(features[:1], pseudo[:1])
    torch.testing.assert_close(both, alone)
    both.backward()
    assert all(p.grad is not None for p in lorm.parameters())


def test_pseudo_labels_are_not_modified():
    model = make_model().train()
    x, pseudo = images_and_pseudo()
    before = pseudo.clone()
    model(x, pseudo)[1].backward()
    assert torch.equal(pseudo, before) and (pseudo == 255).any()


def test_hand_computed_loss():
    """Features on a 2x2 map; labels at 4x4, so the nearest-neighbour resize picks every other pixel."""
    lorm = LoRM(2, min_dim=2)
    labels = torch.tensor([[1, 1, 3, 3],
                           [1, 1, 3, 3],
                           [0, 0, 255, 255],
                           [0, 0, 255, 255]])[None]  # foreground at (0, 0) and (0, 1)
    features = torch.tensor([[[1.0, 0.0], [5.0, -7.0]],
                             [[0.0, 1.0], [-3.0, 2.0]]])[None]  # (1, C=2, 2, 2): f(0,0)=(1,0), f(0,1)=(0,1)
    with torch.no_grad():
        # A zero query makes every score 0: uniform attention, so both aggregates are (0.5, 0.5) and the
        # background / ignore features must not enter it.
        lorm.query.weight.zero_()
        torch.testing.assert_close(lorm(features, labels), torch.tensor(1 - 1 / math.sqrt(2)))

        # General case, recomputed from the docstring's formula with explicit tensors.
        lorm.query.weight.copy_(torch.tensor([[2.0, -1.0], [0.5, 1.0]])[:, :, None, None])
        lorm.key.weight.copy_(torch.tensor([[1.0, 0.0], [3.0, 1.0]])[:, :, None, None])
        fg = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (P, C)
        q = fg @ torch.tensor([[2.0, -1.0], [0.5, 1.0]]).t()
        k = fg @ torch.tensor([[1.0, 0.0], [3.0, 1.0]]).t()
        attention = torch.softmax(q @ k.t() / math.sqrt(2), dim=1)
        aggregate = attention @ fg
        expected = (1 - (fg * aggregate).sum(1) / (fg.norm(dim=1) * aggregate.norm(dim=1))).mean()
        torch.testing.assert_close(lorm(features, labels), expected)

        # Identical foreground features: the aggregate equals the feature, whatever the attention.
        features[0, :, 0, 1] = features[0, :, 0, 0]
        assert lorm(features, labels).abs().item() < 1e-6


def test_training_pulls_foreground_features_together_and_leaves_the_rest():
    """Features stand in for the backbone's output: descending the loss makes the foreground features of an image
    more alike, and background / ignore features get no gradient."""
    torch.manual_seed(3)
    lorm = LoRM(16, min_dim=4)
    features = torch.randn(2, 16, 6, 6).relu().requires_grad_()  # post-ReLU, like a ResNet's
    pseudo = torch.zeros(2, 12, 12, dtype=torch.long)
    pseudo[:, 2:10, 2:8] = 1
    pseudo[:, 10:] = 255
    fg = pseudo[:, ::2, ::2] == 1

    def mean_pairwise_cosine(f):
        x = F.normalize(f[0].flatten(1)[:, fg[0].flatten()].t(), dim=1)
        return (x @ x.t()).mean().item()

    optimizer = torch.optim.SGD([features, *lorm.parameters()], lr=5.0)
    losses, start = [], mean_pairwise_cosine(features.detach())
    for _ in range(20):
        loss = lorm(features, pseudo)
        optimizer.zero_grad()
        loss.backward()
        assert features.grad.permute(0, 2, 3, 1)[~fg].abs().max() == 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0 and losses[-1] < 0.5 * losses[0], losses
    assert mean_pairwise_cosine(features.detach()) > start


@pytest.mark.parametrize("pseudo,expected", [
    (torch.zeros(2, 32, 64, dtype=torch.long), "do not match the image batch"),
    (torch.zeros(1, 64, 64, dtype=torch.long), "do not match the image batch"),
    (torch.zeros(2, 64, 64), "integer tensor"),
])
def test_bad_pseudo_labels_raise_user_error(pseudo, expected):
    model = make_model().train()
    with pytest.raises(UserError, match=expected):
        model(torch.randn(2, 3, 64, 64), pseudo)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("model_type", LORM_MODELS)
def test_exports_like_eager(model_type):
    model = make_model(model_type).eval()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected)
        if model_type == "deeplabv3p_lorm":  # the export's fallback, should scripting ever break
            torch.testing.assert_close(torch.jit.trace(model, x)(x), expected)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_eval_forward_and_export_run_no_lorm():
    model = make_model()
    calls = []
    hook = model.lorm.register_forward_hook(lambda *_: calls.append(1))
    x, pseudo = images_and_pseudo(n=1)
    with torch.no_grad():
        model.train()(x, pseudo)
        assert len(calls) == 1  # the hook sees LoRM when it runs
        model.eval()(x, pseudo)
        torch.jit.trace(model, x)
    assert len(calls) == 1  # eval forward and tracing never entered it
    hook.remove()  # a Python hook cannot be scripted
    graph = str(torch.jit.freeze(torch.jit.script(model)).inlined_graph)
    # LoRM's own ops, and its frozen query/key weights (constants named self.lorm.*); the segmentation path uses none.
    assert "scaled_dot_product_attention" not in graph and "cosine_similarity" not in graph
    assert "self.lorm" not in graph


# ----------------------------------------------------------------------------------------------
# --lorm paper and --entropy_norm paper against a plain re-statement of the method's code, one position at a time

def paper_lorm_by_hand(x, pseudo, wq, bq, wk, bk, gamma):
    """The reference formulation written out loop by loop: the class-index map (ignore set to 0 on a copy) resized
    bilinearly with align_corners=True and taken > 0; cosine attention over every key; background queries give 0;
    out = gamma * sum_j a_ij x_j; loss = sum of squares / count of non-zero squares over the batch."""
    n_images, channels, h, w = x.shape
    squares = []
    for n in range(n_images):
        labels = pseudo[n].clone().float()
        labels[labels == 255] = 0
        mask = F.interpolate(labels[None, None], size=(h, w), mode="bilinear", align_corners=True)[0, 0] > 0
        feats = x[n].reshape(channels, -1)
        q, k = wq @ feats + bq[:, None], wk @ feats + bk[:, None]
        out = torch.zeros_like(feats)
        for i in range(h * w):
            if not mask.flatten()[i]:
                continue
            cos = torch.stack([q[:, i] @ k[:, j] / (q[:, i].norm() * k[:, j].norm()) for j in range(h * w)])
            weights = cos.exp() / cos.exp().sum()
            out[:, i] = gamma * (feats * weights).sum(1)
        squares.append((feats - out) ** 2)
    squares = torch.cat([s.flatten() for s in squares])
    return squares.sum() / (squares != 0).sum()


def test_paper_lorm_matches_the_formulation_written_out():
    torch.manual_seed(3)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    pseudo = torch.randint(0, 4, (2, 20, 24))
    pseudo[0, :6] = 255  # ignore: not foreground
    pseudo[1, 10:] = 0
    module = LORM_STYLES["paper"](8).double()
    with torch.no_grad():
        module.gamma.fill_(0.7)
        module.query.bias.normal_()
        module.key.bias.normal_()
    kept = pseudo.clone()
    loss = module(x, pseudo)
    assert torch.equal(pseudo, kept)  # the labels are not written to
    expected = paper_lorm_by_hand(x, pseudo, module.query.weight[:, :, 0, 0], module.query.bias,
                                  module.key.weight[:, :, 0, 0], module.key.bias, 0.7)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert module.gamma.grad is not None and module.query.weight.grad.abs().sum() > 0
    nothing = module(torch.zeros(1, 8, 5, 6, dtype=torch.float64), torch.zeros(1, 20, 24, dtype=torch.long))
    assert nothing.item() == 0.0  # 0/0 in the code; 0 here


def test_paper_lorm_models_build_and_train():
    model = build_model(Namespace(model_type="res50_ASPP_lorm", layers=18, numclasses=3, output_stride=16,
                                  head_channels=16, lorm="paper"))
    assert isinstance(model.lorm, LORM_STYLES["paper"]) and model.lorm.query.out_channels == 512  # from the backbone
    model.train()
    logits, loss = model(torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64)))
    assert logits.shape == (2, 3, 64, 64) and torch.isfinite(loss)


def test_paper_entropy_norm_matches_the_formulation_written_out():
    from tasks.scribble import weighted_entropy
    torch.manual_seed(4)
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    dist = torch.randint(0, 256, (2, 4, 5))
    dist[0, :2] = 0
    numerator, nonzero, weight_sum = 0.0, 0, 0.0
    for n in range(2):
        for i in range(4):
            for j in range(5):
                p = logits[n, :, i, j].softmax(0)
                term = float(dist[n, i, j]) / 255 * -(p * p.log()).sum().item()
                numerator, nonzero, weight_sum = numerator + term, nonzero + (term != 0), weight_sum + dist[n, i, j] / 255
    assert weighted_entropy(logits, dist, "paper").item() == pytest.approx(numerator / nonzero, rel=1e-5)
    assert weighted_entropy(logits, dist, "weight").item() == pytest.approx(numerator / float(weight_sum), rel=1e-5)
    assert weighted_entropy(logits, torch.zeros(2, 4, 5), "paper").item() == 0.0
