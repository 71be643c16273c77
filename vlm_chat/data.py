"""Training data readers: conversations, captions and preference pairs, validated row by row.

Every reader turns one format into normalized records held in a ``datasets.Dataset``:

- conversations (LLaVA JSON/JSONL, or the transformers/TRL ``messages`` + ``images`` form) ->
  ``{"image", "messages": [{"role": "user" | "assistant", "content": str}, ...]}``
- captions (JSONL ``{"image", "caption"}``, or an image folder with ``metadata.jsonl``) -> ``{"image", "caption"}``
- preferences (TRL's DPO fields ``image``/``images``, ``prompt``, ``chosen``, ``rejected``) ->
  ``{"image", "prompt", "chosen", "rejected"}``

Each also reads a ``datasets.Dataset`` (an ``Image`` feature included), a saved or local dataset folder, or a
dataset name for ``datasets.load_dataset`` (``vlm_chat.data_sources``). ``image`` is an absolute path inside the
image folder, ``None`` for a text-only row, or, for images a dataset holds in memory, their encoded bytes (which
``vlm_chat.images.load_image`` decodes like a file). A literal ``<image>`` in user text marks where the image goes
(what LLaVA data means); it is kept in the text, and the prompt builder expands it.

A bad row raises :class:`DataError` naming the file (or dataset), the 0-based row, the JSONL line and the row's
``id``; with ``skip_bad_rows=True`` it is skipped instead and counted per reason in the returned
:class:`BadRowReport`. An image path that resolves outside its image folder is never opened, whatever the flag says:
it is a bad row like any other (an error, or skipped and counted), never read. The checks live in
``vlm_chat.data_checks``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from datasets import Dataset, Features, List, Value
from PIL import Image  # noqa: F401 - kept importable: tests patch ``vlm_chat.data.Image.open`` to see what is opened

from vlm_chat.data_checks import (
    IMAGE_MARKER,
    MAX_IMAGE_PIXELS,
    REASONS,
    ROLES,
    BadRow,
    BadRowReport,
    DataError,
    EncodedImage,
    ImageResolver,
    PathLike,
    check_markers,
    check_text,
    check_turns,
    content_text,
    row_image,
    type_name,
)
from vlm_chat.data_sources import DataSource, open_sources, read

logger = logging.getLogger(__name__)

__all__ = [
    "CAPTION_FEATURES",
    "CONVERSATION_FEATURES",
    "IMAGE_MARKER",
    "MAX_IMAGE_PIXELS",
    "PREFERENCE_FEATURES",
    "REASONS",
    "BadRowReport",
    "DataError",
    "DataSource",
    "EncodedImage",
    "load_captions",
    "load_conversations",
    "load_preferences",
    "pack_by_image",
]

CONVERSATION_FEATURES = Features(
    {"image": Value("string"), "messages": List({"role": Value("string"), "content": Value("string")})}
)
CAPTION_FEATURES = Features({"image": Value("string"), "caption": Value("string")})
PREFERENCE_FEATURES = Features(
    {"image": Value("string"), "prompt": Value("string"), "chosen": Value("string"), "rejected": Value("string")}
)

# --------------------------------------------------------------------------------------------------------------------
# Conversations


def _turns(row: dict, field: str, fmt: str, what: str, keys: tuple[str, str]) -> list[dict]:
    """``row[field]`` checked to be a list of objects that each hold ``keys`` (both formats share this shape)."""
    if field not in row:
        raise BadRow("missing_field", f"no {field!r} field (read as {fmt} format)")
    turns = row[field]
    if not isinstance(turns, list):
        raise BadRow("wrong_type", f"{field!r} must be a list, got {type_name(turns)}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow("wrong_type", f"{what} {i}: must be an object, got {type_name(turn)}")
        for key in keys:
            if key not in turn:
                raise BadRow("missing_field", f"{what} {i}: no {key!r} field")
    return turns


def _llava_messages(row: dict) -> list[dict]:
    messages = []
    for i, turn in enumerate(_turns(row, "conversations", "LLaVA", "turn", ("from", "value"))):
        for key in ("from", "value"):
            if not isinstance(turn[key], str):
                raise BadRow("wrong_type", f"turn {i}: {key!r} must be a string, got {type_name(turn[key])}")
        role = ROLES.get(turn["from"].lower())
        if role is None:
            raise BadRow("unknown_role", f"turn {i}: unknown speaker {turn['from']!r} (use 'human' or 'gpt')")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _chat_messages(row: dict) -> list[dict]:
    messages = []
    for i, turn in enumerate(_turns(row, "messages", "messages", "message", ("role", "content"))):
        if not isinstance(turn["role"], str):
            raise BadRow("wrong_type", f"message {i}: 'role' must be a string, got {type_name(turn['role'])}")
        role = ROLES.get(turn["role"].lower())
        if role is None:
            raise BadRow(
                "unknown_role", f"message {i}: role {turn['role']!r} is not supported (use 'user' and 'assistant')"
            )
        messages.append({"role": role, "content": content_text(turn["content"], f"message {i}")})
    return messages


class _ConversationNormalizer:
    """Normalize one file's rows; with no format given, the file's first row with a known field decides it."""

    def __init__(self, kind: str | None):
        self.kind = kind

    def __call__(self, row: dict, images: ImageResolver) -> dict:
        if self.kind is None:
            if "conversations" in row:
                self.kind = "llava"
            elif "messages" in row:
                self.kind = "messages"
            else:
                raise BadRow("missing_field", "no 'conversations' (LLaVA) or 'messages' field")
        messages = _llava_messages(row) if self.kind == "llava" else _chat_messages(row)
        rel, name = row_image(row)
        check_turns(messages, has_image=rel is not None)
        image = images(rel, name) if rel is not None else None  # last: the only check that touches the disk
        return {"image": image, "messages": messages}


def load_conversations(
    path: DataSource | Sequence[DataSource],
    image_folder: PathLike | None = None,
    skip_bad_rows: bool = False,
    *,
    format: str | None = None,
    split: str | None = "train",
    dataset_kwargs: dict | None = None,
    verify_images: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[Dataset, BadRowReport]:
    """Read conversations (LLaVA or transformers/TRL ``messages`` + ``images``), validated per row.

    Args:
        path: A JSON array or JSONL file; a folder with ``metadata.jsonl`` (image key ``file_name``, relative to the
            folder); a ``datasets.Dataset`` (``image`` may be an ``Image`` feature, ``images`` a list of them); a
            ``save_to_disk`` folder, another local dataset folder or a dataset name for ``datasets.load_dataset``;
            or a list of these.
        image_folder: Folder the rows' relative image paths live in; default: each data file's own directory (a
            ``Dataset`` has none, so its path strings need one). An image path that resolves outside it (absolute,
            ``..``, or a symlink leading out) is refused unread; given, it holds ``Image`` feature paths to it too.
        skip_bad_rows: Skip bad rows and count them per reason instead of raising on the first one.
        format: ``"llava"``, ``"messages"``, or ``None`` to detect it per source (from the first row that has a
            ``conversations`` or a ``messages`` field; later rows must match it).
        split: The split to read from a ``DatasetDict``, a saved dataset or ``datasets.load_dataset``.
        dataset_kwargs: More keyword arguments for ``datasets.load_dataset`` (``data_dir``, ``cache_dir``, ...).
        verify_images: Open each image once with PIL and ``verify()`` it (header and structure, no pixel decode);
            ``False`` only checks that the file exists.
        max_pixels: Images with more pixels than this are bad rows (matches the core's decompression-bomb cap).

    Returns:
        ``(dataset, report)``: a ``datasets.Dataset`` with columns ``image`` (absolute path or ``None``; encoded
        bytes, in a binary column, when a dataset held its images in memory) and ``messages`` (``[{"role": "user" |
        "assistant", "content": str}, ...]``, a literal ``<image>`` kept in the user's first turn where the data put
        it), and the :class:`BadRowReport` of skipped rows.

    Raises:
        DataError: A bad row (source, row, JSONL line and id in the message) unless ``skip_bad_rows``; a file that
            is missing, not UTF-8, or a malformed JSON array; a missing image folder; a dataset that does not load
            or lacks a ``conversations``/``messages`` column.
    """
    if format not in (None, "llava", "messages"):
        raise ValueError(f"format must be 'llava', 'messages' or None (detect), got {format!r}")
    sources = open_sources(path, image_folder, split, dataset_kwargs)
    return read(
        sources,
        lambda: _ConversationNormalizer(format),
        CONVERSATION_FEATURES,
        required=[("conversations", "messages")],
        what="conversations",
        skip_bad_rows=skip_bad_rows,
        verify_images=verify_images,
        max_pixels=max_pixels,
    )


# --------------------------------------------------------------------------------------------------------------------
# Captions


def _caption_normalize(row: dict, images: ImageResolver) -> dict:
    image_key = "image" if "image" in row else "file_name"
    if image_key not in row:
        raise BadRow("missing_field", "no 'image' (or 'file_name') field")
    caption_key = "caption" if "caption" in row else "text"
    if caption_key not in row:
        raise BadRow("missing_field", "no 'caption' (or 'text') field")
    caption = row[caption_key]
    if not isinstance(caption, str):
        raise BadRow("wrong_type", f"{caption_key!r} must be a string, got {type_name(caption)}")
    check_text(caption, caption_key)
    if row[image_key] is None:
        raise BadRow("missing_field", f"{image_key!r} is null; a caption needs an image")
    return {"image": images(row[image_key], image_key), "caption": caption}


def load_captions(
    path: DataSource | Sequence[DataSource],
    image_folder: PathLike | None = None,
    skip_bad_rows: bool = False,
    *,
    split: str | None = "train",
    dataset_kwargs: dict | None = None,
    verify_images: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[Dataset, BadRowReport]:
    """Read image-caption pairs: JSONL ``{"image", "caption"}``, an image folder with ``metadata.jsonl``, or a dataset.

    Args:
        path: A JSON/JSONL file; a directory holding ``metadata.jsonl`` rows ``{"file_name", "caption" | "text"}``
            (the ``datasets`` imagefolder convention: ``file_name`` is relative to the directory); a
            ``datasets.Dataset`` with an ``image`` column (an ``Image`` feature or path strings) and a ``caption`` or
            ``text`` column; a ``save_to_disk`` folder, another local dataset folder or a dataset name for
            ``datasets.load_dataset``; or a list of these.
        image_folder: Folder of the images for a JSONL file (default: the file's directory) or of a dataset's path
            strings. Ignored for a folder with ``metadata.jsonl``, whose own folder is the image folder.
        skip_bad_rows: Skip bad rows and count them per reason instead of raising.
        split: The split to read from a ``DatasetDict``, a saved dataset or ``datasets.load_dataset``.
        dataset_kwargs: More keyword arguments for ``datasets.load_dataset`` (``data_dir``, ``cache_dir``, ...).
        verify_images: Open each image once with PIL and ``verify()`` it; ``False`` only checks it exists.
        max_pixels: Images with more pixels than this are bad rows.

    Returns:
        ``(dataset, report)``: a ``datasets.Dataset`` with columns ``image`` (absolute path, or encoded bytes for
        images a dataset held in memory) and ``caption``, and the :class:`BadRowReport`.

    Raises:
        DataError: As :func:`load_conversations`; also a folder without ``metadata.jsonl`` that ``datasets`` reads
            without a caption column.
    """
    sources = open_sources(path, image_folder, split, dataset_kwargs)
    return read(
        sources,
        lambda: _caption_normalize,
        CAPTION_FEATURES,
        required=[("image", "file_name"), ("caption", "text")],
        what="captions",
        skip_bad_rows=skip_bad_rows,
        verify_images=verify_images,
        max_pixels=max_pixels,
    )


# --------------------------------------------------------------------------------------------------------------------
# Preferences


def _single_turn(value: Any, field_name: str, role: str) -> str:
    """A TRL preference field: a string, or (conversational form) a list holding one message of ``role``."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict):
            raise BadRow(
                "wrong_type", f"{field_name!r} must be a string or a list of one {role} message, got {len(value)} items"
            )
        message = value[0]
        if ROLES.get(str(message.get("role", "")).lower()) != role:
            raise BadRow("unknown_role", f"{field_name!r}: expected a {role!r} message, got {message.get('role')!r}")
        if "content" not in message:
            raise BadRow("missing_field", f"{field_name!r}: the message has no 'content'")
        return content_text(message["content"], field_name)
    raise BadRow("wrong_type", f"{field_name!r} must be a string or a message list, got {type_name(value)}")


def _preference_normalize(row: dict, images: ImageResolver) -> dict:
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise BadRow("missing_field", f"no {key!r} field")
    rel, name = row_image(row)
    prompt = _single_turn(row["prompt"], "prompt", "user")
    chosen = _single_turn(row["chosen"], "chosen", "assistant")
    rejected = _single_turn(row["rejected"], "rejected", "assistant")
    check_markers(prompt, "prompt", has_image=rel is not None)
    check_text(prompt, "prompt", marker_position=True)
    check_text(chosen, "chosen")
    check_text(rejected, "rejected")
    if chosen.strip() == rejected.strip():
        raise BadRow("identical_pair", "'chosen' and 'rejected' are the same text: the pair carries no preference")
    image = images(rel, name) if rel is not None else None
    return {"image": image, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def load_preferences(
    path: DataSource | Sequence[DataSource],
    image_folder: PathLike | None = None,
    skip_bad_rows: bool = False,
    *,
    split: str | None = "train",
    dataset_kwargs: dict | None = None,
    verify_images: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[Dataset, BadRowReport]:
    """Read preference pairs with TRL's DPO fields: ``image`` (or ``images``), ``prompt``, ``chosen``, ``rejected``.

    ``prompt``/``chosen``/``rejected`` are strings, or TRL's conversational form: a list with one user message
    (``prompt``) or one assistant message (``chosen``/``rejected``), whose content may be a list of parts.

    Args:
        path: A JSON/JSONL file, a folder with ``metadata.jsonl``, a ``datasets.Dataset`` (TRL's vision DPO datasets:
            ``images`` a list of ``Image``), a saved or local dataset folder, a dataset name, or a list of these.
        image_folder: Folder of the images; default: each data file's directory.
        skip_bad_rows: Skip bad rows and count them per reason instead of raising.
        split: The split to read from a ``DatasetDict``, a saved dataset or ``datasets.load_dataset``.
        dataset_kwargs: More keyword arguments for ``datasets.load_dataset`` (``data_dir``, ``cache_dir``, ...).
        verify_images: Open each image once with PIL and ``verify()`` it; ``False`` only checks it exists.
        max_pixels: Images with more pixels than this are bad rows.

    Returns:
        ``(dataset, report)``: a ``datasets.Dataset`` with columns ``image`` (absolute path, ``None``, or encoded
        bytes), ``prompt`` (a literal ``<image>`` kept where the data put it), ``chosen``, ``rejected``; and the
        :class:`BadRowReport`.

    Raises:
        DataError: As :func:`load_conversations`.
    """
    sources = open_sources(path, image_folder, split, dataset_kwargs)
    return read(
        sources,
        lambda: _preference_normalize,
        PREFERENCE_FEATURES,
        required=[("prompt",), ("chosen",), ("rejected",)],
        what="preference pairs",
        skip_bad_rows=skip_bad_rows,
        verify_images=verify_images,
        max_pixels=max_pixels,
    )


# --------------------------------------------------------------------------------------------------------------------
# Packing


def _strip_marker(text: str) -> str:
    """Remove the image marker and the newline that separates it from the question."""
    for pattern in (IMAGE_MARKER + "\n", "\n" + IMAGE_MARKER, IMAGE_MARKER):
        if pattern in text:
            return text.replace(pattern, "", 1).strip()
    return text


def pack_by_image(records: Dataset | Iterable[dict], max_turns: int | None = None) -> Dataset | list[dict]:
    """Merge conversations about the same image into multi-turn conversations, so the image is encoded once.

    Records are grouped by ``image`` (an absolute path, so two spellings of one file group together; or an in-memory
    image's bytes, so identical images group together). A group takes the place of its first record; inside it the
    records keep their order, so the result is deterministic and independent of hashing. Text-only records (``image``
    is ``None``) stay as they are. The first record's ``<image>`` marker stays; later records' markers are removed
    (one image, one marker). A record whose first user turn is nothing but the marker (an image-only question)
    cannot follow another one and starts a new conversation.

    Args:
        records: Conversation records (``{"image", "messages"}``), a list or a ``Dataset`` from
            :func:`load_conversations`.
        max_turns: At most this many question-answer exchanges per packed conversation (to bound sequence length);
            when the next record would pass it, a new conversation for the same image starts at that record's
            position. A record longer than ``max_turns`` on its own is kept whole. ``None``: no limit.

    Returns:
        The packed records, a ``Dataset`` with the input's features if a ``Dataset`` came in, else a list of dicts.
    """
    if max_turns is not None and (not isinstance(max_turns, int) or max_turns < 1):
        raise ValueError(f"max_turns must be a positive integer or None, got {max_turns!r}")
    as_dataset = isinstance(records, Dataset)
    rows = records.to_list() if as_dataset else list(records)

    packed: list[dict] = []
    open_chunk: dict[str, dict] = {}  # image -> its conversation currently taking more records
    for i, record in enumerate(rows):
        if not isinstance(record, dict) or "messages" not in record or "image" not in record:
            raise ValueError(f"records[{i}]: expected a conversation record with 'image' and 'messages'")
        messages = [dict(m) for m in record["messages"]]
        image = record["image"]
        exchanges = sum(m["role"] == "user" for m in messages)
        chunk = open_chunk.get(image) if image is not None else None
        follows = chunk is not None and bool(_strip_marker(messages[0]["content"]))
        if follows and (max_turns is None or chunk["_exchanges"] + exchanges <= max_turns):
            messages[0]["content"] = _strip_marker(messages[0]["content"])
            chunk["messages"].extend(messages)
            chunk["_exchanges"] += exchanges
            continue
        chunk = {**record, "messages": messages, "_exchanges": exchanges}
        packed.append(chunk)
        if image is not None:
            open_chunk[image] = chunk
    for chunk in packed:
        del chunk["_exchanges"]
    logger.info("pack_by_image: %d records -> %d conversations", len(rows), len(packed))
    if as_dataset:
        return Dataset.from_dict({k: [r[k] for r in packed] for k in records.features}, features=records.features)
    return packed
