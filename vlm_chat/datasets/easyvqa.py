"""The easy-VQA dataset from the ``easy_vqa`` package: splits, answer vocabulary, derived captions, conversations.

easy-VQA (https://github.com/vzhou842/easy-VQA) holds 64x64 images of one shape on a tinted background: 4,000 train
images with 38,575 questions and 1,000 test images with 9,673 questions, all answered by one of 13 words. Its
package installs the PNGs and a ``questions.json`` per split offline; ``easy_vqa.get_train_questions()`` returns
three parallel lists (texts, answers, image ids) and ``get_train_image_paths()`` maps image id -> PNG path.

Splits here: ``"val"`` is a fixed tenth of the package's train images (400 images, chosen by image id with a seeded
draw, so the same on every run and machine: :func:`validation_image_ids`), ``"train"`` the other 3,600 (so nothing
trained on ``"train"`` ever sees a ``"val"`` image), and ``"test"`` the package's test split. Train on ``"train"``,
make every choice (steps, checkpoint, mixture) on ``"val"``, and read ``"test"`` only for the final report.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import easy_vqa

from vlm_chat.datasets.records import ImageRecord, write_records
from vlm_chat.datasets.scenes import COLORS, SHAPES

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: Share of the package's train images held out as the validation split.
VALIDATION_FRACTION = 0.1
#: Seed of the validation draw (a string: ``random`` hashes it with SHA-512, the same on every platform).
VALIDATION_DRAW_SEED = "easy-vqa/validation/0"
#: Number of questions in the fixed quick-evaluation subset of the test split.
QUICK_EVAL_SIZE = 1000
QUICK_EVAL_SEED = 0

_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class VQASample:
    """One easy-VQA question.

    Attributes:
        image: Absolute path of the image PNG (inside the installed package).
        question: The question, as easy-VQA spells it (lowercase, e.g. ``"what color is the shape?"``).
        answer: One of the 13 answers.
        image_id: easy-VQA's integer image id within the split.
        answer_type: ``"yes/no"``, ``"color"`` or ``"shape"``.
    """

    image: str
    question: str
    answer: str
    image_id: int
    answer_type: str


def answer_vocabulary() -> list[str]:
    """easy-VQA's 13 answers, in the package's order."""
    return list(easy_vqa.get_answers())


def answer_type(answer: str) -> str:
    """``"yes/no"``, ``"color"`` or ``"shape"`` for an easy-VQA answer.

    Raises:
        ValueError: If ``answer`` is not one of the 13 answers.
    """
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in COLORS:
        return "color"
    if answer in SHAPES:
        return "shape"
    raise ValueError(f"{answer!r} is not an easy-VQA answer; expected one of {answer_vocabulary()}")


@lru_cache(maxsize=1)
def validation_image_ids() -> frozenset[int]:
    """The image ids of the ``"val"`` split: :data:`VALIDATION_FRACTION` of the package's train images, drawn with
    :data:`VALIDATION_DRAW_SEED` from the sorted ids (so the draw depends on the ids alone, not on file order)."""
    ids = sorted(easy_vqa.get_train_image_paths())
    return frozenset(random.Random(VALIDATION_DRAW_SEED).sample(ids, round(VALIDATION_FRACTION * len(ids))))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _in_split(split: str, image_id: int) -> bool:
    """Whether an image id of the package's train (for "train"/"val") or test split belongs to ``split``."""
    if split == "test":
        return True
    return (image_id in validation_image_ids()) == (split == "val")


@lru_cache(maxsize=3)
def _load(split: str) -> tuple[VQASample, ...]:
    _check_split(split)
    package_train = split != "test"
    texts, answers, image_ids = easy_vqa.get_train_questions() if package_train else easy_vqa.get_test_questions()
    paths = easy_vqa.get_train_image_paths() if package_train else easy_vqa.get_test_image_paths()
    samples = []
    for i, (q, a, image_id) in enumerate(zip(texts, answers, image_ids)):
        if image_id not in paths:
            raise ValueError(f"easy_vqa {split} question {i} ({q!r}) refers to image {image_id}, which has no PNG")
        if _in_split(split, image_id):
            samples.append(VQASample(paths[image_id], q, a, image_id, answer_type(a)))
    return tuple(samples)


def load_split(split: str) -> list[VQASample]:
    """All questions of ``split`` (``"train"``, ``"val"`` or ``"test"``) in the package's order.

    Returns:
        A list of :class:`VQASample` (34,726 train, 3,849 val, 9,673 test).
    """
    return list(_load(split))


def image_paths(split: str) -> dict[int, str]:
    """easy-VQA image id -> absolute PNG path for ``split`` (3,600 train / 400 val / 1,000 test images)."""
    _check_split(split)
    paths = easy_vqa.get_train_image_paths() if split != "test" else easy_vqa.get_test_image_paths()
    return {image_id: path for image_id, path in paths.items() if _in_split(split, image_id)}


def group_by_image(samples: Iterable[VQASample]) -> dict[int, list[VQASample]]:
    """Questions grouped by image id, images in first-seen order, questions in their original order."""
    groups: dict[int, list[VQASample]] = {}
    for s in samples:
        groups.setdefault(s.image_id, []).append(s)
    return groups


def image_attributes(questions: Sequence[VQASample]) -> tuple[str | None, str | None]:
    """The colour and shape of one image's shape, deduced from that image's own questions and answers.

    "what color is the shape?" -> red gives the colour; "what is the red shape?" -> circle gives both; a yes/no
    question about an attribute sets it (true, taking negation into account: "is there not a red shape?" -> no) or
    rules it out (false); when all but one colour (or shape) is ruled out, the last one is it.

    Args:
        questions: All questions of one image.

    Returns:
        ``(color, shape)``; either is ``None`` when the questions do not determine it.

    Raises:
        ValueError: If the answers contradict each other (two different colours or shapes).
    """
    color = shape = None
    not_colors: set[str] = set()
    not_shapes: set[str] = set()

    def setter(kind: str, value: str) -> None:
        nonlocal color, shape
        current = color if kind == "color" else shape
        if current is not None and current != value:
            raise ValueError(f"easy-VQA image {questions[0].image_id}: answers say both {current!r} and {value!r}")
        if kind == "color":
            color = value
        else:
            shape = value

    for q in questions:
        words = _WORD.findall(q.question)
        colors = [w for w in words if w in COLORS]
        shapes = [w for w in words if w in SHAPES]
        if q.answer in COLORS:
            setter("color", q.answer)
            for s in shapes:  # "what color is the circle?"
                setter("shape", s)
        elif q.answer in SHAPES:
            setter("shape", q.answer)
            for c in colors:  # "what is the red shape?"
                setter("color", c)
        else:
            negated = "not" in words or "no" in words  # "is there not a ...", "is no ... present?"
            true = (q.answer == "yes") != negated
            for c in colors:
                if true:
                    setter("color", c)
                else:
                    not_colors.add(c)
            for s in shapes:
                if true:
                    setter("shape", s)
                else:
                    not_shapes.add(s)
    if color is None and len(not_colors) == len(COLORS) - 1:
        color = next(c for c in COLORS if c not in not_colors)
    if shape is None and len(not_shapes) == len(SHAPES) - 1:
        shape = next(s for s in SHAPES if s not in not_shapes)
    return color, shape


def derived_caption(color: str | None, shape: str | None) -> str | None:
    """``"A red circle."``; ``"A red shape."`` or ``"A circle."`` when one attribute is unknown; ``None`` if both."""
    if color is None and shape is None:
        return None
    if shape is None:
        return f"A {color} shape."
    return f"A {color} {shape}." if color else f"A {shape}."


def derived_captions(samples: Iterable[VQASample]) -> dict[int, str]:
    """Caption per image built from its own questions and answers (images with nothing known are left out).

    On the train split 3,217 of 3,600 images get colour and shape, 358 one of them, 25 none.
    """
    captions = {}
    for image_id, qs in group_by_image(samples).items():
        caption = derived_caption(*image_attributes(qs))
        if caption is not None:
            captions[image_id] = caption
    return captions


#: easy-VQA's 24 colour x shape classes ("red circle", ...), for zero-shot classification of a stage-0 encoder.
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
#: Zero-shot prompt of a class: the form of the captions stage 0 is trained on (:func:`derived_caption`).
ZERO_SHOT_TEMPLATE = "A {}."


def labelled_images(split: str) -> list[tuple[str, str]]:
    """``(image path, "red circle")`` for every image of ``split`` whose questions determine colour and shape.

    That is 3,217 of 3,600 train, 361 of 400 val and 888 of 1,000 test images; the class names are :data:`CLASS_NAMES`.
    """
    out = []
    for qs in group_by_image(_load(split)).values():
        color, shape = image_attributes(qs)
        if color is not None and shape is not None:
            out.append((qs[0].image, f"{color} {shape}"))
    return out


def conversations(
    samples: Iterable[VQASample], max_turns: int | None = None, shuffle_seed: int | None = None
) -> dict[int, list[list[dict[str, str]]]]:
    """LLaVA-style multi-turn conversations: all questions of one image in one conversation.

    Args:
        samples: Questions (e.g. :func:`load_split` ``("train")``).
        max_turns: Split an image's questions into conversations of at most this many turns (``None``: one
            conversation per image).
        shuffle_seed: Shuffle each image's questions with this seed first (``None``: keep the package's order).

    Returns:
        image id -> list of conversations, each ``[{"role": "user", "content": "<image>\\nq1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}, ...]``.
    """
    if max_turns is not None and max_turns < 1:
        raise ValueError(f"max_turns must be >= 1 or None, got {max_turns}")
    out = {}
    for image_id, qs in group_by_image(samples).items():
        if shuffle_seed is not None:
            qs = qs.copy()
            random.Random(f"easy-vqa/{shuffle_seed}/{image_id}").shuffle(qs)
        step = max_turns or len(qs)
        convs = []
        for start in range(0, len(qs), step):
            messages = []
            for k, q in enumerate(qs[start : start + step]):
                messages.append({"role": "user", "content": ("<image>\n" + q.question) if k == 0 else q.question})
                messages.append({"role": "assistant", "content": q.answer})
            convs.append(messages)
        out[image_id] = convs
    return out


def question_template(question: str) -> str:
    """The question with its colour and shape words masked: ``"is there not a C shape?"``, ``"is a S present?"``."""
    return _WORD.sub(lambda m: "C" if m[0] in COLORS else "S" if m[0] in SHAPES else m[0], question)


def balance_yes_no(samples: Iterable[VQASample], seed: int = 0) -> list[VQASample]:
    """Drop yes/no questions so that every question template answers "yes" as often as "no".

    easy-VQA's yes/no questions carry a strong language prior: an image has one of 8 colours, so "is there a red
    shape?" is "no" 7 times in 8 and "is there not a red shape?" is "yes" 7 times in 8 (the package's 4,000 train
    images: 2,225 no / 331 yes for "does the image contain a C shape?"). A model trained on them learns to answer from the question's form
    and not from the image (VQA v2 was built balanced for the same reason). Per template
    (:func:`question_template`), all questions of the rarer answer are kept and as many of the commoner one, drawn
    with ``seed``; colour and shape questions are kept. The result keeps the input order.

    Args:
        samples: Questions (e.g. :func:`load_split` ``("train")``).
        seed: Picks which questions of the commoner answer stay.

    Returns:
        The kept questions (train split: 18,430 of 34,726; 9,312 of them yes/no, half "yes").
    """
    samples = list(samples)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, s in enumerate(samples):
        if s.answer_type == "yes/no":
            groups.setdefault((question_template(s.question), s.answer), []).append(i)
    rng = random.Random(f"easy-vqa-balance/{seed}")
    drop: set[int] = set()
    for template in sorted({t for t, _ in groups}):
        yes, no = groups.get((template, "yes"), []), groups.get((template, "no"), [])
        keep = min(len(yes), len(no))
        for idx in (yes, no):
            drop.update(set(idx) - set(rng.sample(idx, keep)))
    return [s for i, s in enumerate(samples) if i not in drop]


def quick_eval_subset(n: int = QUICK_EVAL_SIZE, seed: int = QUICK_EVAL_SEED, split: str = "test") -> list[VQASample]:
    """A fixed, seeded sample of ``n`` questions from ``split``, for the quick evaluation.

    The sample is drawn with ``random.Random(seed)`` over the package's question order, then put back in that order
    (so an image's questions stay together for batching). The default is the project's fixed 1,000-question subset
    of the test split; ``split="val"`` draws from the validation tenth (for choices made during development);
    ``split="train"`` draws the same way from the questions the models train on (a fit check:
    how far train accuracy is from test accuracy tells under- from over-fitting).
    """
    questions = _load(split)
    if not 0 < n <= len(questions):
        raise ValueError(f"n must be in 1..{len(questions)}, got {n}")
    picked = sorted(random.Random(seed).sample(range(len(questions)), n))
    return [questions[i] for i in picked]


def build_records(
    split: str, max_turns: int | None = None, shuffle_seed: int | None = None, balance: bool = False
) -> list[ImageRecord]:
    """One :class:`~vlm_chat.datasets.shapes.ImageRecord` per image of ``split``: its conversation(s), its derived caption
    (if any) and its questions as VQA rows. Image ids are ``easyvqa_<split>_<id>``.

    ``balance``: build the conversations from :func:`balance_yes_no`'s questions (captions and VQA rows still use
    all of them); an image left without questions gets no conversation.
    """
    samples = load_split(split)
    captions = derived_captions(samples)
    convs = conversations(balance_yes_no(samples) if balance else samples, max_turns=max_turns,
                          shuffle_seed=shuffle_seed)
    records = []
    for image_id, qs in group_by_image(samples).items():
        records.append(
            ImageRecord(
                image_id=f"easyvqa_{split}_{image_id}",
                image=qs[0].image,
                conversations=convs.get(image_id, []),
                captions=[captions[image_id]] if image_id in captions else [],
                vqa=[{"question": q.question, "answer": q.answer, "answer_type": q.answer_type} for q in qs],
            )
        )
    return records


def write_easyvqa(
    out_dir: str | os.PathLike,
    split: str = "train",
    max_turns: int | None = None,
    shuffle_seed: int | None = None,
    balance: bool = False,
) -> dict[str, int]:
    """Write ``split`` in the project's formats (images, ``conversations.json``, ``captions.jsonl``, ``vqa.jsonl``)
    with :func:`vlm_chat.datasets.shapes.write_records`; ``balance``: conversations from :func:`balance_yes_no`.

    Returns:
        Rows written per file.
    """
    if split == "test":
        logger.warning("writing the easy-VQA TEST split: use it for evaluation only, never for training")
    elif split == "val":
        logger.warning("writing the easy-VQA VAL split: use it to choose among models, never for training")
    return write_records(out_dir, build_records(split, max_turns=max_turns, shuffle_seed=shuffle_seed, balance=balance))


# Questions in phrasings easy-VQA never uses (its 24 templates are all lowercase "what color is the shape?",
# "is there a red shape in the image?", "does the image not contain a circle?", ...): British spelling, other
# nouns for the shape ("object", "figure", "thing"), imperatives, polite requests. {c}/{s}: a colour/shape word.
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "color": (
        "Which colour is the object in this picture?",
        "Tell me the color of the figure.",
        "What's the hue of the thing drawn here?",
        "Name the colour you see.",
        "Can you tell me what colour the shape is painted?",
        "The figure in the picture: what color would you call it?",
    ),
    "shape": (
        "Which geometric figure is drawn here?",
        "Name the shape in the picture.",
        "What kind of figure do you see?",
        "Is the object a circle, a rectangle or a triangle?",
        "What type of shape is shown in this picture?",
        "Describe the form of the object in one word.",
    ),
    "yes_color": (
        "Can you see a {c} object?",
        "Is the figure {c}?",
        "Would you say the object is {c}?",
    ),
    "yes_shape": (
        "Do you see a {s} anywhere?",
        "Is the drawn object a {s}?",
        "Is the figure in this picture shaped like a {s}?",
    ),
}


def paraphrase_questions(n_images: int = 100, seed: int = 0, split: str = "test") -> list[VQASample]:
    """Questions about ``split`` images in phrasings easy-VQA never uses, with answers from the images' labels.

    Each of ``n_images`` seeded images whose colour and shape are known gets one colour, one shape and two yes/no
    questions (one true, one false; one about its colour, one about its shape), each from a random template of
    :data:`PARAPHRASES`: ``4 * n_images`` samples, a third of them colour/shape answers and half the yes/no ones "no".
    """
    rng = random.Random(seed)
    images = labelled_images(split)
    if not 0 < n_images <= len(images):
        raise ValueError(f"n_images must be in 1..{len(images)}, got {n_images}")
    out = []
    ids = {path: image_id for image_id, path in image_paths(split).items()}
    for path, label in rng.sample(images, n_images):
        color, shape = label.split()
        image_id = ids.get(path, -1)

        def add(question: str, answer: str, path=path, image_id=image_id) -> None:
            out.append(VQASample(path, question, answer, image_id, answer_type(answer)))

        add(rng.choice(PARAPHRASES["color"]), color)
        add(rng.choice(PARAPHRASES["shape"]), shape)
        truth = rng.random() < 0.5  # which of the two yes/no questions is the true one
        other_color = rng.choice([c for c in COLORS if c != color])
        other_shape = rng.choice([s for s in SHAPES if s != shape])
        add(rng.choice(PARAPHRASES["yes_color"]).format(c=color if truth else other_color), "yes" if truth else "no")
        add(rng.choice(PARAPHRASES["yes_shape"]).format(s=other_shape if truth else shape), "no" if truth else "yes")
    return out


def preference_pairs(
    split: str = "train", per_image: int = 1, seed: int = 0, balance: bool = False
) -> list[dict[str, str]]:
    """DPO pairs from easy-VQA questions: chosen = the answer, rejected = a wrong answer of the same type.

    Mixed into the DPO data so that preference tuning on shapes-world hallucination pairs (mostly "no" to absent
    objects) does not teach the model to deny everything on easy-VQA's yes/no questions. ``balance``: draw from
    :func:`balance_yes_no`'s questions.

    Returns:
        ``[{"image", "prompt", "chosen", "rejected", "image_id"}, ...]``, ``per_image`` per image (seeded choice of
        questions); ``image`` is the package's PNG path, ``image_id`` easy-VQA's id.
    """
    rng = random.Random(seed)
    pairs = []
    samples = load_split(split)
    for qs in group_by_image(balance_yes_no(samples) if balance else samples).values():
        for q in rng.sample(qs, min(per_image, len(qs))):
            kind = q.answer_type
            options = ["yes", "no"] if kind == "yes/no" else list(COLORS if kind == "color" else SHAPES)
            wrong = rng.choice([a for a in options if a != q.answer])
            pairs.append(
                {"image": q.image, "prompt": q.question, "chosen": q.answer, "rejected": wrong, "image_id": q.image_id}
            )
    return pairs
