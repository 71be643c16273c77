"""VQA accuracy: the first vocabulary answer in a reply, compared with the reference, per answer type."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from vlm_chat.eval.common import extract_answer, generate_grouped, infer_answer_type, normalize_answer, sample_field

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# VQA accuracy


def vqa_scores(
    responses: Sequence[str],
    answers: Sequence[str],
    answer_types: Sequence[str] | None = None,
    vocabulary: Iterable[str] | None = None,
) -> dict[str, Any]:
    """VQA accuracy judged by the first answer-vocabulary word of each normalized response.

    Args:
        responses: Model outputs.
        answers: Ground-truth answers (one per response).
        answer_types: Type per sample for the breakdown; default: :func:`infer_answer_type`.
        vocabulary: The answer vocabulary; default: the set of ``answers``.

    Returns:
        ``{"accuracy", "n", "correct", "unanswered" (responses with no vocabulary word), "by_type": {type:
        {"accuracy", "n"}}, "extracted": [the judged answer or None per sample]}``.
    """
    if len(responses) != len(answers):
        raise ValueError(f"got {len(responses)} responses for {len(answers)} answers")
    if answer_types is not None and len(answer_types) != len(answers):
        raise ValueError(f"got {len(answer_types)} answer types for {len(answers)} answers")
    vocab = list(vocabulary) if vocabulary is not None else sorted(set(answers))
    types = list(answer_types) if answer_types is not None else [infer_answer_type(a) for a in answers]
    extracted = [extract_answer(r, vocab) for r in responses]
    hits = [e is not None and e == normalize_answer(a) for e, a in zip(extracted, answers)]
    by_type: dict[str, list[bool]] = defaultdict(list)
    for t, h in zip(types, hits):
        by_type[t].append(h)
    n = len(hits)
    return {
        "accuracy": sum(hits) / n if n else 0.0,
        "n": n,
        "correct": sum(hits),
        "unanswered": sum(e is None for e in extracted),
        "by_type": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(by_type.items())},
        "extracted": extracted,
    }


def evaluate_vqa(
    chat: Any,
    samples: Sequence[Any],
    batch_size: int = 64,
    max_new_tokens: int = 8,
    vocabulary: Iterable[str] | None = None,
    prompt_template: str = "{question}",
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Ask a model every question and score it with :func:`vqa_scores`.

    Args:
        chat: A ``VLMChat`` (anything with ``generate_batch(images, prompts, **kw) -> list[str]``).
        samples: Mappings or objects with ``image`` (path or PIL image), ``question``, ``answer`` and optionally
            ``answer_type`` (e.g. :func:`vlm_chat.datasets.easyvqa.quick_eval_subset`).
        batch_size: Most questions per batch (whole images where they fit: see ``generate_grouped``).
        max_new_tokens: Generation length; answers are one or two words.
        vocabulary: Answer vocabulary; default: the set of the samples' answers (for easy-VQA, the 13 answers).
        prompt_template: Turns a question into the prompt (``"{question}"``: as is).
        progress: Show a progress bar.
        **generate_kwargs: More generation keywords (default decoding is greedy).

    Returns:
        :func:`vqa_scores`'s dict without ``extracted``, plus ``"predictions"``: per sample, in input order,
        ``{"image", "question", "answer", "answer_type", "response", "prediction", "correct"}``.
    """
    images = [sample_field(s, "image", i) for i, s in enumerate(samples)]
    questions = [sample_field(s, "question", i) for i, s in enumerate(samples)]
    answers = [sample_field(s, "answer", i) for i, s in enumerate(samples)]
    types = [sample_field(s, "answer_type", i, required=False) for i, s in enumerate(samples)]
    types = [t if t is not None else infer_answer_type(a) for t, a in zip(types, answers)]
    prompts = [prompt_template.format(question=q) for q in questions]
    responses = generate_grouped(
        chat, images, prompts, batch_size, "VQA", progress, max_new_tokens=max_new_tokens, **generate_kwargs
    )
    scores = vqa_scores(responses, answers, types, vocabulary)
    extracted = scores.pop("extracted")
    scores["predictions"] = [
        {
            "image": img if isinstance(img, (str, os.PathLike)) else None,
            "question": q,
            "answer": a,
            "answer_type": t,
            "response": r,
            "prediction": e,
            "correct": e is not None and e == normalize_answer(a),
        }
        for img, q, a, t, r, e in zip(images, questions, answers, types, responses, extracted)
    ]
    logger.info(
        "VQA accuracy %.4f on %d questions (%d unanswered)", scores["accuracy"], scores["n"], scores["unanswered"]
    )
    return scores
