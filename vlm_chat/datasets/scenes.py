"""The shapes world's scenes: 1-4 coloured shapes per image, how they are drawn, and the captions that describe them.

It extends easy-VQA (one shape per 64x64 image) to scenes that need counting, attribute binding and spatial relations,
with the same palette, the same three shapes and the same kind of tinted background, so a model trained on both sees
one visual vocabulary.

Layout: the image is split into four quadrants and each object sits, with random jitter, inside its own quadrant.
So objects never overlap, every object has one unambiguous position ("top left", ...), and relations between two
objects follow from their quadrants (same row: left/right; same column: above/below; diagonal: both).
No two objects share both colour and shape, so "the red circle" always names exactly one object.

Everything is a pure function of ``(seed, index)``: scene ``i`` of seed ``s`` is the same whatever the number of
scenes asked for, and the rendered PNG bytes are the same on every run.

This module holds the scenes and their language (captions, referring expressions); the questions, preference
pairs, POPE sets and dataset writing are in :mod:`vlm_chat.datasets.shapes`, which re-exports everything here.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

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
