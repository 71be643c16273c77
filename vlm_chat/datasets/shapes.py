"""The shapes world: 1-4 coloured shapes per image, with captions, QA, preference pairs and POPE questions.

The scenes, their rendering and their captions live in :mod:`vlm_chat.datasets.scenes`; writing datasets in the
on-disk formats (DESIGN.md "Data formats") in :mod:`vlm_chat.datasets.records`. This module adds the questions and
answers, conversations, preference pairs and POPE sets, and re-exports the public names of both, so
``from vlm_chat.datasets.shapes import Scene, write_records, ...`` keeps working.

Seeds (fixed by the project): training recipes generate scenes of :data:`TRAIN_SEED`; every model choice is made on
scenes of :data:`VALIDATION_SEED`; scenes of :data:`TEST_SEED` are read only for final reports
(``vlm-chat eval shapes|pope|captions``).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlm_chat.datasets.records import ImageRecord, messages_to_llava, write_records
from vlm_chat.datasets.scenes import (
    BACKGROUND_RANGE,
    COLOR_RGB,
    COLORS,
    DETAILED_CAPTION_PROMPTS,
    NUMBER_WORDS,
    POSITIONS,
    SHAPES,
    SHORT_CAPTION_PROMPTS,
    SIZE_RANGE,
    SIZES,
    Scene,
    ShapeObject,
    _article,
    _cap,
    _join,
    _scene_rng,
    _unique_ref,
    detailed_caption,
    generate_scene,
    generate_scenes,
    object_phrase,
    reference_captions,
    referring_expression,
    relation,
    short_caption,
)

__all__ = [
    "BACKGROUND_RANGE", "COLORS", "COLOR_RGB", "DETAILED_CAPTION_PROMPTS", "NUMBER_WORDS", "POPE_CATEGORIES",
    "POSITIONS", "QA", "SHAPES", "SHORT_CAPTION_PROMPTS", "SIZES", "SIZE_RANGE", "TEST_SEED", "TRAIN_SEED",
    "VALIDATION_SEED", "ImageRecord", "Scene", "ShapeObject", "detailed_caption", "generate_scene", "generate_scenes",
    "messages_to_llava", "object_phrase", "pope_questions", "preference_pairs", "qa_messages", "qa_pairs",
    "reference_captions", "referring_expression", "relation", "scene_record", "short_caption", "write_records",
    "write_shapes_dataset",
]

#: Scenes that training recipes generate.
TRAIN_SEED = 1
#: Scenes every model choice (steps, checkpoint, mixture, variant) is made on.
VALIDATION_SEED = 2
#: Scenes read only for final reports (``vlm-chat eval shapes|pope|captions`` by default).
TEST_SEED = 1234


# --------------------------------------------------------------------------------------------------------------------
# Questions and answers


@dataclass(frozen=True)
class QA:
    """One question about a scene with its one-phrase answer.

    Attributes:
        question: The question text.
        answer: Lowercase answer: a colour, shape, size, digit, quadrant or ``"yes"``/``"no"``.
        qtype: ``count``, ``count_attribute``, ``color``, ``shape``, ``size``, ``exists``, ``position`` or
            ``relation``.
    """

    question: str
    answer: str
    qtype: str


def _plural(shape: str) -> str:
    return shape + "s"


def qa_pairs(scene: Scene, rng: random.Random | None = None) -> list[QA]:
    """Questions about the scene, one or more of each kind that applies, with their answers.

    Kinds: total count; count of a colour or a shape (may be 0); colour of an object named by shape or size
    (attribute binding); shape of an object named by colour; size; existence of a colour+shape (balanced yes/no,
    negatives often one attribute away from a present object); quadrant; left/right/above/below relations (yes/no).

    Args:
        scene: The scene.
        rng: Picks the sampled questions (absent objects, count targets, relation pairs); default: seeded by the
            scene's own seed, so the result is deterministic.

    Returns:
        The list of :class:`QA`, shuffled by ``rng``.
    """
    rng = rng or _scene_rng(*scene.seed, purpose="qa")
    objs = scene.objects
    out = [QA(rng.choice(("How many shapes are in the image?", "How many shapes are there?")), str(len(objs)), "count")]

    shape = rng.choice(SHAPES)
    out.append(QA(f"How many {_plural(shape)} are there?", str(scene.count(shape=shape)), "count_attribute"))
    color = rng.choice([o.color for o in objs] + [rng.choice(COLORS)])
    out.append(QA(f"How many {color} shapes are there?", str(scene.count(color=color)), "count_attribute"))

    for o in objs:
        ref = _unique_ref(o, scene, ("{shape}", "{size} {shape}"))
        if ref:
            out.append(
                QA(rng.choice((f"What color is the {ref}?", f"What is the color of the {ref}?")), o.color, "color")
            )
        ref = _unique_ref(o, scene, ("{color}", "{size} {color}"))
        if ref:
            out.append(
                QA(rng.choice((f"What shape is the {ref} object?", f"What is the {ref} shape?")), o.shape, "shape")
            )
        ref = _unique_ref(o, scene, ("{shape}", "{color} {shape}"))
        out.append(QA(f"Is the {ref} small or large?", o.size, "size"))
        out.append(QA(f"Where is the {referring_expression(o, scene)}?", o.position, "position"))

    # Existence, balanced: each present object once, and as many absent ones, half of them "near misses".
    for o in rng.sample(objs, min(2, len(objs))):
        out.append(QA(f"Is there {_article(o.name)} in the image?", "yes", "exists"))
    for name in _absent_objects(scene, min(2, len(objs)), "adversarial", rng):
        out.append(QA(f"Is there {_article(name)} in the image?", "no", "exists"))

    if len(objs) > 1:
        a, b = rng.sample(objs, 2)
        ra, rb = referring_expression(a, scene), referring_expression(b, scene)
        truth = relation(a, b)
        direction = rng.choice(["to the left of", "to the right of", "above", "below"])
        answer = "yes" if direction in truth else "no"
        out.append(QA(f"Is the {ra} {direction} the {rb}?", answer, "relation"))
    rng.shuffle(out)
    return out


def _absent_objects(
    scene: Scene, k: int, category: str, rng: random.Random, popularity: Counter | None = None
) -> list[str]:
    """``k`` colour+shape names not in the scene, chosen the POPE way for ``category``."""
    absent = [f"{c} {s}" for c in COLORS for s in SHAPES if not scene.has(c, s)]
    if category == "random":
        return rng.sample(absent, min(k, len(absent)))
    if category == "popular":
        if popularity is None:
            raise ValueError("category 'popular' needs the object counts of the whole set (popularity)")
        # Most frequent in the set first; ties broken by name so the choice does not depend on hashing.
        return sorted(absent, key=lambda name: (-popularity[name], name))[:k]
    if category == "adversarial":
        # POPE's adversarial negatives co-occur with the true objects; in a world without co-occurrence statistics,
        # the hardest absent objects are those one attribute away from a present one (red triangle next to a red
        # circle): a model that binds colour and shape loosely says yes to them.
        def closeness(name: str) -> int:
            c, s = name.split()
            return sum((o.color == c) + (o.shape == s) for o in scene.objects)

        shuffled = rng.sample(absent, len(absent))
        return sorted(shuffled, key=lambda name: -closeness(name))[:k]
    raise ValueError(f"unknown POPE category {category!r}; expected random, popular or adversarial")


def qa_messages(
    scene: Scene,
    rng: random.Random | None = None,
    max_turns: int | None = None,
    caption_turn: bool = True,
) -> list[dict[str, str]]:
    """A multi-turn conversation about the scene in transformers' chat form.

    Args:
        scene: The scene.
        rng: Question sampling and order; default: seeded by the scene's seed.
        max_turns: Keep at most this many question-answer turns (``None``: all of :func:`qa_pairs`).
        caption_turn: Start with a caption request (short or detailed, chosen by ``rng``) answered by the caption.

    Returns:
        ``[{"role": "user", "content": "<image>\\n..."}, {"role": "assistant", "content": ...}, ...]``; the image
        marker starts the first user turn.
    """
    rng = rng or _scene_rng(*scene.seed, purpose="messages")
    turns = [(q.question, q.answer) for q in qa_pairs(scene, rng)]
    if caption_turn:
        if rng.random() < 0.5:
            turns.insert(0, (rng.choice(SHORT_CAPTION_PROMPTS), short_caption(scene)))
        else:
            turns.insert(0, (rng.choice(DETAILED_CAPTION_PROMPTS), detailed_caption(scene)))
    if max_turns is not None:
        turns = turns[:max_turns]
    messages = []
    for i, (q, a) in enumerate(turns):
        messages.append({"role": "user", "content": ("<image>\n" + q) if i == 0 else q})
        messages.append({"role": "assistant", "content": a})
    return messages


# --------------------------------------------------------------------------------------------------------------------
# Preference pairs and POPE


def preference_pairs(scene: Scene, rng: random.Random | None = None) -> list[dict[str, str]]:
    """Preference pairs whose rejected answer is a hallucination or a binding error.

    Kinds (in ``"kind"``): ``caption_absent`` (the caption with one object swapped for an absent one),
    ``caption_attribute`` (one object's colour or shape changed to one no object of that kind has),
    ``exists`` (asked about an absent object: chosen "no", rejected "yes"), ``color`` (the wrong colour for a
    named object), ``count`` (a wrong count) and ``exists_present`` (asked about a present object: chosen "yes",
    rejected "no").

    Args:
        scene: The scene.
        rng: Sampling; default: seeded by the scene's seed.

    Returns:
        ``[{"prompt", "chosen", "rejected", "kind"}, ...]``; the prompt has no image marker.
    """
    rng = rng or _scene_rng(*scene.seed, purpose="preferences")
    objs = list(scene.objects)
    pairs = []
    absent = _absent_objects(scene, 1, "random", rng)[0]
    victim = rng.randrange(len(objs))
    color, shape = absent.split()
    swapped = [object_phrase(o) for o in objs]
    swapped[victim] = _article(f"{objs[victim].size} {color} {shape}")
    pairs.append(
        {
            "prompt": rng.choice(SHORT_CAPTION_PROMPTS),
            "chosen": short_caption(scene),
            "rejected": _cap(_join(swapped)) + ".",
            "kind": "caption_absent",
        }
    )

    # Wrong attribute: change one attribute of one object so that the result names an absent object.
    o = rng.choice(objs)
    if rng.random() < 0.5:
        options = [c for c in COLORS if not scene.has(c, o.shape)]
        wrong = _article(f"{o.size} {rng.choice(options)} {o.shape}")
    else:
        options = [s for s in SHAPES if not scene.has(o.color, s)]
        wrong = _article(f"{o.size} {o.color} {rng.choice(options)}") if options else None
    if wrong is None:  # every shape of this colour is present: change the colour instead
        wrong = _article(f"{o.size} {rng.choice([c for c in COLORS if not scene.has(c, o.shape)])} {o.shape}")
    phrases = [object_phrase(x) if x is not o else wrong for x in objs]
    pairs.append(
        {
            "prompt": rng.choice(SHORT_CAPTION_PROMPTS),
            "chosen": short_caption(scene),
            "rejected": _cap(_join(phrases)) + ".",
            "kind": "caption_attribute",
        }
    )

    name = _absent_objects(scene, 1, "adversarial", rng)[0]
    pairs.append(
        {"prompt": f"Is there {_article(name)} in the image?", "chosen": "no", "rejected": "yes", "kind": "exists"}
    )

    for o in rng.sample(objs, len(objs)):
        ref = _unique_ref(o, scene, ("{shape}", "{size} {shape}"))
        if ref:
            wrong_color = rng.choice([c for c in COLORS if c != o.color])
            pairs.append(
                {"prompt": f"What color is the {ref}?", "chosen": o.color, "rejected": wrong_color, "kind": "color"}
            )
            break

    wrong_count = rng.choice([k for k in range(1, len(POSITIONS) + 1) if k != len(objs)])
    pairs.append(
        {
            "prompt": "How many shapes are in the image?",
            "chosen": str(len(objs)),
            "rejected": str(wrong_count),
            "kind": "count",
        }
    )
    # The other half of existence: a present object denied is as wrong as an absent one affirmed. Without these pairs
    # DPO only ever prefers "no" and learns to deny everything (POPE yes-ratio -> 0).
    present = rng.choice(objs)
    pairs.append(
        {
            "prompt": f"Is there {_article(f'{present.color} {present.shape}')} in the image?",
            "chosen": "yes",
            "rejected": "no",
            "kind": "exists_present",
        }
    )
    return pairs


POPE_CATEGORIES = ("random", "popular", "adversarial")


def pope_questions(
    scenes: Sequence[Scene], per_image: int = 3, seed: int = 0, categories: Sequence[str] = POPE_CATEGORIES
) -> list[dict[str, Any]]:
    """POPE-style yes/no existence questions, balanced per image, for each negative-sampling category.

    As in POPE, each category is its own evaluation set: for every image it asks about up to ``per_image`` present
    objects (label ``"yes"``) and the same number of absent ones (label ``"no"``) chosen by the category:
    ``random`` (uniform over absent colour+shape pairs), ``popular`` (the objects most frequent across
    ``scenes``) or ``adversarial`` (absent objects sharing a colour or a shape with a present one).

    Args:
        scenes: The scenes (the ``popular`` counts come from them).
        per_image: Present objects asked about per image (fewer if the image has fewer).
        seed: Sampling seed.
        categories: Which categories to produce.

    Returns:
        ``[{"scene_index", "question", "label", "category", "object"}, ...]``, grouped by category then scene.
    """
    popularity = Counter(o.name for s in scenes for o in s.objects)
    rows = []
    for category in categories:
        for i, scene in enumerate(scenes):
            rng = random.Random(f"shapes-world/pope/{seed}/{category}/{i}")
            k = min(per_image, len(scene.objects))
            present = [o.name for o in rng.sample(scene.objects, k)]
            absent = _absent_objects(scene, k, category, rng, popularity)
            for name, label in [(p, "yes") for p in present] + [(a, "no") for a in absent]:
                question = f"Is there {_article(name)} in the image?"
                rows.append(
                    {"scene_index": i, "question": question, "label": label, "category": category, "object": name}
                )
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Writing a shapes-world dataset (formats: vlm_chat.datasets.records)


def scene_record(
    scene: Scene, image_id: str, pope: Sequence[dict[str, Any]] = (), max_turns: int | None = None
) -> ImageRecord:
    """The :class:`ImageRecord` of one scene: image, one QA conversation, short + detailed captions, preference
    pairs, the given POPE rows, and its single-answer QA as VQA rows."""
    return ImageRecord(
        image_id=image_id,
        image=scene.render(),
        conversations=[qa_messages(scene, max_turns=max_turns)],
        captions=[short_caption(scene), detailed_caption(scene)],
        preferences=preference_pairs(scene),
        pope=list(pope),
        vqa=[{"question": q.question, "answer": q.answer, "answer_type": q.qtype} for q in qa_pairs(scene)],
    )


def write_shapes_dataset(
    out_dir: str | os.PathLike,
    n_images: int,
    seed: int = 0,
    image_size: int = 64,
    pope_per_image: int = 3,
    max_turns: int | None = None,
) -> dict[str, int]:
    """Generate ``n_images`` scenes and write them with :func:`write_records`.

    Args:
        out_dir: Output directory.
        n_images: Number of scenes.
        seed: World seed (use different seeds for train and evaluation sets).
        image_size: Image side in pixels.
        pope_per_image: Present objects asked about per image in each POPE category (0: no POPE file).
        max_turns: Most QA turns per conversation (``None``: all).

    Returns:
        Rows written per file (see :func:`write_records`).
    """
    scenes = generate_scenes(n_images, seed=seed, image_size=image_size)
    pope = pope_questions(scenes, per_image=pope_per_image, seed=seed) if pope_per_image > 0 else []
    by_scene: dict[int, list[dict]] = {}
    for row in pope:
        by_scene.setdefault(row["scene_index"], []).append(row)
    width = len(str(max(n_images - 1, 0)))
    records = (
        scene_record(s, f"shapes_{seed}_{i:0{width}d}", by_scene.get(i, []), max_turns) for i, s in enumerate(scenes)
    )
    return write_records(out_dir, records)
