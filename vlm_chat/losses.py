"""Training losses as pure functions: contrastive (CLIP, SigLIP, triplet) and preference (DPO).

Each function takes tensors and returns tensors; none holds state or parameters, so the training code
owns the learnable temperature/bias and the tests can check each formula against hand-computed values.

Conventions:
    * ``image_emb`` / ``text_emb`` are ``[B, D]`` pairs: row ``i`` of one matches row ``i`` of the other.
      The contrastive losses L2-normalise them (a no-op for already normalised embeddings), so callers
      can pass raw projections without getting a silently different loss.
    * ``logit_scale`` is the *multiplier* ``exp(t)`` (already exponentiated), as in the CLIP and SigLIP
      papers' ``logits = cos_sim * exp(t) (+ b)``. transformers stores the log value ``t`` in
      ``model.logit_scale``; pass ``model.logit_scale.exp()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "caption_keys",
    "clip_loss",
    "contrastive_accuracy",
    "dpo_loss",
    "siglip_loss",
    "triplet_loss",
]


def _check_pairs(image_emb: torch.Tensor, text_emb: torch.Tensor, min_batch: int = 1) -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise ValueError(
            f"embeddings must be [B, D]; got image {tuple(image_emb.shape)} and text {tuple(text_emb.shape)}"
        )
    if image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image and text embeddings differ in shape: {tuple(image_emb.shape)} vs {tuple(text_emb.shape)}"
        )
    if image_emb.shape[0] < min_batch:
        raise ValueError(f"this loss needs at least {min_batch} pairs in the batch, got {image_emb.shape[0]}")


def _positive_mask(positives: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """``[B, B]`` bool mask of matching (image, text) pairs; the diagonal when ``positives`` is None."""
    if positives is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    if positives.shape != (n, n):
        raise ValueError(f"positives must be [{n}, {n}] for a batch of {n} pairs, got {tuple(positives.shape)}")
    if not bool(positives.diagonal().all()):
        raise ValueError("positives must include the diagonal (every image matches its own caption)")
    return positives.to(device=device, dtype=torch.bool)


def caption_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B]`` int64 hash of each row's real tokens: equal captions get equal keys whatever their padding.

    Small caption sets repeat captions ("A red circle." for hundreds of images); treating an identical caption of
    another image as a negative asks the model to tell apart texts that are the same (a false negative). The mask
    ``keys[:, None] == keys[None, :]`` makes them positives instead, as label-aware contrastive losses do (UniCL,
    Yang et al., 2022).

    A polynomial hash with wrap-around int64 arithmetic; a fixed-size key can be all-gathered across processes
    whose batches were padded to different lengths.
    """
    ids = input_ids.long()
    powers = torch.full((ids.shape[1],), 1_000_003, dtype=torch.long, device=ids.device).cumprod(0)  # wraps
    terms = (ids + 7) * powers  # [B, L]
    if attention_mask is not None:
        terms = terms * attention_mask.long()  # padding adds nothing, so the padded length does not matter
    return terms.sum(1)


def _cosine_similarities(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    return image_emb @ text_emb.t()  # [B_img, B_txt]; entry (i, j) = cos(image i, text j)


def clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, positives: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al., 2021) with a learned temperature.

    Args:
        image_emb: ``[B, D]`` image embeddings.
        text_emb: ``[B, D]`` text embeddings; row ``i`` is the caption of image ``i``.
        logit_scale: scalar tensor, the multiplier ``exp(t)`` applied to cosine similarities.
        positives: optional ``[B, B]`` bool mask of matching pairs (default: the diagonal). With several
            positives in a row the target distribution is uniform over them (e.g. pairs whose captions are
            identical, :func:`caption_keys`).

    Returns:
        Scalar loss: the mean of the image->text and text->image cross-entropies over the batch.
    """
    _check_pairs(image_emb, text_emb)
    logits = logit_scale * _cosine_similarities(image_emb, text_emb)  # [B, B]
    if positives is None:
        targets = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    mask = _positive_mask(positives, logits.shape[0], logits.device).to(logits.dtype)
    i2t = F.cross_entropy(logits, mask / mask.sum(1, keepdim=True))
    t2i = F.cross_entropy(logits.t(), mask.t() / mask.t().sum(1, keepdim=True))
    return (i2t + t2i) / 2


def siglip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pairwise sigmoid loss of SigLIP (Zhai et al., 2023), with learned temperature and bias.

    Every (image, text) pair of the batch is an independent binary problem: label +1 on the diagonal,
    -1 elsewhere. As in the paper's pseudo-code, the summed log-likelihood is divided by the batch size
    (not by the number of pairs).

    Args:
        image_emb: ``[B, D]`` image embeddings.
        text_emb: ``[B, D]`` text embeddings; row ``i`` is the caption of image ``i``.
        logit_scale: scalar tensor, the multiplier ``exp(t')``.
        logit_bias: scalar tensor ``b`` added to every logit.
        positives: optional ``[B, B]`` bool mask of pairs labelled +1 (default: the diagonal).

    Returns:
        Scalar loss ``-sum_ij log sigmoid(z_ij * (scale * cos_ij + b)) / B``.
    """
    _check_pairs(image_emb, text_emb)
    logits = logit_scale * _cosine_similarities(image_emb, text_emb) + logit_bias  # [B, B]
    mask = _positive_mask(positives, logits.shape[0], logits.device)
    labels = 2 * mask.to(logits.dtype) - 1  # +1 on matching pairs, -1 elsewhere
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def triplet_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, margin: float = 0.2, positives: torch.Tensor | None = None
) -> torch.Tensor:
    """Hinge triplet loss with the hardest in-batch negative, in both directions (VSE++, Faghri et al., 2018).

    For each image the hardest negative is the most similar *other* caption; for each caption the most
    similar other image. Similarities are cosines, so ``margin`` is on the cosine scale.

    Args:
        image_emb: ``[B, D]`` image embeddings, ``B >= 2``.
        text_emb: ``[B, D]`` text embeddings; row ``i`` is the caption of image ``i``.
        margin: required gap between the positive and the hardest negative similarity.
        positives: optional ``[B, B]`` bool mask of matching pairs, never used as negatives (default: diagonal).

    Returns:
        Scalar loss: ``mean_i relu(m - s_ii + max_{j!=i} s_ij) + mean_j relu(m - s_jj + max_{i!=j} s_ij)``.
    """
    _check_pairs(image_emb, text_emb, min_batch=2)
    sims = _cosine_similarities(image_emb, text_emb)  # [B, B]
    matched = sims.diagonal()  # [B]
    # The positive itself must never be picked as the "hardest negative": push it below any cosine.
    off_diagonal = sims.masked_fill(_positive_mask(positives, sims.shape[0], sims.device), -torch.inf)
    # A row whose every entry is a positive has no negative: its hinge is 0 (clamp -inf to a cosine of -1 - margin).
    hardest_text_per_image = off_diagonal.max(dim=1).values.clamp(min=-1.0 - margin)  # [B]
    hardest_image_per_text = off_diagonal.max(dim=0).values.clamp(min=-1.0 - margin)  # [B]
    image_to_text = F.relu(margin - matched + hardest_text_per_image)
    text_to_image = F.relu(margin - matched + hardest_image_per_text)
    return image_to_text.mean() + text_to_image.mean()


@torch.no_grad()
def contrastive_accuracy(
    image_emb: torch.Tensor, text_emb: torch.Tensor, positives: torch.Tensor | None = None
) -> dict[str, float]:
    """In-batch retrieval accuracy: how often the most similar caption/image is a matching one.

    Args:
        image_emb: ``[B, D]`` image embeddings.
        text_emb: ``[B, D]`` text embeddings.
        positives: optional ``[B, B]`` bool mask of matching pairs (default: the diagonal).

    Returns:
        ``{"acc_i2t": float, "acc_t2i": float}`` in ``[0, 1]``.
    """
    sims = _cosine_similarities(image_emb.float(), text_emb.float())  # [B, B]
    mask = _positive_mask(positives, sims.shape[0], sims.device)
    rows = torch.arange(sims.shape[0], device=sims.device)
    return {
        "acc_i2t": mask[rows, sims.argmax(dim=1)].float().mean().item(),
        "acc_t2i": mask[sims.argmax(dim=0), rows].float().mean().item(),
    }


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss (Rafailov et al., 2023), as TRL's ``loss_type="sigmoid"``.

    Args:
        pi_chosen: ``[B]`` summed log-probabilities of the chosen answers under the policy.
        pi_rejected: ``[B]`` summed log-probabilities of the rejected answers under the policy.
        ref_chosen: ``[B]`` the same under the reference model (no gradient needed).
        ref_rejected: ``[B]`` the same under the reference model.
        beta: strength of the implicit KL penalty.

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: the scalar mean of
        ``-log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))``, and the detached ``[B]`` implicit rewards
        ``beta * (pi_c - ref_c)`` and ``beta * (pi_r - ref_r)`` (for reward margin / accuracy logging).
    """
    shapes = {t.shape for t in (pi_chosen, pi_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or pi_chosen.ndim != 1:
        raise ValueError(f"dpo_loss expects four [B] tensors of equal shape, got {sorted(tuple(s) for s in shapes)}")
    logits = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)  # [B]
    loss = -F.logsigmoid(beta * logits).mean()
    chosen_rewards = beta * (pi_chosen - ref_chosen).detach()
    rejected_rewards = beta * (pi_rejected - ref_rejected).detach()
    return loss, chosen_rewards, rejected_rewards
