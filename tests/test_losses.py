"""Losses against values computed by hand: explicit Python loops over math.exp/log, not the same tensor formula."""

import math

import pytest
import torch

from vlm_chat.losses import clip_loss, contrastive_accuracy, dpo_loss, siglip_loss, triplet_loss

# Three 2-D unit vectors at known angles, so every cosine is a closed form: cos(a - b).
IMG_ANGLES = [0.0, math.pi / 2, math.pi]
TXT_ANGLES = [math.pi / 6, math.pi / 2, 2 * math.pi / 3]


def _vecs(angles, scale=1.0):
    return torch.tensor([[scale * math.cos(a), scale * math.sin(a)] for a in angles], dtype=torch.float64)


def _cos(i, j):
    return math.cos(IMG_ANGLES[i] - TXT_ANGLES[j])


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_clip_loss_matches_hand_computed_infonce():
    scale = 2.5
    n = len(IMG_ANGLES)
    image_to_text = 0.0
    text_to_image = 0.0
    for i in range(n):
        row = [scale * _cos(i, j) for j in range(n)]
        image_to_text += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        col = [scale * _cos(j, i) for j in range(n)]
        text_to_image += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    expected = (image_to_text / n + text_to_image / n) / 2
    # Unnormalised inputs (scale 3 and 0.5) must give the same value: the loss normalises.
    got = clip_loss(_vecs(IMG_ANGLES, 3.0), _vecs(TXT_ANGLES, 0.5), torch.tensor(scale, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_clip_loss_perfect_alignment_goes_to_zero_with_large_scale():
    emb = torch.eye(4)
    assert clip_loss(emb, emb, torch.tensor(100.0)).item() < 1e-6


def test_siglip_loss_matches_hand_computed_sigmoid():
    scale, bias = 3.0, -1.5
    n = len(IMG_ANGLES)
    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            total += -_log_sigmoid(label * (scale * _cos(i, j) + bias))
    expected = total / n  # SigLIP normalises by the batch size, not by the n^2 pairs
    got = siglip_loss(
        _vecs(IMG_ANGLES),
        _vecs(TXT_ANGLES),
        torch.tensor(scale, dtype=torch.float64),
        torch.tensor(bias, dtype=torch.float64),
    )
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_triplet_loss_matches_hand_computed_hardest_negative():
    margin = 0.3
    n = len(IMG_ANGLES)
    i2t = 0.0
    t2i = 0.0
    for i in range(n):
        hardest = max(_cos(i, j) for j in range(n) if j != i)
        i2t += max(0.0, margin - _cos(i, i) + hardest)
        hardest = max(_cos(j, i) for j in range(n) if j != i)
        t2i += max(0.0, margin - _cos(i, i) + hardest)
    expected = i2t / n + t2i / n
    got = triplet_loss(_vecs(IMG_ANGLES), _vecs(TXT_ANGLES), margin=margin)
    assert expected > 0  # the example must exercise the hinge
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_triplet_loss_is_zero_when_separated_by_margin_and_needs_two_pairs():
    emb = torch.eye(3)
    assert triplet_loss(emb, emb, margin=0.5).item() == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        triplet_loss(torch.ones(1, 4), torch.ones(1, 4))


def test_dpo_loss_matches_hand_computed_values():
    pi_c, pi_r = [-3.0, -10.0], [-5.0, -4.0]
    ref_c, ref_r = [-4.0, -9.0], [-4.5, -6.0]
    beta = 0.5
    losses, chosen, rejected = [], [], []
    for k in range(2):
        margin = (pi_c[k] - pi_r[k]) - (ref_c[k] - ref_r[k])
        losses.append(-_log_sigmoid(beta * margin))
        chosen.append(beta * (pi_c[k] - ref_c[k]))
        rejected.append(beta * (pi_r[k] - ref_r[k]))
    t = lambda v: torch.tensor(v, dtype=torch.float64, requires_grad=True)  # noqa: E731
    loss, got_chosen, got_rejected = dpo_loss(t(pi_c), t(pi_r), t(ref_c), t(ref_r), beta=beta)
    assert loss.item() == pytest.approx(sum(losses) / 2, rel=1e-12)
    assert got_chosen.tolist() == pytest.approx(chosen, rel=1e-12)
    assert got_rejected.tolist() == pytest.approx(rejected, rel=1e-12)
    assert loss.requires_grad and not got_chosen.requires_grad  # rewards are for logging only


def test_dpo_loss_at_equal_policy_and_reference_is_log2():
    x = torch.randn(5)
    loss, chosen, rejected = dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert torch.all(chosen == 0) and torch.all(rejected == 0)


def test_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        clip_loss(torch.ones(2, 3), torch.ones(3, 3), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"\[B\]"):
        dpo_loss(torch.ones(2), torch.ones(3), torch.ones(2), torch.ones(2))


def test_contrastive_accuracy_counts_argmax_matches():
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0.1]])  # text 2 is closest to image 1
    acc = contrastive_accuracy(img, txt)
    assert acc["acc_i2t"] == pytest.approx(1.0)  # every image's best text is its own (image 1: text1 > text2)
    assert acc["acc_t2i"] == pytest.approx(2 / 3)
