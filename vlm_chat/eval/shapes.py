"""Shapes-world evaluation: accuracy per question type on held-out scenes, and the objects detailed captions name.

Questions are every :func:`vlm_chat.datasets.shapes.qa_pairs` question of each scene (count, count_attribute, color,
shape, size, exists, position, relation), judged as VQA answers are (:func:`vlm_chat.eval.vqa.vqa_scores`): the first
word or phrase of the shapes world's answer vocabulary (:data:`ANSWER_VOCABULARY`) in the normalized reply must be the
answer. So "Red." and "The shape is red." are right for "red", "It is not red, it is blue." is wrong, and "two" counts
as "2".

Detailed captions are parsed for the objects they name (:func:`caption_objects`: a colour and a shape, with a count)
and compared with the objects present (:func:`object_recall_precision`).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from vlm_chat.datasets.scenes import COLORS as _COLORS
from vlm_chat.datasets.scenes import POSITIONS, SIZES
from vlm_chat.datasets.scenes import SHAPES as _SHAPES
from vlm_chat.eval.common import generate_grouped, normalize_answer
from vlm_chat.eval.vqa import vqa_scores

logger = logging.getLogger(__name__)

#: Every answer a shapes-world question has: colours, shapes, sizes, quadrants, counts 0-4, yes/no.
ANSWER_VOCABULARY: tuple[str, ...] = (*_COLORS, *_SHAPES, *SIZES, *POSITIONS, "0", "1", "2", "3", "4", "yes", "no")
_COUNTS = {"a": 1, "an": 1, "one": 1, "the": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
_COLOR_ALIASES = {"grey": "gray"}
_WORD = re.compile(r"[a-z0-9]+")


# --------------------------------------------------------------------------------------------------------------------
# Caption objects (pure)


def caption_objects(text: str) -> Counter[str]:
    """The objects a caption names: ``"colour shape"`` -> how many.

    A mention is a colour word followed by a shape word, with at most one size word before or between them ("a large
    red circle", "red large circle"). Its count is the number word before it ("two red circles": 2; digits too);
    with none, a singular counts 1 and a plural 2 (the fewest a plural names). An object mentioned again ("... The red
    circle is above the blue triangle.") is not counted twice: each name keeps the largest count any of its mentions
    gives. Shape-only or colour-only mentions ("three shapes", "a red shape") name no object.

    Args:
        text: The caption.

    Returns:
        A ``Counter`` such as ``{"red circle": 2, "blue triangle": 1}``.
    """
    words = [_COLOR_ALIASES.get(w, w) for w in _WORD.findall(text.lower())]
    named: Counter[str] = Counter()
    for i, word in enumerate(words):
        if word not in _COLORS:
            continue
        j = i + 1
        if j < len(words) and words[j] in SIZES:
            j += 1
        if j >= len(words):
            continue
        shape, plural = words[j], False
        if shape.endswith("s") and shape[:-1] in _SHAPES:
            shape, plural = shape[:-1], True
        if shape not in _SHAPES:
            continue
        k = i - 1
        if k >= 0 and words[k] in SIZES:
            k -= 1
        before = words[k] if k >= 0 else ""
        if before.isdigit():
            count = int(before)
        elif before in _COUNTS and not (plural and _COUNTS[before] == 1):
            count = _COUNTS[before]
        else:
            count = 2 if plural else 1
        name = f"{word} {shape}"
        named[name] = max(named[name], count)
    return named


def object_recall_precision(
    named: Sequence[Mapping[str, int]], present: Sequence[Mapping[str, int]]
) -> dict[str, Any]:
    """How many present objects captions name (recall) and how many named objects are present (precision).

    Per image, ``min(named, present)`` of each object name are matched; the totals are summed over images (micro
    average), so an image with more objects weighs more.

    Args:
        named: Per image, object name -> count named (e.g. :func:`caption_objects`).
        present: Per image, object name -> count present.

    Returns:
        ``{"recall", "precision", "f1", "matched", "named", "present", "n"}`` (recall or precision 0.0 when nothing is
        present or named at all).
    """
    if len(named) != len(present):
        raise ValueError(f"got {len(named)} named-object counts for {len(present)} images")
    matched = sum(min(n.get(name, 0), count) for n, p in zip(named, present) for name, count in p.items())
    total_named = sum(sum(n.values()) for n in named)
    total_present = sum(sum(p.values()) for p in present)
    recall = matched / total_present if total_present else 0.0
    precision = matched / total_named if total_named else 0.0
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    return {"recall": recall, "precision": precision, "f1": f1, "matched": matched, "named": total_named,
            "present": total_present, "n": len(named)}


# --------------------------------------------------------------------------------------------------------------------
# Running a model


def evaluate_shapes(
    chat: Any,
    scenes: Sequence[Any],
    batch_size: int = 64,
    max_new_tokens: int = 8,
    captions: bool = True,
    caption_max_new_tokens: int = 128,
    limit: int | None = None,
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Ask every :func:`~vlm_chat.datasets.shapes.qa_pairs` question of each scene and caption each scene in detail.

    Args:
        chat: A ``VLMChat`` (anything with ``generate_batch(images, prompts, **kw)``).
        scenes: :class:`~vlm_chat.datasets.shapes.Scene` objects (e.g. ``generate_scenes(150, seed=TEST_SEED)``).
        batch_size: Most questions (or captions) per batch.
        max_new_tokens: Answer length; answers are one or two words.
        captions: Also caption each scene (``VLMChat.caption(image, detailed=True)``'s prompt) and score the objects
            named.
        caption_max_new_tokens: Caption length limit (the training captions of a 4-object scene are ~90 tokens).
        limit: Ask only the first ``limit`` questions (in scene order); captions still cover every scene.
        progress: Show progress bars.
        **generate_kwargs: More generation keywords (greedy by default).

    Returns:
        :func:`~vlm_chat.eval.vqa.vqa_scores`'s ``accuracy``, ``n``, ``correct``, ``unanswered`` and ``by_type``
        (question type -> ``{"accuracy", "n"}``), ``n_scenes``, ``"predictions"`` (per question: ``scene``,
        ``question``, ``answer``, ``qtype``, ``response``, ``prediction``, ``correct``), and with ``captions``:
        ``"caption_objects"`` (:func:`object_recall_precision`'s dict) and ``"captions"`` (per scene: ``caption``,
        ``named``, ``present``).
    """
    from vlm_chat.datasets import shapes

    images = [scene.render() for scene in scenes]
    rows = [(i, qa) for i, scene in enumerate(scenes) for qa in shapes.qa_pairs(scene)][:limit]
    if not rows:
        raise ValueError("evaluate_shapes needs at least one scene with questions")
    responses = generate_grouped(chat, [images[i] for i, _ in rows], [qa.question for _, qa in rows], batch_size,
                                 "shapes QA", progress, max_new_tokens=max_new_tokens, **generate_kwargs)
    answers, types = [qa.answer for _, qa in rows], [qa.qtype for _, qa in rows]
    result = vqa_scores(responses, answers, types, ANSWER_VOCABULARY)
    extracted = result.pop("extracted")
    result["n_scenes"] = len(scenes)
    result["predictions"] = [
        {"scene": i, "question": qa.question, "answer": qa.answer, "qtype": qa.qtype, "response": r,
         "prediction": e, "correct": e == normalize_answer(qa.answer)}
        for (i, qa), r, e in zip(rows, responses, extracted)
    ]
    logger.info("shapes QA accuracy %.4f on %d questions: %s", result["accuracy"], result["n"],
                ", ".join(f"{t} {v['accuracy']:.3f}" for t, v in result["by_type"].items()))
    if captions:
        from vlm_chat.chat import CAPTION_PROMPTS

        texts = generate_grouped(chat, images, [CAPTION_PROMPTS[True]] * len(images), batch_size, "captions",
                                 progress, max_new_tokens=caption_max_new_tokens, **generate_kwargs)
        named = [caption_objects(t) for t in texts]
        present = [Counter(o.name for o in scene.objects) for scene in scenes]
        result["caption_objects"] = object_recall_precision(named, present)
        result["captions"] = [{"caption": t, "named": dict(n), "present": dict(p)}
                              for t, n, p in zip(texts, named, present)]
        logger.info("detailed captions: object recall %.4f, precision %.4f", result["caption_objects"]["recall"],
                    result["caption_objects"]["precision"])
    return result


def shapes_results(
    chat: Any, scenes: int = 150, seed: int | None = None, image_size: int = 64, captions: bool = True,
    progress: bool = False, **kwargs: Any,
) -> dict[str, float]:
    """:func:`evaluate_shapes` on generated scenes, flattened into a results table's ``key -> number`` rows.

    Args:
        chat: The model.
        scenes: Number of scenes (150 give ~2,400 questions).
        seed: Shapes-world seed; default :data:`~vlm_chat.datasets.shapes.TEST_SEED` (final reports). Choose models on
            :data:`~vlm_chat.datasets.shapes.VALIDATION_SEED`.
        image_size: Side of the rendered scenes (the model's training size).
        captions: Also score detailed captions.
        progress: Show progress bars.
        **kwargs: More :func:`evaluate_shapes` keywords (``batch_size``, ``limit``, ...).

    Returns:
        ``{"shapes_accuracy", "shapes_n", "shapes_<type>" (accuracy per question type), "shapes_caption_recall",
        "shapes_caption_precision"}`` (the last two only with ``captions``).
    """
    from vlm_chat.datasets import shapes

    seed = shapes.TEST_SEED if seed is None else seed
    r = evaluate_shapes(chat, shapes.generate_scenes(scenes, seed=seed, image_size=image_size), captions=captions,
                        progress=progress, **kwargs)
    out = {"shapes_accuracy": r["accuracy"], "shapes_n": r["n"]}
    out.update({f"shapes_{t}": v["accuracy"] for t, v in r["by_type"].items()})
    if captions:
        out["shapes_caption_recall"] = r["caption_objects"]["recall"]
        out["shapes_caption_precision"] = r["caption_objects"]["precision"]
    return out
