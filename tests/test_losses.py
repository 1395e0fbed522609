import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import losses

HERE = os.path.dirname(os.path.abspath(__file__))


def vectors_dir():
    root = os.environ.get("CLIPFH_VECTORS")
    if root:
        return os.path.join(root, "losses")
    return os.path.join(HERE, "vectors", "losses")


def load_vectors():
    folder = vectors_dir()
    with open(os.path.join(folder, "expected.json")) as f:
        expected = json.load(f)
    inputs = torch.load(os.path.join(folder, "inputs.pt"), weights_only=True)
    return inputs, expected


def arcface_logits(d):
    head = losses.ArcFace(d["arcface_weight"].shape[1], d["arcface_weight"].shape[0], s=30.0, m=0.5)
    with torch.no_grad():
        head.weight.copy_(d["arcface_weight"])
    return head(d["feats"], d["labels"])


def center(d):
    loss = losses.CenterLoss(*d["centers"].shape)
    with torch.no_grad():
        loss.centers.copy_(d["centers"])
    return loss(d["feats"], d["labels"])


CASES = {
    "triplet_margin0.3": lambda d: losses.TripletLoss(margin=0.3)(d["feats"], d["labels"]),
    "triplet_soft": lambda d: losses.TripletLoss(margin=None)(d["feats"], d["labels"]),
    "triplet_margin0.3_normalized":
        lambda d: losses.TripletLoss(margin=0.3, normalize_feature=True)(d["feats"], d["labels"]),
    "ce_label_smooth_eps0.1": lambda d: losses.CrossEntropyLabelSmooth(0.1)(d["logits"], d["labels"]),
    "supcon_t2i": lambda d: losses.SupConLoss()(d["text"], d["feats"], d["t_label"], d["labels"]),
    "supcon_i2t": lambda d: losses.SupConLoss()(d["feats"], d["text"], d["labels"], d["t_label"]),
    "center": center,
    "arcface_s30_m0.5_ce": lambda d: F.cross_entropy(arcface_logits(d), d["labels"]),
}


def test_every_vector_case_has_an_implementation():
    _, expected = load_vectors()
    missing = sorted(set(expected["values"]) - set(CASES))
    assert not missing, f"loss vector cases without a test implementation: {missing}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_matches_reference_vectors(case):
    inputs, expected = load_vectors()
    if case not in expected["values"]:
        pytest.skip(f"{case} not in {vectors_dir()}")
    value = CASES[case](inputs).item()
    assert abs(value - expected["values"][case]) <= 1e-5, (case, value, expected["values"][case])


def test_arcface_logits_match_reference():
    inputs, _ = load_vectors()
    torch.testing.assert_close(arcface_logits(inputs), inputs["arcface_logits"], atol=1e-5, rtol=0)


def test_label_smoothing_zero_is_plain_cross_entropy():
    logits, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    torch.testing.assert_close(losses.cross_entropy_label_smooth(logits, labels, 0.0),
                               F.cross_entropy(logits, labels))
    torch.testing.assert_close(losses.cross_entropy_label_smooth(logits, labels, 0.1),
                               F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_triplet_gradients_finite_with_duplicate_features():
    feats = torch.randn(4, 8).repeat(2, 1).requires_grad_()  # exact duplicates: zero distances
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    for margin in (0.3, None):
        loss = losses.TripletLoss(margin=margin, normalize_feature=True)(feats, labels)
        (grad,) = torch.autograd.grad(loss, feats)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_triplet_batch_without_negatives_is_zero():
    feats = torch.randn(4, 8, requires_grad=True)
    loss = losses.TripletLoss(0.3)(feats, torch.zeros(4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()


def test_triplet_is_zero_when_classes_are_far_apart():
    feats = torch.tensor([[0.0, 0], [0.1, 0], [10, 0], [10.1, 0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert losses.TripletLoss(0.3)(feats, labels).item() == 0.0
    assert losses.TripletLoss(None)(feats, labels).item() < 1e-3


def test_supcon_ignores_anchors_without_positives():
    anchors, candidates = torch.randn(3, 4), torch.randn(5, 4)
    with_orphan = losses.supcon_loss(anchors, torch.tensor([0, 1, 9]), candidates,
                                     torch.tensor([0, 0, 1, 2, 2]))
    without = losses.supcon_loss(anchors[:2], torch.tensor([0, 1]), candidates,
                                 torch.tensor([0, 0, 1, 2, 2]))
    torch.testing.assert_close(with_orphan, without)


def test_center_loss_gradient_moves_centres_towards_features():
    torch.manual_seed(0)
    loss_fn = losses.CenterLoss(3, 4)
    feats, labels = torch.randn(3, 4).repeat_interleave(2, 0), torch.tensor([0, 0, 1, 1, 2, 2])
    before = loss_fn(feats, labels).item()
    optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.1)
    for _ in range(20):
        optimizer.zero_grad()
        loss_fn(feats, labels).backward()
        optimizer.step()
    assert loss_fn(feats, labels).item() < 0.1 * before


def test_arcface_target_logit_penalised_and_monotonic():
    head = losses.ArcFace(2, 2, s=1.0, m=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    angles = torch.linspace(0.01, math.pi - 0.01, 50)
    feats = torch.stack([angles.cos(), angles.sin()], dim=1)
    target = head(feats, torch.zeros(50, dtype=torch.long))[:, 0]
    plain = head(feats)[:, 0]
    assert (target < plain).all()
    assert (target[1:] < target[:-1]).all()  # decreasing in the angle, also past pi - m
