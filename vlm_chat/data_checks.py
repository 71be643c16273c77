"""Row validation for the data readers (``vlm_chat.data``): the errors, the skip report, the text and turn checks, and
the image resolver that refuses paths leaving their image folder.

Everything here is about one row at a time and knows nothing of where rows come from (``vlm_chat.data_sources``) or
of the three formats (``vlm_chat.data``). A check that fails raises :class:`BadRow` with one of :data:`REASONS`; the
read loop adds the source, row, line and id and turns it into a :class:`DataError`, or counts it in a
:class:`BadRowReport` when bad rows are skipped.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

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

USER_ROLES = {"user": "user", "human": "user"}
ASSISTANT_ROLES = {"assistant": "assistant", "gpt": "assistant"}
ROLES = {**USER_ROLES, **ASSISTANT_ROLES}

PathLike = str | os.PathLike


class DataError(ValueError):
    """A data file or one of its rows is unusable.

    Attributes:
        file: The data at fault: a file path, or a description of a ``datasets.Dataset`` (``"dataset 'x' (split
            'train')"``, ``"in-memory Dataset (12 rows)"``).
        row: 0-based index of the row in the file or dataset (``None`` for a file-level error).
        line: 1-based line of the row in a JSONL file (``None`` for JSON arrays, datasets and file-level errors).
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
        """Count one skipped row (and keep its message while fewer than ``max_examples`` are kept).

        Args:
            error: The row's error.
        """
        self.counts[error.reason] = self.counts.get(error.reason, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))

    def summary(self) -> str:
        """One line: ``skipped 3 of 10 rows: missing_image=2, malformed_json=1``."""
        parts = ", ".join(f"{reason}={n}" for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])))
        return f"skipped {self.skipped} of {self.rows_read} rows" + (f": {parts}" if parts else "")


class BadRow(Exception):
    """Raised by a row check; the read loop adds source, row, line and id and turns it into a :class:`DataError`."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-row reason {reason!r}")
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def type_name(value: Any) -> str:
    """How a value's type is named in messages ("an object", "a list", "null", ...)."""
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        bytes: "bytes",
        type(None): "null",
        EncodedImage: "an image",
    }.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class EncodedImage:
    """A value of a ``datasets.Image`` feature in its stored form: encoded bytes, or a path ``datasets`` would open.

    Attributes:
        data: The encoded file (PNG, JPEG, ...) as bytes, or ``None``.
        path: The file it came from or names, or ``None``.
    """

    data: bytes | None
    path: str | None


class ImageResolver:
    """Turn a row's image into what the records carry, checking it once: a path inside the folder, or encoded bytes.

    - A string is a path relative to ``folder``; one that resolves outside it (``..``, an absolute path elsewhere, a
      symlink leading out) is refused before the file is touched.
    - An :class:`EncodedImage` with bytes (a ``datasets.Image`` value held in memory) becomes those bytes, which
      ``vlm_chat.images.load_image`` decodes like a file; one with only a path is the file ``datasets`` would open,
      held to ``folder`` too when ``contain_features`` is set (the caller named an image folder).

    Args:
        folder: The image folder, or ``None`` when there is none (a dataset in memory): string paths are then an error.
        source: The data's name in error messages.
        verify: Open each image once with PIL and ``verify()`` it; ``False`` only checks that a file exists.
        max_pixels: Images with more pixels than this are bad rows.
        contain_features: Hold the paths of ``datasets.Image`` values to ``folder`` as well.
    """

    def __init__(
        self, folder: Path | None, source: str, *, verify: bool, max_pixels: int, contain_features: bool = False
    ):
        if folder is not None and not folder.is_dir():
            raise DataError(f"image folder {str(folder)!r} does not exist or is not a directory", file=source)
        # realpath, so a symlink inside the folder that points outside it counts as an escape.
        self.folder = Path(os.path.realpath(folder)) if folder is not None else None
        self.source = source
        self.verify = verify
        self.max_pixels = max_pixels
        self.contain_features = contain_features and self.folder is not None
        self._checked: dict[Path | bytes, BadRow | None] = {}  # many rows share an image: open each one once

    def __call__(self, value: Any, field_name: str = "image") -> str | bytes:
        """Resolve and check one image value.

        Args:
            value: The row's image: a path string, an :class:`EncodedImage` or encoded bytes.
            field_name: The field it came from, for messages.

        Returns:
            The absolute path (a ``str``) of an image file inside the folder, or the encoded bytes of an image held
            in memory.

        Raises:
            BadRow: The image is missing, unreadable, over the pixel cap, outside the folder or of the wrong type.
            DataError: A path string with no image folder to resolve it in (a setting, not a row, is wrong).
        """
        if isinstance(value, (bytes, bytearray)):
            value = EncodedImage(bytes(value), None)
        if isinstance(value, EncodedImage):
            if value.data is not None:
                self._cached(value.data, lambda: self._check_bytes(value.data, field_name))
                return value.data
            if not isinstance(value.path, str) or not value.path:
                raise BadRow("missing_field", f"{field_name!r} holds an image with neither bytes nor a path")
            if not self.contain_features:
                # Where datasets itself would read it: absolute, or relative to the working directory.
                resolved = self._realpath(value.path, field_name)
                self._cached(resolved, lambda: self._check_file(value.path, resolved))
                return str(resolved)
            value = value.path
        return self._resolve_string(value, field_name)

    def _resolve_string(self, rel: Any, field_name: str) -> str:
        if not isinstance(rel, str):
            raise BadRow("wrong_type", f"{field_name!r} must be a string path, got {type_name(rel)}")
        if not rel.strip():
            raise BadRow("wrong_type", f"{field_name!r} is an empty path")
        if "\x00" in rel:
            raise BadRow("wrong_type", f"{field_name!r} contains a NUL byte")
        if self.folder is None:
            raise DataError(
                f"{field_name!r} holds the path {rel!r}, but no image folder was given to resolve it in; pass "
                "image_folder= (the folder image paths are relative to)",
                file=self.source,
            )
        # An absolute `rel` replaces the folder in the join; it then fails the containment test unless it points inside.
        resolved = self._realpath(str(self.folder / rel), field_name)
        if not resolved.is_relative_to(self.folder):
            raise BadRow(
                "path_escape", f"image path {rel!r} resolves outside the image folder {str(self.folder)!r}; refused"
            )
        self._cached(resolved, lambda: self._check_file(rel, resolved))
        return str(resolved)

    @staticmethod
    def _realpath(path: str, field_name: str) -> Path:
        try:
            return Path(os.path.realpath(path))
        except (OSError, ValueError) as e:  # a name the file system cannot encode (lone surrogates), or too long
            raise BadRow("wrong_type", f"{field_name!r} is not a usable file name ({type(e).__name__}: {e})") from e

    def _cached(self, key: Path | bytes, check) -> None:
        if key not in self._checked:
            self._checked[key] = check()
        bad = self._checked[key]
        if bad is not None:
            raise bad

    def _check_file(self, rel: str, path: Path) -> BadRow | None:
        try:
            is_file, exists = path.is_file(), path.exists()
        except OSError as e:  # ENAMETOOLONG and the like: no such file can exist
            return BadRow("missing_image", f"image {rel!r} cannot be looked up: {e.strerror or e}")
        if not is_file:
            what = "is not a file" if exists else "not found"
            return BadRow("missing_image", f"image {rel!r} {what} (looked at {str(path)!r})")
        return self._check_image(path, f"image {rel!r}") if self.verify else None

    def _check_bytes(self, data: bytes, field_name: str) -> BadRow | None:
        what = f"the in-memory image in {field_name!r} ({len(data):,} bytes)"
        if not data:
            return BadRow("unreadable_image", f"{what} is empty")
        return self._check_image(io.BytesIO(data), what) if self.verify else None

    def _check_image(self, fp: Path | io.BytesIO, what: str) -> BadRow | None:
        try:
            # open() reads the header only; verify() checks the file's structure (chunks, CRCs) without decoding pixels.
            with Image.open(fp) as im:
                width, height = im.size
                im.verify()
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files; all mean "unreadable"
            return BadRow("unreadable_image", f"{what} cannot be read as an image: {type(e).__name__}: {e}")
        if width <= 0 or height <= 0 or width * height > self.max_pixels:
            return BadRow(
                "unreadable_image",
                f"{what} is {width}x{height} pixels, outside 1..{self.max_pixels:,} pixels (decompression bomb?)",
            )
        return None


def one_image(value: Any, field_name: str) -> Any:
    """An optional image field: a path or image value, null, or a list of at most one of them."""
    if value is None or isinstance(value, (str, bytes, EncodedImage)):
        return value
    if isinstance(value, list):
        if len(value) > 1:
            raise BadRow("multiple_images", f"{field_name!r} lists {len(value)} images; one image per row is supported")
        return value[0] if value else None
    raise BadRow("wrong_type", f"{field_name!r} must be a path or a list of paths, got {type_name(value)}")


def row_image(row: dict) -> tuple[Any, str]:
    """The row's image from ``image``, ``images`` (TRL) or ``file_name`` (imagefolder metadata), and its field."""
    present = [name for name in ("image", "images", "file_name") if name in row]
    if len(present) > 1:
        raise BadRow("wrong_type", f"row has both {present[0]!r} and {present[1]!r}; use one")
    name = present[0] if present else "image"
    return one_image(row.get(name), name), name


# --------------------------------------------------------------------------------------------------------------------
# Text and turns


def content_text(content: Any, where: str) -> str:
    """A message content as text: a string, or a list of parts where ``{"type": "image"}`` becomes the marker.

    The layout is the one ``vlm_chat.prompting`` gives the same parts at inference: text parts are concatenated, and a
    part after an image part follows a newline, so ``[image, text "Q"]`` reads ``"<image>\\nQ"`` as in LLaVA data.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRow("wrong_type", f"{where}: content must be a string or a list of parts, got {type_name(content)}")
    pieces = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise BadRow("wrong_type", f"{where}, part {j}: must be an object, got {type_name(part)}")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise BadRow("wrong_type", f"{where}, part {j}: a text part needs a string 'text'")
            pieces.append(part["text"])
        elif kind == "image":
            # Keys Arrow filled with null (one struct type for all parts of a dataset column) carry nothing.
            inline = sorted(k for k in set(part) & {"image", "path", "url"} if part[k] is not None)
            if inline:
                raise BadRow(
                    "wrong_type",
                    f"{where}, part {j}: image parts are placeholders; put the path in the row's 'images' list, "
                    f"not in {inline[0]!r}",
                )
            pieces.append(IMAGE_MARKER)
        else:
            raise BadRow("wrong_type", f"{where}, part {j}: unsupported part type {kind!r} (use 'text' or 'image')")
    return "".join(p if i == 0 or pieces[i - 1] != IMAGE_MARKER else "\n" + p for i, p in enumerate(pieces))


def check_text(text: str, where: str, marker_position: bool = False) -> None:
    """Refuse a marker where none may stand, and empty text (a lone marker is content: an image-only question)."""
    if not marker_position and IMAGE_MARKER in text:
        raise BadRow("image_markers", f"{where} contains {IMAGE_MARKER!r}; it belongs in the user's first turn only")
    if not text.strip():
        raise BadRow("empty_text", f"{where} is empty")


def check_markers(text: str, where: str, has_image: bool) -> None:
    """At most one marker, and only in a row that has an image."""
    n = text.count(IMAGE_MARKER)
    if n > 1:
        raise BadRow("image_markers", f"{where} has {n} {IMAGE_MARKER!r} markers for one image")
    if n == 1 and not has_image:
        raise BadRow("image_markers", f"{where} has an {IMAGE_MARKER!r} marker but the row has no image")


def check_turns(messages: list[dict], has_image: bool) -> None:
    """Alternating user/assistant turns, starting with the user and ending with an answer; text and markers valid."""
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no_assistant_turn", f"no assistant turn among {len(messages)} turns: nothing to train on")
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            after = f"after {messages[i - 1]['role']!r}" if i else "as the first turn"
            raise BadRow("roles_not_alternating", f"turn {i} is {m['role']!r} {after}; expected {expected!r}")
    if messages[-1]["role"] != "assistant":
        raise BadRow("roles_not_alternating", f"the last turn ({len(messages) - 1}) is a user turn with no answer")
    check_markers(messages[0]["content"], "turn 0 (user)", has_image)
    for i, m in enumerate(messages):
        check_text(m["content"], f"turn {i} ({m['role']})", marker_position=i == 0)
