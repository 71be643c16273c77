"""Training data readers: conversations, captions and preference pairs, validated row by row.

Every reader turns one on-disk format into normalized records held in a ``datasets.Dataset``:

- conversations (LLaVA JSON/JSONL, or the transformers/TRL ``messages`` + ``images`` form) ->
  ``{"image": str | None, "messages": [{"role": "user" | "assistant", "content": str}, ...]}``
- captions (JSONL ``{"image", "caption"}``, or an image folder with ``metadata.jsonl``) -> ``{"image", "caption"}``
- preferences (TRL's DPO fields ``image``/``images``, ``prompt``, ``chosen``, ``rejected``) ->
  ``{"image": str | None, "prompt", "chosen", "rejected"}``

``image`` is always an absolute path inside the image folder (or ``None`` for a text-only row). A literal ``<image>``
in user text marks where the image goes (what LLaVA data means); it is kept in the text, and the prompt builder
expands it.

A bad row raises :class:`DataError` naming the file, the 0-based row, the JSONL line and the row's ``id``; with
``skip_bad_rows=True`` it is skipped instead and counted per reason in the returned :class:`BadRowReport`. An image
path that resolves outside its image folder is never opened, whatever the flag says: it is a bad row like any other
(an error, or skipped and counted), never read.

The files are parsed with the standard ``json`` module rather than ``datasets.load_dataset("json")``: Arrow's JSON
reader infers one schema for the whole file, so a wrong type in one row fails (or is silently coerced) without a row
number, and a malformed line carries no line number. The validated records are then built into a ``Dataset`` with
explicit features, so every downstream ``map``/``shuffle``/``set_transform`` works as usual.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, List, Value
from PIL import Image

logger = logging.getLogger(__name__)

#: The image marker in user text; the same string as the core's ``image_token`` default.
IMAGE_MARKER = "<image>"

#: Images with more pixels than this are bad rows: the same cap ``vlm_chat.images.load_image`` enforces, checked here
#: so a training run does not die on the row hours later.
MAX_IMAGE_PIXELS = 64_000_000

#: Why a row can be bad; the keys of :attr:`BadRowReport.counts`.
REASONS = (
    "malformed_json",  # the JSONL line does not parse
    "wrong_type",  # a row, field, turn or content part of the wrong type or an unsupported kind
    "missing_field",  # a required field is absent
    "unknown_role",  # a turn's role is not user/human or assistant/gpt
    "no_assistant_turn",  # nothing to train on
    "roles_not_alternating",  # not user, assistant, user, assistant, ..., assistant
    "empty_text",  # an empty or whitespace-only turn, caption, prompt or answer
    "image_markers",  # two markers for one image, a marker with no image, a marker outside the user's first turn
    "multiple_images",  # more than one image in a row (one image per conversation is supported)
    "identical_pair",  # a preference pair whose chosen and rejected answers are the same text
    "path_escape",  # the image path resolves outside the image folder (never opened)
    "missing_image",  # the image file does not exist
    "unreadable_image",  # the file is not an image PIL can parse, or is over the pixel cap
)

_USER_ROLES = {"user": "user", "human": "user"}
_ASSISTANT_ROLES = {"assistant": "assistant", "gpt": "assistant"}
_ROLES = {**_USER_ROLES, **_ASSISTANT_ROLES}

CONVERSATION_FEATURES = Features(
    {"image": Value("string"), "messages": List({"role": Value("string"), "content": Value("string")})}
)
CAPTION_FEATURES = Features({"image": Value("string"), "caption": Value("string")})
PREFERENCE_FEATURES = Features(
    {"image": Value("string"), "prompt": Value("string"), "chosen": Value("string"), "rejected": Value("string")}
)

PathLike = str | os.PathLike


class DataError(ValueError):
    """A data file or one of its rows is unusable.

    Attributes:
        file: The data file at fault.
        row: 0-based index of the row in the file (``None`` for a file-level error).
        line: 1-based line of the row in a JSONL file (``None`` for JSON arrays and file-level errors).
        row_id: The row's ``id`` field, if it has one.
        reason: One of :data:`REASONS`, or ``"file"`` for a file-level error.
    """

    def __init__(
        self,
        message: str,
        *,
        file: PathLike,
        row: int | None = None,
        line: int | None = None,
        row_id: Any = None,
        reason: str = "file",
    ):
        self.file = str(file)
        self.row = row
        self.line = line
        self.row_id = row_id
        self.reason = reason
        self.detail = message
        where = self.file
        if row is not None:
            where += f", row {row}"
            extras = ([f"line {line}"] if line is not None else []) + ([f"id {row_id!r}"] if row_id is not None else [])
            if extras:
                where += f" ({', '.join(extras)})"
        super().__init__(f"{where}: {message} [{reason}]")


@dataclass
class BadRowReport:
    """Rows skipped by a reader with ``skip_bad_rows=True``.

    Attributes:
        counts: Skipped rows per reason (keys from :data:`REASONS`).
        examples: The first few error messages, each naming file and row, to find the rows again.
        rows_read: Rows seen in all files, good and bad.
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    rows_read: int = 0
    max_examples: int = 20

    @property
    def skipped(self) -> int:
        """Total number of skipped rows."""
        return sum(self.counts.values())

    def add(self, error: DataError) -> None:
        self.counts[error.reason] = self.counts.get(error.reason, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))

    def summary(self) -> str:
        """One line: ``skipped 3 of 10 rows: missing_image=2, malformed_json=1``."""
        parts = ", ".join(f"{reason}={n}" for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])))
        return f"skipped {self.skipped} of {self.rows_read} rows" + (f": {parts}" if parts else "")


class _BadRow(Exception):
    """Raised inside row normalization; the reader adds file, row, line and id and turns it into a DataError."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------------------------------
# Files and rows


@dataclass
class _Row:
    index: int  # 0-based, counting rows (blank JSONL lines are not rows)
    line: int | None  # 1-based JSONL line; None in a JSON array
    value: Any = None
    parse_error: str | None = None


def _iter_rows(file: Path) -> Iterator[_Row]:
    """Yield the rows of a JSON array file or a JSONL file (sniffed from the first non-blank character)."""
    try:
        with open(file, encoding="utf-8-sig") as f:
            head = f.read(4096).lstrip()
            f.seek(0)
            if head.startswith("["):
                try:
                    rows = json.load(f)
                except json.JSONDecodeError as e:
                    # A broken array cannot be resynchronized row by row, so even skip_bad_rows cannot help.
                    raise DataError(
                        f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}", file=file, reason="file"
                    ) from e
                for i, value in enumerate(rows):
                    yield _Row(i, None, value)
                return
            index = 0
            for lineno, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    yield _Row(index, lineno, json.loads(text))
                except json.JSONDecodeError as e:
                    hint = " (a .json file must hold a JSON array of rows; JSONL holds one object per line)"
                    hint = hint if file.suffix == ".json" else ""
                    yield _Row(index, lineno, parse_error=f"malformed JSON at column {e.colno}: {e.msg}{hint}")
                index += 1
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=file) from e
    except FileNotFoundError as e:
        raise DataError("data file not found", file=file) from e
    except IsADirectoryError as e:
        raise DataError("is a directory, expected a JSON or JSONL file", file=file) from e


def _files(path: PathLike | Sequence[PathLike]) -> list[Path]:
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise ValueError("path: no data files given")
    return [Path(p) for p in paths]


def _row_id(value: Any) -> Any:
    if isinstance(value, dict) and isinstance(value.get("id"), (str, int)) and not isinstance(value.get("id"), bool):
        return value["id"]
    return None


def _read(
    jobs: list[tuple[Path, Path, Any]],
    features: Features,
    skip_bad_rows: bool,
    verify_images: bool,
    max_pixels: int,
) -> tuple[Dataset, BadRowReport]:
    """Run ``normalize(row_dict, images)`` over every row of every (data file, image folder, normalize) job."""
    report = BadRowReport()
    records: list[dict] = []
    for file, folder, normalize in jobs:
        if not file.is_file():
            raise DataError("data file not found" if not file.exists() else "not a regular file", file=file)
        images = _ImageResolver(folder, file, verify=verify_images, max_pixels=max_pixels)
        kept_before, skipped_before = len(records), report.skipped
        for row in _iter_rows(file):
            report.rows_read += 1
            try:
                if row.parse_error is not None:
                    raise _BadRow("malformed_json", row.parse_error)
                if not isinstance(row.value, dict):
                    raise _BadRow("wrong_type", f"a row must be a JSON object, got {_type_name(row.value)}")
                records.append(normalize(row.value, images))
            except _BadRow as bad:
                error = DataError(
                    bad.detail, file=file, row=row.index, line=row.line, row_id=_row_id(row.value), reason=bad.reason
                )
                if not skip_bad_rows:
                    raise error from None
                logger.debug("skipping bad row: %s", error)
                report.add(error)
        logger.info("%s: %d rows kept, %d skipped", file, len(records) - kept_before, report.skipped - skipped_before)
    if report.skipped:
        logger.warning("%s in %s", report.summary(), ", ".join(str(job[0]) for job in jobs))
    columns = {name: [r[name] for r in records] for name in features}
    return Dataset.from_dict(columns, features=features), report


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


# --------------------------------------------------------------------------------------------------------------------
# Images


class _ImageResolver:
    """Resolve image paths inside one folder: refuse escapes before touching the file, then check it cheaply."""

    def __init__(self, folder: Path, data_file: Path, *, verify: bool, max_pixels: int):
        if not folder.is_dir():
            raise DataError(f"image folder {str(folder)!r} does not exist or is not a directory", file=data_file)
        # realpath, so a symlink inside the folder that points outside it counts as an escape.
        self.folder = Path(os.path.realpath(folder))
        self.verify = verify
        self.max_pixels = max_pixels
        self._checked: dict[Path, _BadRow | None] = {}  # many rows share an image: open each file once

    def __call__(self, rel: Any, field_name: str = "image") -> str:
        if not isinstance(rel, str):
            raise _BadRow("wrong_type", f"{field_name!r} must be a string path, got {_type_name(rel)}")
        if not rel.strip():
            raise _BadRow("wrong_type", f"{field_name!r} is an empty path")
        if "\x00" in rel:
            raise _BadRow("wrong_type", f"{field_name!r} contains a NUL byte")
        # An absolute `rel` replaces the folder in the join; it then fails the containment test unless it points inside.
        resolved = Path(os.path.realpath(self.folder / rel))
        if not resolved.is_relative_to(self.folder):
            raise _BadRow(
                "path_escape", f"image path {rel!r} resolves outside the image folder {str(self.folder)!r}; refused"
            )
        if resolved not in self._checked:
            self._checked[resolved] = self._check(rel, resolved)
        bad = self._checked[resolved]
        if bad is not None:
            raise bad
        return str(resolved)

    def _check(self, rel: str, path: Path) -> _BadRow | None:
        if not path.is_file():
            what = "is not a file" if path.exists() else "not found"
            return _BadRow("missing_image", f"image {rel!r} {what} (looked at {str(path)!r})")
        if not self.verify:
            return None
        try:
            # open() reads the header only; verify() checks the file's structure (chunks, CRCs) without decoding pixels.
            with Image.open(path) as im:
                width, height = im.size
                im.verify()
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files; all mean "unreadable"
            return _BadRow("unreadable_image", f"image {rel!r} cannot be read as an image: {type(e).__name__}: {e}")
        if width <= 0 or height <= 0 or width * height > self.max_pixels:
            return _BadRow(
                "unreadable_image",
                f"image {rel!r} is {width}x{height} pixels, outside 1..{self.max_pixels:,} pixels (decompression bomb?)",
            )
        return None


def _one_image(value: Any, field_name: str) -> str | None:
    """An optional image field: a path, null, or a list of at most one path."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        if len(value) > 1:
            raise _BadRow(
                "multiple_images", f"{field_name!r} lists {len(value)} images; one image per row is supported"
            )
        return value[0] if value else None
    raise _BadRow("wrong_type", f"{field_name!r} must be a path or a list of paths, got {_type_name(value)}")


def _row_image(row: dict) -> tuple[str | None, str]:
    """The row's image path from ``image`` or ``images`` (TRL), and which field held it."""
    if "image" in row and "images" in row:
        raise _BadRow("wrong_type", "row has both 'image' and 'images'; use one")
    name = "images" if "images" in row else "image"
    return _one_image(row.get(name), name), name


# --------------------------------------------------------------------------------------------------------------------
# Text checks


def _content_text(content: Any, where: str) -> str:
    """A message content as text: a string, or a list of parts where ``{"type": "image"}`` becomes the marker.

    The layout is the one ``vlm_chat.prompting`` gives the same parts at inference: text parts are concatenated, and a
    part after an image part follows a newline, so ``[image, text "Q"]`` reads ``"<image>\\nQ"`` as in LLaVA data.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _BadRow("wrong_type", f"{where}: content must be a string or a list of parts, got {_type_name(content)}")
    pieces = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise _BadRow("wrong_type", f"{where}, part {j}: must be an object, got {_type_name(part)}")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _BadRow("wrong_type", f"{where}, part {j}: a text part needs a string 'text'")
            pieces.append(part["text"])
        elif kind == "image":
            inline = sorted(set(part) & {"image", "path", "url"})
            if inline:
                raise _BadRow(
                    "wrong_type",
                    f"{where}, part {j}: image parts are placeholders; put the path in the row's 'images' list, "
                    f"not in {inline[0]!r}",
                )
            pieces.append(IMAGE_MARKER)
        else:
            raise _BadRow("wrong_type", f"{where}, part {j}: unsupported part type {kind!r} (use 'text' or 'image')")
    return "".join(p if i == 0 or pieces[i - 1] != IMAGE_MARKER else "\n" + p for i, p in enumerate(pieces))


def _check_text(text: str, where: str, marker_position: bool = False) -> None:
    """Refuse a marker where none may stand, and empty text (a lone marker is content: an image-only question)."""
    if not marker_position and IMAGE_MARKER in text:
        raise _BadRow("image_markers", f"{where} contains {IMAGE_MARKER!r}; it belongs in the user's first turn only")
    if not text.strip():
        raise _BadRow("empty_text", f"{where} is empty")


def _check_markers(text: str, where: str, has_image: bool) -> None:
    n = text.count(IMAGE_MARKER)
    if n > 1:
        raise _BadRow("image_markers", f"{where} has {n} {IMAGE_MARKER!r} markers for one image")
    if n == 1 and not has_image:
        raise _BadRow("image_markers", f"{where} has an {IMAGE_MARKER!r} marker but the row has no image")


def _check_turns(messages: list[dict], has_image: bool) -> None:
    """Alternating user/assistant turns, starting with the user and ending with an answer; text and markers valid."""
    if not any(m["role"] == "assistant" for m in messages):
        raise _BadRow("no_assistant_turn", f"no assistant turn among {len(messages)} turns: nothing to train on")
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            after = f"after {messages[i - 1]['role']!r}" if i else "as the first turn"
            raise _BadRow("roles_not_alternating", f"turn {i} is {m['role']!r} {after}; expected {expected!r}")
    if messages[-1]["role"] != "assistant":
        raise _BadRow("roles_not_alternating", f"the last turn ({len(messages) - 1}) is a user turn with no answer")
    _check_markers(messages[0]["content"], "turn 0 (user)", has_image)
    for i, m in enumerate(messages):
        _check_text(m["content"], f"turn {i} ({m['role']})", marker_position=i == 0)


# --------------------------------------------------------------------------------------------------------------------
# Conversations


def _turns(row: dict, field: str, fmt: str, what: str, keys: tuple[str, str]) -> list[dict]:
    """``row[field]`` checked to be a list of objects that each hold ``keys`` (both formats share this shape)."""
    if field not in row:
        raise _BadRow("missing_field", f"no {field!r} field (this file is read as {fmt} format)")
    turns = row[field]
    if not isinstance(turns, list):
        raise _BadRow("wrong_type", f"{field!r} must be a list, got {_type_name(turns)}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _BadRow("wrong_type", f"{what} {i}: must be an object, got {_type_name(turn)}")
        for key in keys:
            if key not in turn:
                raise _BadRow("missing_field", f"{what} {i}: no {key!r} field")
    return turns


def _llava_messages(row: dict) -> list[dict]:
    messages = []
    for i, turn in enumerate(_turns(row, "conversations", "LLaVA", "turn", ("from", "value"))):
        for key in ("from", "value"):
            if not isinstance(turn[key], str):
                raise _BadRow("wrong_type", f"turn {i}: {key!r} must be a string, got {_type_name(turn[key])}")
        role = _ROLES.get(turn["from"].lower())
        if role is None:
            raise _BadRow("unknown_role", f"turn {i}: unknown speaker {turn['from']!r} (use 'human' or 'gpt')")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _chat_messages(row: dict) -> list[dict]:
    messages = []
    for i, turn in enumerate(_turns(row, "messages", "messages", "message", ("role", "content"))):
        if not isinstance(turn["role"], str):
            raise _BadRow("wrong_type", f"message {i}: 'role' must be a string, got {_type_name(turn['role'])}")
        role = _ROLES.get(turn["role"].lower())
        if role is None:
            raise _BadRow(
                "unknown_role", f"message {i}: role {turn['role']!r} is not supported (use 'user' and 'assistant')"
            )
        messages.append({"role": role, "content": _content_text(turn["content"], f"message {i}")})
    return messages


class _ConversationNormalizer:
    """Normalize one file's rows; with no format given, the file's first row with a known field decides it."""

    def __init__(self, kind: str | None):
        self.kind = kind

    def __call__(self, row: dict, images: _ImageResolver) -> dict:
        if self.kind is None:
            if "conversations" in row:
                self.kind = "llava"
            elif "messages" in row:
                self.kind = "messages"
            else:
                raise _BadRow("missing_field", "no 'conversations' (LLaVA) or 'messages' field")
        messages = _llava_messages(row) if self.kind == "llava" else _chat_messages(row)
        rel, name = _row_image(row)
        _check_turns(messages, has_image=rel is not None)
        image = images(rel, name) if rel is not None else None  # last: the only check that touches the disk
        return {"image": image, "messages": messages}


def load_conversations(
    path: PathLike | Sequence[PathLike],
    image_folder: PathLike | None = None,
    skip_bad_rows: bool = False,
    *,
    format: str | None = None,
    verify_images: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[Dataset, BadRowReport]:
    """Read conversation files (LLaVA JSON/JSONL or transformers/TRL ``messages`` + ``images``), validated per row.

    Args:
        path: One data file or a list of them. A file is a JSON array of rows or JSONL (one object per line).
        image_folder: Folder the rows' relative image paths live in; default: each data file's own directory.
            An image path that resolves outside it (absolute, ``..``, or a symlink leading out) is refused unread.
        skip_bad_rows: Skip bad rows and count them per reason instead of raising on the first one.
        format: ``"llava"``, ``"messages"``, or ``None`` to detect it per file (from the first row that has a
            ``conversations`` or a ``messages`` field; later rows must match it).
        verify_images: Open each image once with PIL and ``verify()`` it (header and structure, no pixel decode);
            ``False`` only checks that the file exists.
        max_pixels: Images with more pixels than this are bad rows (matches the core's decompression-bomb cap).

    Returns:
        ``(dataset, report)``: a ``datasets.Dataset`` with columns ``image`` (absolute path or ``None``) and
        ``messages`` (``[{"role": "user" | "assistant", "content": str}, ...]``, a literal ``<image>`` kept in the
        user's first turn where the data put it), and the :class:`BadRowReport` of skipped rows.

    Raises:
        DataError: A bad row (file, row, JSONL line and id in the message) unless ``skip_bad_rows``; a file that
            is missing, not UTF-8, or a malformed JSON array; a missing image folder.
    """
    if format not in (None, "llava", "messages"):
        raise ValueError(f"format must be 'llava', 'messages' or None (detect), got {format!r}")
    jobs = [(file, _folder(image_folder, file), _ConversationNormalizer(format)) for file in _files(path)]
    return _read(jobs, CONVERSATION_FEATURES, skip_bad_rows, verify_images, max_pixels)


def _folder(image_folder: PathLike | None, file: Path) -> Path:
    return Path(image_folder) if image_folder is not None else file.parent


# --------------------------------------------------------------------------------------------------------------------
# Captions


def _caption_normalize(row: dict, images: _ImageResolver) -> dict:
    image_key = "image" if "image" in row else "file_name"
    if image_key not in row:
        raise _BadRow("missing_field", "no 'image' (or 'file_name') field")
    caption_key = "caption" if "caption" in row else "text"
    if caption_key not in row:
        raise _BadRow("missing_field", "no 'caption' (or 'text') field")
    caption = row[caption_key]
    if not isinstance(caption, str):
        raise _BadRow("wrong_type", f"{caption_key!r} must be a string, got {_type_name(caption)}")
    _check_text(caption, caption_key)
    if row[image_key] is None:
        raise _BadRow("missing_field", f"{image_key!r} is null; a caption needs an image")
    return {"image": images(row[image_key], image_key), "caption": caption}


def load_captions(
    path: PathLike | Sequence[PathLike],
    image_folder: PathLike | None = None,
    skip_bad_rows: bool = False,
    *,
    verify_images: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[Dataset, BadRowReport]:
    """Read image-caption pairs: JSONL ``{"image", "caption"}``, or an image folder with ``metadata.jsonl``.

    Args:
        path: A JSON/JSONL file (or a list), or a directory holding ``metadata.jsonl`` rows
            ``{"file_name", "caption" | "text"}`` (the ``datasets`` imagefolder convention: ``file_name`` is relative
            to the directory).
        image_folder: Folder of the images for a JSONL file; default: the file's directory. Ignored for a directory
            ``path``, whose own folder is the image folder.
        skip_bad_rows: Skip bad rows and count them per reason instead of raising.
        verify_images: Open each image once with PIL and ``verify()`` it; ``False`` only checks it exists.
        max_pixels: Images with more pixels than this are bad rows.

    Returns:
        ``(dataset, report)``: a ``datasets.Dataset`` with columns ``image`` (absolute path) and ``caption``, and the
        :class:`BadRowReport`.

    Raises:
        DataError: As :func:`load_conversations`; also a directory without ``metadata.jsonl``.
    """
    jobs = []
    for file in _files(path):
        if file.is_dir():
            metadata = file / "metadata.jsonl"
            if not metadata.is_file():
                raise DataError("image folder has no metadata.jsonl ({'file_name', 'caption'} per line)", file=file)
            jobs.append((metadata, file, _caption_normalize))
        else:
            jobs.append((file, _folder(image_folder, file), _caption_normalize))
    return _read(jobs, CAPTION_FEATURES, skip_bad_rows, verify_images, max_pixels)


# --------------------------------------------------------------------------------------------------------------------
# Preferences


def _single_turn(value: Any, field_name: str, role: str) -> str:
    """A TRL preference field: a string, or (conversational form) a list holding one message of ``role``."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict):
            raise _BadRow(
                "wrong_type", f"{field_name!r} must be a string or a list of one {role} message, got {len(value)} items"
            )
        message = value[0]
        if _ROLES.get(str(message.get("role", "")).lower()) != role:
            raise _BadRow("unknown_role", f"{field_name!r}: expected a {role!r} message, got {message.get('role')!r}")
        if "content" not in message:
            raise _BadRow("missing_field", f"{field_name!r}: the message has no 'content'")
        return _content_text(message["content"], field_name)
    raise _BadRow("wrong_type", f"{field_name!r} must be a string or a message list, got {_type_name(value)}")


def _preference_normalize(row: dict, images: _ImageResolver) -> dict:
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise _BadRow("missing_field", f"no {key!r} field")
    rel, name = _row_image(row)
    prompt = _single_turn(row["prompt"], "prompt", "user")
    chosen = _single_turn(row["chosen"], "chosen", "assistant")
    rejected = _single_turn(row["rejected"], "rejected", "assistant")
    _check_markers(prompt, "prompt", has_image=rel is not None)
    _check_text(prompt, "prompt", marker_position=True)
    _check_text(chosen, "chosen")
    _check_text(rejected, "rejected")
    if chosen.strip() == rejected.strip():
        raise _BadRow("identical_pair", "'chosen' and 'rejected' are the same text: the pair carries no preference")
    image = images(rel, name) if rel is not None else None
    return {"image": image, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def load_preferences(
    path: PathLike | Sequence[PathLike],
    image_folder: PathLike | None = None,
    skip_bad_rows: bool = False,
    *,
    verify_images: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[Dataset, BadRowReport]:
    """Read preference pairs with TRL's DPO fields: ``image`` (or ``images``), ``prompt``, ``chosen``, ``rejected``.

    ``prompt``/``chosen``/``rejected`` are strings, or TRL's conversational form: a list with one user message
    (``prompt``) or one assistant message (``chosen``/``rejected``), whose content may be a list of parts.

    Args:
        path: One JSON/JSONL file or a list of them.
        image_folder: Folder of the images; default: each data file's directory.
        skip_bad_rows: Skip bad rows and count them per reason instead of raising.
        verify_images: Open each image once with PIL and ``verify()`` it; ``False`` only checks it exists.
        max_pixels: Images with more pixels than this are bad rows.

    Returns:
        ``(dataset, report)``: a ``datasets.Dataset`` with columns ``image`` (absolute path or ``None``), ``prompt``
        (a literal ``<image>`` kept where the data put it), ``chosen``, ``rejected``; and the :class:`BadRowReport`.

    Raises:
        DataError: As :func:`load_conversations`.
    """
    jobs = [(file, _folder(image_folder, file), _preference_normalize) for file in _files(path)]
    return _read(jobs, PREFERENCE_FEATURES, skip_bad_rows, verify_images, max_pixels)


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

    Records are grouped by ``image`` (an absolute path, so two spellings of one file group together). A group takes
    the place of its first record; inside it the records keep their order, so the result is deterministic and
    independent of hashing. Text-only records (``image`` is ``None``) stay as they are. The first record's
    ``<image>`` marker stays; later records' markers are removed (one image, one marker). A record whose first user
    turn is nothing but the marker (an image-only question) cannot follow another one and starts a new conversation.

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
