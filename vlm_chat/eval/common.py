"""What every metric family shares: answer normalisation, evaluation files, and the grouped generation runner."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

_ARTICLES = {"a", "an", "the"}
# The VQA evaluation's number handling: spelled-out numbers count as digits.
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_APOSTROPHES = re.compile(r"['\u2019`]")
_NON_WORD = re.compile(r"[^a-z0-9]+")


# --------------------------------------------------------------------------------------------------------------------
# Text normalization


def normalize_answer(text: str) -> str:
    """Lowercase, drop apostrophes, turn other punctuation into spaces, drop articles, spell numbers as digits.

    ``"The shape is Red."`` -> ``"shape is red"``; ``"Top-left"`` -> ``"top left"``; ``"Three!"`` -> ``"3"``.
    """
    text = _NON_WORD.sub(" ", _APOSTROPHES.sub("", text.lower()))
    return " ".join(_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES)


def extract_answer(response: str, vocabulary: Iterable[str]) -> str | None:
    """The first vocabulary entry that occurs in the normalized response, scanning left to right.

    Multi-word entries (``"top left"``) match as whole phrases; at one position the longest entry wins. Matching is on
    whole words, so ``"no"`` does not match inside ``"not"``.

    Args:
        response: The model's text.
        vocabulary: The possible answers.

    Returns:
        The matching entry, normalized with :func:`normalize_answer`; ``None`` if no entry occurs.
    """
    phrases = sorted({tuple(normalize_answer(v).split()) for v in vocabulary} - {()}, key=len, reverse=True)
    words = normalize_answer(response).split()
    for i in range(len(words)):
        for phrase in phrases:
            if tuple(words[i : i + len(phrase)]) == phrase:
                return " ".join(phrase)
    return None


def caption_tokenize(text: str) -> str:
    """Lowercase words and digits separated by single spaces: a Java-free stand-in for the PTB tokenizer that
    pycocoevalcap normally runs (punctuation is dropped, as PTBTokenizer's coco setting does)."""
    return " ".join(_NON_WORD.sub(" ", _APOSTROPHES.sub("", text.lower())).split())



def infer_answer_type(answer: str) -> str:
    """``"yes/no"``, ``"number"`` or ``"other"`` (the VQA breakdown) for an answer without an explicit type."""
    norm = normalize_answer(answer)
    if norm in ("yes", "no"):
        return "yes/no"
    return "number" if norm.isdigit() else "other"


def load_eval_jsonl(
    path: str | os.PathLike,
    required: Sequence[str] = ("image", "question"),
    image_folder: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Read evaluation rows (``vqa.jsonl``, ``pope.jsonl`` as written by :func:`vlm_chat.datasets.shapes.write_records`).

    Args:
        path: The JSONL file.
        required: Fields every row must have (e.g. add ``"answer"`` for VQA, ``"label"`` for POPE).
        image_folder: Folder the relative ``image`` paths live in; default: the file's directory.

    Returns:
        The rows as dicts, ``image`` made an absolute path.

    Raises:
        ValueError: A malformed line or a missing field, naming the file and line.
        FileNotFoundError: The file or a row's image does not exist.
    """
    import json

    path = os.fspath(path)
    folder = os.fspath(image_folder) if image_folder is not None else os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: malformed JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}, line {lineno}: missing field(s) {missing}")
            if "image" in row:
                image = os.path.join(folder, row["image"])
                if not os.path.isfile(image):
                    raise FileNotFoundError(f"{path}, line {lineno}: image {image} does not exist")
                row["image"] = os.path.abspath(image)
            rows.append(row)
    return rows



def sample_field(sample: Any, name: str, index: int, required: bool = True) -> Any:
    if isinstance(sample, Mapping):
        if name in sample:
            return sample[name]
    elif hasattr(sample, name):
        return getattr(sample, name)
    if required:
        raise ValueError(f"samples[{index}] has no {name!r} field (got {type(sample).__name__})")
    return None


def image_key(image: Any) -> Any:
    if isinstance(image, (str, os.PathLike)):
        return ("path", os.path.abspath(os.fspath(image)))
    return ("object", id(image))


def generate_grouped(
    chat: Any,
    images: Sequence[Any],
    prompts: Sequence[str],
    batch_size: int,
    desc: str,
    progress: bool,
    share_prefix: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """Answer ``prompts`` about ``images`` in batches of questions grouped by image; results in input order.

    Grouping puts an image's questions into the same batch (the image is loaded once per batch and the same object is
    passed for each of its questions). With ``share_prefix`` a batch holds whole images where it can (an image with
    more than ``batch_size`` questions is split) and goes to :func:`vlm_chat.prefix_cache.generate_shared_prefix`,
    which runs each image's prompt prefix once for all its questions (same greedy answers, several times faster);
    without it, batches are consecutive runs of ``batch_size`` questions sent to ``chat.generate_batch``.

    Args:
        chat: A ``VLMChat`` (or anything with ``generate_batch(images, prompts, **kw) -> list[str]``).
        images: One image (path or PIL image) per prompt.
        prompts: The prompts.
        batch_size: Most questions per batch.
        desc: Progress-bar label.
        progress: Show a progress bar.
        share_prefix: Share each image's prompt prefix (KV cache) across its questions.
        **generate_kwargs: Generation keywords for every batch.

    Returns:
        One response per prompt, in input order.
    """
    from vlm_chat.images import load_image
    from vlm_chat.prefix_cache import generate_shared_prefix

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[Any, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image_key(image), []).append(i)
    chunks = _pack(list(groups.values()), batch_size) if share_prefix else _consecutive(groups, batch_size)
    responses: list[str | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=True if not progress else None,  # None: terminal only
                unit="q")
    for chunk in chunks:
        loaded: dict[Any, Any] = {}
        batch_images = []
        for i in chunk:
            key = image_key(images[i])
            if key not in loaded:
                try:
                    loaded[key] = load_image(images[i])
                except (OSError, ValueError, TypeError) as e:
                    raise type(e)(f"sample {i}: cannot load image {images[i]!r}: {e}") from e
            batch_images.append(loaded[key])
        batch_prompts = [prompts[i] for i in chunk]
        if share_prefix:
            outputs = generate_shared_prefix(chat, batch_images, batch_prompts, **generate_kwargs)
        else:
            outputs = chat.generate_batch(batch_images, batch_prompts, **generate_kwargs)
        if len(outputs) != len(chunk):
            raise RuntimeError(f"generate_batch returned {len(outputs)} texts for {len(chunk)} prompts")
        for i, text in zip(chunk, outputs):
            responses[i] = text
        bar.update(len(chunk))
    bar.close()
    return responses  # type: ignore[return-value]


def _consecutive(groups: dict[Any, list[int]], batch_size: int) -> list[list[int]]:
    order = [i for idx in groups.values() for i in idx]
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _pack(groups: list[list[int]], batch_size: int) -> list[list[int]]:
    """Batches of whole groups, in order, each of at most ``batch_size`` items; a larger group is split."""
    chunks: list[list[int]] = []
    current: list[int] = []
    for group in groups:
        if len(current) + len(group) > batch_size and current:
            chunks.append(current)
            current = []
        for start in range(0, len(group), batch_size):
            part = group[start : start + batch_size]
            if len(current) + len(part) > batch_size:
                chunks.append(current)
                current = []
            current += part
    if current:
        chunks.append(current)
    return chunks
