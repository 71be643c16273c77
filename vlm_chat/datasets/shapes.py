"""A deterministic "shapes world": 1-4 coloured shapes per image, with captions, QA, preference pairs and POPE questions.

It extends easy-VQA (one shape per 64x64 image) to scenes that need counting, attribute binding and spatial relations,
with the same palette, the same three shapes and the same kind of tinted background, so a model trained on both sees
one visual vocabulary.

Layout: the image is split into four quadrants and each object sits, with random jitter, inside its own quadrant.
So objects never overlap, every object has one unambiguous position ("top left", ...), and relations between two
objects follow from their quadrants (same row: left/right; same column: above/below; diagonal: both).
No two objects share both colour and shape, so "the red circle" always names exactly one object.

Everything is a pure function of ``(seed, index)``: scene ``i`` of seed ``s`` is the same whatever the number of
scenes asked for, and the rendered PNG bytes are the same on every run.

On-disk formats (DESIGN.md "Data formats"), written by :func:`write_records` for any source (easy-VQA uses it too);
all image paths are relative to the output directory, which is also the image folder:

- ``images/<id>.png``
- ``conversations.json``: LLaVA ``[{"id", "image", "conversations": [{"from": "human", "value": "<image>\\nQ"},
  {"from": "gpt", "value": "A"}, ...]}]``
- ``captions.jsonl``: ``{"image", "caption"}``
- ``preferences.jsonl``: ``{"image", "prompt", "chosen", "rejected"}``
- ``pope.jsonl``: ``{"image", "question", "label", "category", "object"}``
- ``vqa.jsonl``: ``{"image", "question", "answer", "answer_type"}`` (single-answer questions, for evaluation)
- ``manifest.json``: which files were written and how many rows each holds.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

#: easy-VQA's colour names and the exact RGB values its images use (measured from the installed package's PNGs).
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "yellow": (255, 255, 0),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)
#: easy-VQA's shape names.
SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
#: Quadrant names in reading order; also the answers to "Where is the ...?".
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
#: easy-VQA backgrounds are a random light tint: each channel uniform in [230, 255].
BACKGROUND_RANGE = (230, 255)
#: Side of a shape as a fraction of the image side. A quadrant is 0.5, so a large shape still fits with a margin.
SIZE_RANGE = {"small": (0.16, 0.24), "large": (0.34, 0.44)}

NUMBER_WORDS = ("zero", "one", "two", "three", "four")

#: Prompts of the caption turns. The first of each is what ``VLMChat.caption`` sends (a test keeps them in step), so
#: the model is asked at inference what it was taught; the others add variety.
SHORT_CAPTION_PROMPTS = (
    "Describe the image in one short sentence.",
    "Write a short caption for this image.",
    "Describe the image briefly.",
)
DETAILED_CAPTION_PROMPTS = ("Describe the image in detail.", "Give a detailed description of the image.")


@dataclass(frozen=True)
class ShapeObject:
    """One shape in a scene.

    Attributes:
        color: One of :data:`COLORS`.
        shape: One of :data:`SHAPES`.
        size: ``"small"`` or ``"large"``.
        bbox: ``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1`` exclusive.
        position: The quadrant, one of :data:`POSITIONS`.
    """

    color: str
    shape: str
    size: str
    bbox: tuple[int, int, int, int]
    position: str

    @property
    def name(self) -> str:
        """``"red circle"``: colour and shape, unique within a scene."""
        return f"{self.color} {self.shape}"

    @property
    def row(self) -> int:
        return 0 if self.position.startswith("top") else 1

    @property
    def col(self) -> int:
        return 0 if self.position.endswith("left") else 1


@dataclass(frozen=True)
class Scene:
    """A shapes-world image description; :meth:`render` draws it.

    Attributes:
        objects: The shapes, in reading order of their quadrants.
        image_size: Side of the square image in pixels.
        background: RGB of the background tint.
        seed: The generator seed and index this scene came from (for provenance only).
    """

    objects: tuple[ShapeObject, ...]
    image_size: int = 64
    background: tuple[int, int, int] = (255, 255, 255)
    seed: tuple[int, int] = (0, 0)

    def render(self, supersample: int = 4) -> Image.Image:
        """Draw the scene as an RGB image.

        Args:
            supersample: Draw at this many times the size, then downsample: anti-aliased edges like easy-VQA's.

        Returns:
            A ``image_size`` x ``image_size`` RGB ``PIL.Image``.
        """
        s = supersample
        big = Image.new("RGB", (self.image_size * s, self.image_size * s), self.background)
        draw = ImageDraw.Draw(big)
        for obj in self.objects:
            x0, y0, x1, y1 = (v * s for v in obj.bbox)
            fill = COLOR_RGB[obj.color]
            if obj.shape == "circle":
                draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
            elif obj.shape == "rectangle":
                draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
            else:  # upward triangle filling its box, as easy-VQA draws them
                draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
        return big.resize((self.image_size, self.image_size), Image.Resampling.BOX) if s > 1 else big

    def count(self, color: str | None = None, shape: str | None = None) -> int:
        """Number of objects matching the given colour and/or shape (all objects if neither is given)."""
        return sum((color is None or o.color == color) and (shape is None or o.shape == shape) for o in self.objects)

    def has(self, color: str, shape: str) -> bool:
        """Whether a ``color`` ``shape`` is in the scene."""
        return self.count(color, shape) > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (objects with colour, shape, size, bbox, position)."""
        return {
            "image_size": self.image_size,
            "background": list(self.background),
            "seed": list(self.seed),
            "objects": [
                {"color": o.color, "shape": o.shape, "size": o.size, "bbox": list(o.bbox), "position": o.position}
                for o in self.objects
            ],
        }


# --------------------------------------------------------------------------------------------------------------------
# Scene generation


def _scene_rng(seed: int, index: int, purpose: str = "scene") -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so they are stable across runs and platforms (unlike hash()).
    return random.Random(f"shapes-world/{purpose}/{seed}/{index}")


def generate_scene(
    seed: int = 0, index: int = 0, image_size: int = 64, min_objects: int = 1, max_objects: int = 4
) -> Scene:
    """Generate scene ``index`` of the world with ``seed``.

    Args:
        seed: World seed.
        index: Scene number; scenes of one seed are independent of each other.
        image_size: Side of the square image in pixels (>= 16).
        min_objects: Fewest objects (>= 1).
        max_objects: Most objects (<= 4, one per quadrant).

    Returns:
        The :class:`Scene`.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    if not 1 <= min_objects <= max_objects <= len(POSITIONS):
        raise ValueError(
            f"need 1 <= min_objects <= max_objects <= 4, got min_objects={min_objects}, max_objects={max_objects}"
        )
    rng = _scene_rng(seed, index)
    n = rng.randint(min_objects, max_objects)
    background = tuple(rng.randint(*BACKGROUND_RANGE) for _ in range(3))
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)  # distinct (colour, shape): unique names
    quadrants = sorted(rng.sample(range(len(POSITIONS)), n))  # reading order
    half = image_size // 2
    objects = []
    for (color, shape), q in zip(kinds, quadrants):
        size = rng.choice(SIZES)
        lo, hi = SIZE_RANGE[size]
        side = max(3, round(rng.uniform(lo, hi) * image_size))
        width = height = side
        if shape == "rectangle":  # easy-VQA rectangles have random aspect ratios; keep the area close to side^2
            aspect = rng.uniform(0.6, 1.6)
            width = min(half - 2, max(3, round(side * aspect**0.5)))
            height = min(half - 2, max(3, round(side / aspect**0.5)))
        qx, qy = (q % 2) * half, (q // 2) * half
        x0 = qx + rng.randint(1, max(1, half - width - 1))
        y0 = qy + rng.randint(1, max(1, half - height - 1))
        objects.append(ShapeObject(color, shape, size, (x0, y0, x0 + width, y0 + height), POSITIONS[q]))
    return Scene(tuple(objects), image_size, background, (seed, index))


def generate_scenes(n: int, seed: int = 0, start: int = 0, **kwargs: Any) -> list[Scene]:
    """Scenes ``start .. start + n - 1`` of the world with ``seed`` (keyword arguments go to :func:`generate_scene`)."""
    return [generate_scene(seed, i, **kwargs) for i in range(start, start + n)]


# --------------------------------------------------------------------------------------------------------------------
# Language: referring expressions, captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _unique_ref(obj: ShapeObject, scene: Scene, forms: Sequence[str]) -> str | None:
    """The first of ``forms`` (format strings over color/shape/size) that names ``obj`` and no other object."""
    for form in forms:
        ref = form.format(color=obj.color, shape=obj.shape, size=obj.size)
        matches = [o for o in scene.objects if form.format(color=o.color, shape=o.shape, size=o.size) == ref]
        if len(matches) == 1:
            return ref
    return None


def referring_expression(obj: ShapeObject, scene: Scene) -> str:
    """Shortest description that names ``obj`` alone: ``"circle"``, ``"large circle"`` or ``"red circle"``."""
    ref = _unique_ref(obj, scene, ("{shape}", "{size} {shape}", "{color} {shape}"))
    assert ref is not None  # colour + shape is unique by construction
    return ref


def object_phrase(obj: ShapeObject) -> str:
    """``"a large red circle"``."""
    return _article(f"{obj.size} {obj.color} {obj.shape}")


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where ``a`` is relative to ``b``: ``"to the left of"``, ``"above"``, ``"above and to the right of"``, ..."""
    vertical = {-1: "above", 0: "", 1: "below"}[(a.row > b.row) - (a.row < b.row)]
    horizontal = {-1: "to the left of", 0: "", 1: "to the right of"}[(a.col > b.col) - (a.col < b.col)]
    if not vertical and not horizontal:
        raise ValueError(f"{a.name} and {b.name} share a quadrant")
    if vertical and horizontal:
        return f"{vertical} and {horizontal}"
    return vertical or horizontal


def short_caption(scene: Scene) -> str:
    """``"A large red circle and a small blue triangle."`` (objects in reading order)."""
    return _cap(_join([object_phrase(o) for o in scene.objects])) + "."


def detailed_caption(scene: Scene) -> str:
    """Count, every object with size, colour and quadrant, and the relation of the first object to each other one."""
    n = len(scene.objects)
    parts = [f"The image shows {NUMBER_WORDS[n]} shape{'s' if n > 1 else ''} on a light background."]
    for o in scene.objects:
        parts.append(f"{_cap(object_phrase(o))} is in the {o.position}.")
    first = scene.objects[0]
    for other in scene.objects[1:]:
        parts.append(f"The {first.name} is {relation(first, other)} the {other.name}.")
    return " ".join(parts)


def reference_captions(scene: Scene, detailed: bool = False) -> list[str]:
    """Several correct captions of one scene: the references for BLEU/CIDEr.

    Args:
        scene: The scene.
        detailed: References for detailed captions instead of short ones.

    Returns:
        A list of distinct captions; the first is :func:`short_caption` (or :func:`detailed_caption`).
    """
    n = len(scene.objects)
    objs = _join([object_phrase(o) for o in scene.objects])
    if detailed:
        by_position = " ".join(f"In the {o.position} there is {object_phrase(o)}." for o in scene.objects)
        return [
            detailed_caption(scene),
            f"There {'are' if n > 1 else 'is'} {NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}. {by_position}",
            f"A light background with {objs}. "
            + " ".join(f"The {o.name} is in the {o.position}." for o in scene.objects),
        ]
    count = f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}"
    return [short_caption(scene), f"There {'are' if n > 1 else 'is'} {count}: {objs}.", f"An image of {objs}."]


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
# Writing datasets (shared with vlm_chat.datasets.easyvqa)


@dataclass
class ImageRecord:
    """Everything one dataset says about one image, in the shapes of the on-disk formats.

    Attributes:
        image_id: File stem of the image in the image folder (unique within a dataset).
        image: A ``PIL.Image`` to save as PNG, or the path of an existing PNG to copy.
        conversations: Conversations in transformers' chat form (each a list of ``{"role", "content"}``; the first
            user turn starts with ``"<image>\\n"``); one LLaVA row each.
        captions: Captions; one caption row each.
        preferences: ``{"prompt", "chosen", "rejected"}`` dicts (other keys are not written).
        pope: ``{"question", "label", "category", "object"}`` dicts.
        vqa: ``{"question", "answer", "answer_type"}`` dicts.
    """

    image_id: str
    image: Image.Image | str | os.PathLike
    conversations: list[list[dict[str, str]]] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    preferences: list[dict[str, str]] = field(default_factory=list)
    pope: list[dict[str, str]] = field(default_factory=list)
    vqa: list[dict[str, str]] = field(default_factory=list)


def messages_to_llava(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """transformers chat messages -> LLaVA ``[{"from": "human"|"gpt", "value"}]`` turns."""
    roles = {"user": "human", "assistant": "gpt"}
    turns = []
    for i, m in enumerate(messages):
        if m.get("role") not in roles:
            raise ValueError(f"messages[{i}]: role must be 'user' or 'assistant', got {m.get('role')!r}")
        turns.append({"from": roles[m["role"]], "value": m["content"]})
    return turns


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_records(
    out_dir: str | os.PathLike, records: Iterable[ImageRecord], image_folder: str = "images"
) -> dict[str, int]:
    """Write images and every non-empty annotation file of ``records`` to ``out_dir``.

    Args:
        out_dir: Output directory (created). It is the image folder of every file written: image paths in the rows
            are relative to it, which is what ``vlm_chat.data`` readers assume by default.
        records: The images and their annotations.
        image_folder: Sub-folder of ``out_dir`` for the PNGs.

    Returns:
        Rows written per file name (``{"images": n, "conversations.json": n, ...}``), also saved as ``manifest.json``.
    """
    out = Path(out_dir)
    (out / image_folder).mkdir(parents=True, exist_ok=True)
    llava, captions, prefs, pope, vqa = [], [], [], [], []
    seen: set[str] = set()
    for rec in records:
        if rec.image_id in seen:
            raise ValueError(f"duplicate image_id {rec.image_id!r}: each record needs its own image file")
        seen.add(rec.image_id)
        rel = f"{image_folder}/{rec.image_id}.png"
        if isinstance(rec.image, Image.Image):
            # compress_level fixed so the bytes do not depend on PIL's default
            rec.image.save(out / rel, format="PNG", compress_level=6)
        else:
            src = Path(rec.image)
            if src.suffix.lower() != ".png":
                raise ValueError(f"record {rec.image_id!r}: image {src} is not a PNG; pass a PIL image to convert it")
            shutil.copyfile(src, out / rel)
        for k, messages in enumerate(rec.conversations):
            row_id = rec.image_id if len(rec.conversations) == 1 else f"{rec.image_id}_{k}"
            llava.append({"id": row_id, "image": rel, "conversations": messages_to_llava(messages)})
        captions += [{"image": rel, "caption": c} for c in rec.captions]
        prefs += [{"image": rel, **{k: p[k] for k in ("prompt", "chosen", "rejected")}} for p in rec.preferences]
        pope += [{"image": rel, **{k: p[k] for k in ("question", "label", "category", "object")}} for p in rec.pope]
        vqa += [{"image": rel, **{k: q[k] for k in ("question", "answer", "answer_type")}} for q in rec.vqa]

    counts = {"images": len(seen)}
    if llava:
        with open(out / "conversations.json", "w", encoding="utf-8") as f:
            json.dump(llava, f, ensure_ascii=False, indent=1)
        counts["conversations.json"] = len(llava)
    for name, rows in (
        ("captions.jsonl", captions),
        ("preferences.jsonl", prefs),
        ("pope.jsonl", pope),
        ("vqa.jsonl", vqa),
    ):
        if rows:
            counts[name] = _write_jsonl(out / name, rows)
    with open(out / "manifest.json", "w", encoding="utf-8") as f:
        json.dump({"image_folder": image_folder, "files": counts}, f, indent=1)
    logger.info("wrote %s to %s", ", ".join(f"{k}={v}" for k, v in counts.items()), out)
    return counts


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
