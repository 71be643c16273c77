"""Caption metrics: BLEU-4 and CIDEr (pycocoevalcap) of generated captions against references."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from vlm_chat.eval.common import caption_tokenize, generate_grouped, sample_field

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Captions



def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Corpus BLEU-1..4 and CIDEr-D of candidate captions against references, with pycocoevalcap's scorers.

    Args:
        candidates: One generated caption per image.
        references: One or more reference captions per image.

    Returns:
        ``{"bleu4", "cider", "bleu": [BLEU-1, ..., BLEU-4], "cider_per_image": [...], "n"}``. CIDEr's document
        frequencies come from the references of all images, so score a whole set at once (with one image every
        n-gram occurs in every document and CIDEr is 0).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidates for {len(references)} reference lists")
    if not candidates:
        raise ValueError("caption_scores needs at least one caption")
    gts, res = {}, {}
    for i, (cand, refs) in enumerate(zip(candidates, references)):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}] must be a non-empty list of captions, got {refs!r}")
        gts[i] = [caption_tokenize(r) for r in refs]
        res[i] = [caption_tokenize(cand)]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, per_image = Cider().compute_score(gts, res)
    return {
        "bleu4": float(bleu[3]),
        "cider": float(cider),
        "bleu": [float(b) for b in bleu],
        "cider_per_image": [float(c) for c in per_image],
        "n": len(candidates),
    }


def evaluate_captions(
    chat: Any,
    items: Sequence[Any],
    detailed: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    prompt: str | None = None,
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Caption each image and score the captions with :func:`caption_scores`.

    Args:
        chat: A ``VLMChat``.
        items: ``(image, references)`` pairs or mappings with ``image`` and ``references``
            (e.g. :func:`vlm_chat.datasets.shapes.reference_captions` of each scene).
        detailed: Ask for detailed captions (the prompt ``VLMChat.caption`` uses for ``detailed=True``).
        batch_size: Images per ``generate_batch`` call.
        max_new_tokens: Caption length limit.
        prompt: The caption request; default: the one ``VLMChat.caption`` sends.
        progress: Show a progress bar.
        **generate_kwargs: More generation keywords.

    Returns:
        :func:`caption_scores`'s dict plus ``"captions"`` (the generated captions, in input order).
    """
    if prompt is None:
        from vlm_chat.chat import CAPTION_PROMPTS

        prompt = CAPTION_PROMPTS[bool(detailed)]
    images, references = [], []
    for i, item in enumerate(items):
        if isinstance(item, Mapping) or hasattr(item, "references"):
            images.append(sample_field(item, "image", i))
            references.append(list(sample_field(item, "references", i)))
        else:
            image, refs = item
            images.append(image)
            references.append(list(refs))
    captions = generate_grouped(
        chat,
        images,
        [prompt] * len(images),
        batch_size,
        "captions",
        progress,
        max_new_tokens=max_new_tokens,
        **generate_kwargs,
    )
    scores = caption_scores(captions, references)
    scores["captions"] = captions
    logger.info("captions: BLEU-4 %.4f CIDEr %.4f on %d images", scores["bleu4"], scores["cider"], scores["n"])
    return scores
