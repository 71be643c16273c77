"""POPE: yes/no existence questions about objects present and absent; precision, recall, F1 and yes-ratio."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from vlm_chat.eval.common import extract_answer, generate_grouped, sample_field

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# POPE


def parse_yes_no(response: str) -> str | None:
    """``"yes"`` or ``"no"``: whichever of the two words comes first in the normalized response; ``None`` if neither."""
    return extract_answer(response, ("yes", "no"))


def pope_metrics(responses: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE's metrics with "yes" (the object is there) as the positive class.

    A response with neither "yes" nor "no" counts as "no" (it does not claim the object) and is counted in
    ``unparsed``.

    Args:
        responses: Model outputs.
        labels: ``"yes"`` / ``"no"`` ground truth per response.

    Returns:
        ``{"accuracy", "precision", "recall", "f1", "yes_ratio", "n", "unparsed"}``; precision (recall) is 0 when
        nothing is predicted (labelled) yes.
    """
    if len(responses) != len(labels):
        raise ValueError(f"got {len(responses)} responses for {len(labels)} labels")
    bad = sorted({lab for lab in labels if lab not in ("yes", "no")})
    if bad:
        raise ValueError(f"labels must be 'yes' or 'no', got {bad}")
    parsed = [parse_yes_no(r) for r in responses]
    pred = [p == "yes" for p in parsed]
    gold = [lab == "yes" for lab in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "n": n,
        "unparsed": sum(p is None for p in parsed),
    }


def evaluate_pope(
    chat: Any,
    samples: Sequence[Any],
    batch_size: int = 64,
    max_new_tokens: int = 4,
    prompt_template: str = "{question}",
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Ask every POPE question and score it with :func:`pope_metrics`, overall and per category.

    Args:
        chat: A ``VLMChat``.
        samples: Mappings or objects with ``image``, ``question``, ``label`` (``"yes"``/``"no"``) and optionally
            ``category`` (``random``/``popular``/``adversarial``), e.g. the rows of a shapes-world ``pope.jsonl``.
        batch_size: Most questions per batch (whole images where they fit: see ``generate_grouped``).
        max_new_tokens: Generation length.
        prompt_template: Turns a question into the prompt.
        progress: Show a progress bar.
        **generate_kwargs: More generation keywords.

    Returns:
        ``{"overall": metrics, "by_category": {category: metrics}, "predictions": [{"question", "label",
        "category", "response"}]}``.
    """
    images = [sample_field(s, "image", i) for i, s in enumerate(samples)]
    questions = [sample_field(s, "question", i) for i, s in enumerate(samples)]
    labels = [sample_field(s, "label", i) for i, s in enumerate(samples)]
    categories = [sample_field(s, "category", i, required=False) or "all" for i, s in enumerate(samples)]
    prompts = [prompt_template.format(question=q) for q in questions]
    responses = generate_grouped(
        chat, images, prompts, batch_size, "POPE", progress, max_new_tokens=max_new_tokens, **generate_kwargs
    )
    by_category = {}
    for category in sorted(set(categories)):
        idx = [i for i, c in enumerate(categories) if c == category]
        by_category[category] = pope_metrics([responses[i] for i in idx], [labels[i] for i in idx])
    overall = pope_metrics(responses, labels)
    logger.info("POPE F1 %.4f accuracy %.4f yes-ratio %.3f", overall["f1"], overall["accuracy"], overall["yes_ratio"])
    return {
        "overall": overall,
        "by_category": by_category,
        "predictions": [
            {"question": q, "label": lab, "category": c, "response": r}
            for q, lab, c, r in zip(questions, labels, categories, responses)
        ],
    }
