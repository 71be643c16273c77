"""The same-caption ``positives`` branch of the contrastive losses, against numbers worked out by hand.

Every stage-0 run passes ``positives`` (images whose captions are identical match each other's caption), so this is
the branch training uses. The embeddings are unit vectors with simple cosines, so each expected value below is a
short formula over a similarity matrix written out by hand.

Four pairs; images 0 and 1 share a caption (texts 0 and 1 are the same vector):

    image 0 = (1, 0, 0)       text 0 = text 1 = (0.8, 0.6, 0)
    image 1 = (0.6, 0.8, 0)   text 2 = (0, 1, 0)
    image 2 = (0, 1, 0)       text 3 = (0, 0.6, 0.8)
    image 3 = (0, 0, 1)

    cosines S[i][j]   t0    t1    t2    t3
        image 0      0.8   0.8   0     0
        image 1      0.96  0.96  0.8   0.48
        image 2      0.6   0.6   1     0.6
        image 3      0     0     0     0.8
"""

from __future__ import annotations

import math

import pytest
import torch

from vlm_chat.losses import clip_loss, contrastive_accuracy, siglip_loss, triplet_loss

IMAGES = torch.tensor([[1, 0, 0], [0.6, 0.8, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
TEXTS = torch.tensor([[0.8, 0.6, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0.6, 0.8]], dtype=torch.float64)
POSITIVES = torch.eye(4, dtype=torch.bool)
POSITIVES[0, 1] = POSITIVES[1, 0] = True  # the shared caption


def _lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _close(actual: torch.Tensor, expected: float) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_the_hand_written_cosines():
    """The table in the module docstring, which every expected value below reads."""
    sims = torch.nn.functional.normalize(IMAGES, dim=-1) @ torch.nn.functional.normalize(TEXTS, dim=-1).t()
    table = [[0.8, 0.8, 0, 0], [0.96, 0.96, 0.8, 0.48], [0.6, 0.6, 1, 0.6], [0, 0, 0, 0.8]]
    torch.testing.assert_close(sims, torch.tensor(table, dtype=torch.float64))


def test_clip_loss_spreads_the_target_over_same_caption_positives():
    # Here text 1 is (0.6, 0.8, 0), not text 0's vector (as when the two captions of a positive pair differ, or their
    # embeddings do), so the column of t1 becomes S[:, 1] = (0.6, 1.0, 0.8, 0). logit_scale 2: logits = 2 S.
    # Cross-entropy of a row with target q = logsumexp(row) - sum_j q_j row_j; rows 0 and 1 (and columns 0 and 1)
    # put half the target on each of their two positives.
    texts = TEXTS.clone()
    texts[1] = torch.tensor([0.6, 0.8, 0], dtype=torch.float64)
    i2t = [_lse(1.6, 1.2, 0, 0) - (1.6 + 1.2) / 2,  # row 0: targets t0, t1
           _lse(1.92, 2.0, 1.6, 0.96) - (1.92 + 2.0) / 2,  # row 1: targets t0, t1
           _lse(1.2, 1.6, 2, 1.2) - 2,
           _lse(0, 0, 0, 1.6) - 1.6]
    t2i = [_lse(1.6, 1.92, 1.2, 0) - (1.6 + 1.92) / 2,  # column 0: targets images 0 and 1
           _lse(1.2, 2.0, 1.6, 0) - (1.2 + 2.0) / 2,  # column 1: targets images 0 and 1
           _lse(0, 1.6, 2, 0) - 2,
           _lse(0, 0.96, 1.2, 1.6) - 1.6]
    expected = (sum(i2t) / 4 + sum(t2i) / 4) / 2
    scale = torch.tensor(2.0, dtype=torch.float64)
    _close(clip_loss(IMAGES, texts, scale, positives=POSITIVES), expected)
    # The diagonal targets (the default) take t0 for image 0 and t1 for image 1 instead of their means: rows 0 and 1
    # subtract 1.6 + 2.0 instead of 1.4 + 1.96, columns 0 and 1 the same, so the loss is (0.24 / 4 + 0.24 / 4) / 2 lower.
    _close(clip_loss(IMAGES, texts, scale), expected - 0.06)
    _close(clip_loss(IMAGES, texts, scale, positives=torch.eye(4, dtype=torch.bool)), expected - 0.06)


def test_clip_loss_with_identical_duplicate_texts_equals_the_diagonal_loss():
    """When the shared caption's two texts have the same embedding (the same tokens through a text tower without
    dropout), the uniform target over both gives the same loss as the diagonal one: rows 0 and 1 have equal logits at
    t0 and t1, and columns 0 and 1 are equal, so averaging the targets changes no sum. The mask matters for CLIP only
    where duplicate captions embed differently; for SigLIP and the triplet loss it always does (below)."""
    rows = [_lse(1.6, 1.6, 0, 0) - 1.6, _lse(1.92, 1.92, 1.6, 0.96) - 1.92, _lse(1.2, 1.2, 2, 1.2) - 2,
            _lse(0, 0, 0, 1.6) - 1.6]
    cols = [_lse(1.6, 1.92, 1.2, 0) - (1.6 + 1.92) / 2] * 2 + [_lse(0, 1.6, 2, 0) - 2, _lse(0, 0.96, 1.2, 1.6) - 1.6]
    scale = torch.tensor(2.0, dtype=torch.float64)
    _close(clip_loss(IMAGES, TEXTS, scale, positives=POSITIVES), (sum(rows) + sum(cols)) / 8)
    _close(clip_loss(IMAGES, TEXTS, scale), (sum(rows) + sum(cols)) / 8)


def test_siglip_loss_labels_same_caption_pairs_positive():
    # logit_scale 2, bias -1: z = 2 S - 1. Label +1 on POSITIVES (6 pairs), -1 elsewhere (10 pairs);
    # -log sigmoid(y z) = softplus(-y z); the sum is divided by the batch size, 4.
    positive_terms = [_softplus(-0.6)] * 2 + [_softplus(-0.92)] * 2 + [_softplus(-1.0), _softplus(-0.6)]
    negative_terms = ([_softplus(-1.0)] * 2  # row 0: z = -1 at t2, t3
                      + [_softplus(0.6), _softplus(-0.04)]  # row 1: z = 0.6 at t2, -0.04 at t3
                      + [_softplus(0.2)] * 3  # row 2: z = 0.2 at t0, t1, t3
                      + [_softplus(-1.0)] * 3)  # row 3: z = -1 at t0, t1, t2
    assert len(positive_terms) + len(negative_terms) == 16
    expected = (sum(positive_terms) + sum(negative_terms)) / 4
    scale, bias = torch.tensor(2.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    _close(siglip_loss(IMAGES, TEXTS, scale, bias, positives=POSITIVES), expected)
    # Without the mask, pairs (0, 1) and (1, 0) are negatives: softplus(0.6) and softplus(0.92) instead.
    unmasked = expected + (_softplus(0.6) - _softplus(-0.6) + _softplus(0.92) - _softplus(-0.92)) / 4
    _close(siglip_loss(IMAGES, TEXTS, scale, bias), unmasked)


def test_triplet_loss_never_takes_a_same_caption_positive_as_the_hardest_negative():
    # margin 0.3 on the cosine scale; the positive is the diagonal, the hardest negative the largest cosine outside
    # POSITIVES. Images (rows): hinge = relu(0.3 - S_ii + max_neg).
    #   row 0: max over t2, t3 = 0 -> relu(0.3 - 0.8) = 0;  row 1: max(0.8, 0.48) -> relu(0.3 - 0.96 + 0.8) = 0.14
    #   row 2: max over t0, t1, t3 = 0.6 -> relu(-0.1) = 0;  row 3: 0 -> 0
    # Texts (columns): col 0: max over images 2, 3 = 0.6 -> relu(0.3 - 0.8 + 0.6) = 0.1;  col 1: 0.6 -> relu(-0.06) = 0
    #   col 2: max(0, 0.8, 0) -> relu(0.3 - 1 + 0.8) = 0.1;  col 3: max(0, 0.48, 0.6) -> relu(0.3 - 0.8 + 0.6) = 0.1
    expected = 0.14 / 4 + 0.3 / 4
    _close(triplet_loss(IMAGES, TEXTS, margin=0.3, positives=POSITIVES), expected)
    # Without the mask, rows 0 and 1 pick the shared caption: relu(0.3 - 0.8 + 0.8) = 0.3, relu(0.3 - 0.96 + 0.96)
    # = 0.3; columns 0 and 1 pick the other image: relu(0.3 - 0.8 + 0.96) = 0.46, relu(0.3 - 0.96 + 0.8) = 0.14.
    _close(triplet_loss(IMAGES, TEXTS, margin=0.3), (0.3 + 0.3) / 4 + (0.46 + 0.14 + 0.1 + 0.1) / 4)
    # A batch of one shared caption has no negative at all: no hinge.
    _close(triplet_loss(IMAGES[:2], TEXTS[:2], margin=0.3, positives=torch.ones(2, 2, dtype=torch.bool)), 0.0)


def test_contrastive_accuracy_counts_a_same_caption_match_as_correct():
    # Image 1's most similar text is t0 (0.96, tied with t1; argmax takes the first): right with the mask, wrong
    # without. Text 0's most similar image is image 1 (0.96 > 0.8): the same. Every other argmax is the diagonal.
    assert contrastive_accuracy(IMAGES, TEXTS, positives=POSITIVES) == {"acc_i2t": 1.0, "acc_t2i": 1.0}
    assert contrastive_accuracy(IMAGES, TEXTS) == {"acc_i2t": 0.75, "acc_t2i": 0.75}


@pytest.mark.parametrize("loss", ["clip", "siglip", "triplet", "accuracy"])
def test_positives_must_hold_the_diagonal(loss):
    bad = POSITIVES.clone()
    bad[2, 2] = False
    one = torch.tensor(1.0, dtype=torch.float64)
    call = {"clip": lambda: clip_loss(IMAGES, TEXTS, one, positives=bad),
            "siglip": lambda: siglip_loss(IMAGES, TEXTS, one, one, positives=bad),
            "triplet": lambda: triplet_loss(IMAGES, TEXTS, positives=bad),
            "accuracy": lambda: contrastive_accuracy(IMAGES, TEXTS, positives=bad)}[loss]
    with pytest.raises(ValueError, match="positives must include the diagonal"):
        call()
