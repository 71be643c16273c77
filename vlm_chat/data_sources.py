"""Where the data readers' rows come from, and the loop that validates them.

A reader's ``path`` may be any of these, or a list of them:

- a JSON array or JSONL file: parsed here with the standard ``json`` module, so every row keeps its number and line;
- a folder with ``metadata.jsonl`` (the ``datasets`` imagefolder convention): the same, with the folder as image folder;
- a ``datasets.Dataset`` (or a ``DatasetDict`` and a split), e.g. with an ``Image`` feature holding decoded images;
- a folder written by ``Dataset.save_to_disk``, any other local dataset folder, or a dataset name, for
  ``datasets.load_dataset``.

Every source yields the same :class:`Row` objects, so one row check (``vlm_chat.data_checks``) and one error format
cover them all. Why files are not parsed with ``datasets.load_dataset("json")``: Arrow's JSON reader infers one schema
for the whole file, so a wrong type in one row fails the file (or is silently coerced) without a row number, and a
malformed line carries no line number.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, Features, Value

from vlm_chat.data_checks import BadRow, BadRowReport, DataError, EncodedImage, ImageResolver, PathLike, type_name

# The readers' logger: one name to configure for every reader, whichever module logs.
logger = logging.getLogger("vlm_chat.data")

#: What a reader's ``path`` may be (or a list of these).
DataSource = PathLike | Dataset | DatasetDict

#: Suffixes that make a missing path a missing data file rather than a dataset name for ``load_dataset``.
_FILE_SUFFIXES = {".json", ".jsonl"}

_DATASET_BATCH = 1000  # rows converted from Arrow at a time


@dataclass
class Row:
    """One row of a source, before validation.

    Attributes:
        index: 0-based, counting rows (blank JSONL lines are not rows).
        line: 1-based JSONL line; ``None`` in a JSON array or a dataset.
        value: The parsed row.
        parse_error: Why the line did not parse, if it did not.
    """

    index: int
    line: int | None
    value: Any = None
    parse_error: str | None = None


@dataclass
class Source:
    """Rows from one place, and how to resolve their images.

    Attributes:
        label: Names the source in errors: a file path, or a dataset's description.
        rows: The rows, read lazily (once).
        folder: The folder image path strings are relative to (``None``: such strings are an error).
        contain_features: Hold the paths of ``datasets.Image`` values to ``folder`` too (an explicit image folder).
        columns: A dataset's column names, checked before any row is read; ``None`` for a file.
        hint: Added to a missing-column error.
    """

    label: str
    rows: Iterable[Row]
    folder: Path | None
    contain_features: bool = False
    columns: list[str] | None = None
    hint: str = ""


# --------------------------------------------------------------------------------------------------------------------
# Files


def iter_file_rows(file: Path) -> Iterator[Row]:
    """Yield the rows of a JSON array file or a JSONL file (sniffed from the first non-blank character).

    Args:
        file: The data file.

    Returns:
        An iterator of :class:`Row`; a JSONL line that does not parse is a row with ``parse_error`` set. A file whose
        first character is ``[`` is a JSON array, unless its first line is a whole JSON value followed by more lines
        (JSONL whose first row is a list).

    Raises:
        DataError: The file is missing, a directory, not UTF-8, or a malformed JSON array (which cannot be
            resynchronized row by row, so ``skip_bad_rows`` cannot help).
    """
    try:
        with open(file, encoding="utf-8-sig") as f:
            head = f.read(4096).lstrip()
            f.seek(0)
            if head.startswith("["):
                try:
                    rows = json.load(f)
                except json.JSONDecodeError as e:
                    # "Extra data" after a first line that parses on its own: JSONL whose first row is a list (a bad
                    # row, not a broken file). Anything else cannot be resynchronized row by row.
                    if e.msg != "Extra data" or not _first_line_parses(f):
                        raise DataError(
                            f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}", file=file
                        ) from e
                    rows = None
                except RecursionError as e:
                    raise DataError("malformed JSON: nested too deeply to parse", file=file) from e
                if rows is not None:
                    for i, value in enumerate(rows):
                        yield Row(i, None, value)
                    return
                f.seek(0)
            index = 0
            for lineno, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    yield Row(index, lineno, json.loads(text))
                except json.JSONDecodeError as e:
                    hint = " (a .json file must hold a JSON array of rows; JSONL holds one object per line)"
                    hint = hint if file.suffix == ".json" else ""
                    yield Row(index, lineno, parse_error=f"malformed JSON at column {e.colno}: {e.msg}{hint}")
                except RecursionError:
                    yield Row(index, lineno, parse_error="malformed JSON: nested too deeply to parse")
                index += 1
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=file) from e
    except FileNotFoundError as e:
        raise DataError("data file not found", file=file) from e
    except IsADirectoryError as e:
        raise DataError("is a directory, expected a JSON or JSONL file", file=file) from e


def _first_line_parses(f) -> bool:
    f.seek(0)
    for text in f:
        if text.strip():
            try:
                json.loads(text)
            except (json.JSONDecodeError, RecursionError):
                return False
            return True
    return False


# --------------------------------------------------------------------------------------------------------------------
# Datasets


def _holds_images(feature: Any) -> bool:
    if isinstance(feature, datasets.Image):
        return True
    if isinstance(feature, dict):
        return any(_holds_images(f) for f in feature.values())
    return _holds_images(getattr(feature, "feature", None)) if hasattr(feature, "feature") else False


def _wrap_images(value: Any, feature: Any) -> Any:
    """Mark the stored ``{"bytes", "path"}`` values of ``Image`` features, so no plain dict passes for an image."""
    if value is None:
        return None
    if isinstance(feature, datasets.Image):
        return EncodedImage(value.get("bytes"), value.get("path")) if isinstance(value, dict) else value
    if isinstance(feature, dict) and isinstance(value, dict):
        return {k: _wrap_images(v, feature.get(k)) for k, v in value.items()}
    inner = getattr(feature, "feature", None)
    if inner is not None and isinstance(value, list):
        return [_wrap_images(v, inner) for v in value]
    return value


def dataset_rows(ds: Dataset) -> Iterator[Row]:
    """Yield a dataset's rows in the readers' form.

    Rows are read from Arrow as stored, so an ``Image`` feature gives its encoded bytes or path (no pixel decoding);
    those values become :class:`EncodedImage`. A null field is dropped, as if absent: one Arrow schema covers every
    row, so a field one row lacks is null in that row.

    Args:
        ds: The dataset.

    Returns:
        An iterator of :class:`Row` (``line`` is ``None``).
    """
    image_columns = {name: f for name, f in ds.features.items() if _holds_images(f)}
    arrow = ds.with_format("arrow")
    for start in range(0, len(ds), _DATASET_BATCH):
        for i, stored in enumerate(arrow[start : start + _DATASET_BATCH].to_pylist()):
            value = {
                k: _wrap_images(v, image_columns[k]) if k in image_columns else v
                for k, v in stored.items()
                if v is not None
            }
            yield Row(start + i, None, value)


def _dataset_label(ds: Dataset) -> str:
    name = ds.info.dataset_name
    split = f", split {str(ds.split)!r}" if ds.split is not None else ""
    return f"Dataset{' ' + repr(name) if name else ''} ({len(ds)} rows{split})"


def _pick_split(dd: DatasetDict, split: str | None, label: str) -> Dataset:
    if split not in dd:
        raise DataError(f"has splits {sorted(dd)}, not {split!r}; pass split=", file=label)
    return dd[split]


def _load_dataset(name: str, split: str | None, kwargs: dict, label: str, prefix: str, hint: str = "") -> Dataset:
    try:
        ds = datasets.load_dataset(name, split=split, **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (ConnectionError offline, ...)
        offline = (
            " (HF_HUB_OFFLINE is set: only local and cached datasets load)" if datasets.config.HF_HUB_OFFLINE else ""
        )
        raise DataError(
            f"{prefix}datasets.load_dataset({name!r}, split={split!r}) failed: {type(e).__name__}: {e}{offline}{hint}",
            file=label,
        ) from e
    if isinstance(ds, DatasetDict):
        ds = _pick_split(ds, split, label)
    if not isinstance(ds, Dataset):
        raise DataError(
            f"datasets.load_dataset gave a {type(ds).__name__}; pass a split, without streaming", file=label
        )
    return ds


def _dataset_source(ds: Dataset, label: str, folder: Path | None, explicit: bool, hint: str = "") -> Source:
    return Source(label, dataset_rows(ds), folder, contain_features=explicit, columns=ds.column_names, hint=hint)


def _source(item: Any, image_folder: Path | None, split: str | None, kwargs: dict) -> Source:
    explicit = image_folder is not None
    if isinstance(item, DatasetDict):
        item = _pick_split(item, split, f"DatasetDict {sorted(item)}")
    if isinstance(item, Dataset):
        return _dataset_source(item, _dataset_label(item), image_folder, explicit)
    path = Path(item)
    if path.is_file():
        return Source(str(path), iter_file_rows(path), image_folder if explicit else path.parent)
    if path.is_dir():
        if (path / "metadata.jsonl").is_file():
            # The imagefolder convention: file names are relative to the folder, whatever image_folder says.
            return Source(str(path / "metadata.jsonl"), iter_file_rows(path / "metadata.jsonl"), path)
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            try:
                saved = datasets.load_from_disk(str(path))
            except Exception as e:  # noqa: BLE001 - a damaged save fails in many ways; all mean "unreadable"
                raise DataError(f"cannot be read by datasets.load_from_disk: {type(e).__name__}: {e}", file=path) from e
            ds = _pick_split(saved, split, str(path)) if isinstance(saved, DatasetDict) else saved
            return _dataset_source(ds, str(path), image_folder, explicit)
        hint = (
            "; the folder has no metadata.jsonl (an image folder needs one: {'file_name': ..., and the row's fields} "
            "per line)"
        )
        ds = _load_dataset(str(path), split, kwargs, str(path), "", hint)
        return _dataset_source(ds, f"{path} (split {split!r})", image_folder if explicit else path, explicit, hint)
    if path.exists():
        raise DataError("not a regular file or folder", file=path)
    text = str(item)
    if path.suffix.lower() in _FILE_SUFFIXES or path.is_absolute() or text.startswith((".", "~")):
        raise DataError("data file not found", file=path)
    label = f"dataset {text!r} (split {split!r})"
    ds = _load_dataset(text, split, kwargs, label, "no such file or folder, and ")
    return _dataset_source(ds, label, image_folder, explicit)


def open_sources(
    path: DataSource | Sequence[DataSource],
    image_folder: PathLike | None,
    split: str | None = "train",
    dataset_kwargs: dict | None = None,
) -> list[Source]:
    """One :class:`Source` per item of ``path`` (see the module docstring for what an item may be).

    Args:
        path: A data source or a list of them.
        image_folder: The folder image paths are relative to; default: a data file's own folder (a dataset in memory
            has none). ``datasets.Image`` values that hold a path are held to it only when it is given.
        split: The split to read from a ``DatasetDict`` or ``load_dataset``.
        dataset_kwargs: More keyword arguments for ``datasets.load_dataset`` (``data_dir``, ``data_files``, ...).

    Returns:
        The sources, in order; a dataset from ``load_dataset`` is loaded here, files are opened when read.

    Raises:
        DataError: A missing file, a dataset that does not load, a missing split.
        TypeError: An item of another type.
    """
    if isinstance(path, (str, os.PathLike, Dataset, DatasetDict)):
        items = [path]
    elif isinstance(path, Iterable):
        items = list(path)
    else:
        raise TypeError(
            f"path: expected a file, folder, dataset name, Dataset or a list of them, got {type_name(path)}"
        )
    if not items:
        raise ValueError("path: no data files given")
    for i, item in enumerate(items):
        if not isinstance(item, (str, os.PathLike, Dataset, DatasetDict)):
            raise TypeError(f"path[{i}]: expected a file, folder, dataset name or Dataset, got {type(item).__name__}")
    folder = Path(image_folder) if image_folder is not None else None
    return [_source(item, folder, split, dict(dataset_kwargs or {})) for item in items]


# --------------------------------------------------------------------------------------------------------------------
# The read loop


def _row_id(value: Any) -> Any:
    if isinstance(value, dict) and isinstance(value.get("id"), (str, int)) and not isinstance(value.get("id"), bool):
        return value["id"]
    return None


def _check_columns(source: Source, required: Sequence[tuple[str, ...]], what: str) -> None:
    for alternatives in required:
        if not set(alternatives) & set(source.columns):
            need = " or ".join(repr(a) for a in alternatives)
            raise DataError(
                f"{what} need a {need} column; the dataset has {source.columns}{source.hint}", file=source.label
            )


def _to_dataset(records: list[dict], features: Features) -> Dataset:
    if any(isinstance(r["image"], bytes) for r in records):
        # Images held in memory travel as their encoded bytes (``load_image`` decodes them as it decodes a file, and
        # bytes are hashable, so the training feature cache keys on them as on paths). An Arrow column has one type:
        # the rows whose image is a file carry that file's bytes too.
        features = Features({**features, "image": Value("binary")})
        for r in records:
            if isinstance(r["image"], str):
                r["image"] = Path(r["image"]).read_bytes()
    return Dataset.from_dict({name: [r[name] for r in records] for name in features}, features=features)


def read(
    sources: list[Source],
    make_normalizer: Callable[[], Callable[[dict, ImageResolver], dict]],
    features: Features,
    *,
    required: Sequence[tuple[str, ...]],
    what: str,
    skip_bad_rows: bool,
    verify_images: bool,
    max_pixels: int,
) -> tuple[Dataset, BadRowReport]:
    """Validate every row of every source into records.

    Args:
        sources: From :func:`open_sources`.
        make_normalizer: Gives each source its ``normalize(row, images) -> record`` (a fresh one: a normalizer may
            learn a source's format from its first rows).
        features: The records' features (``image`` a string column; binary when images are held in memory).
        required: Column alternatives a dataset must have (one of each tuple), e.g. ``[("caption", "text")]``.
        what: The rows' kind in messages ("captions", ...).
        skip_bad_rows: Count bad rows in the report instead of raising on the first.
        verify_images: Open and ``verify()`` each image once.
        max_pixels: The pixel cap.

    Returns:
        ``(dataset, report)``.

    Raises:
        DataError: A bad row (unless skipped), or a source-level error.
    """
    report = BadRowReport()
    records: list[dict] = []
    for source in sources:
        if source.columns is not None:
            _check_columns(source, required, what)
        images = ImageResolver(
            source.folder,
            source.label,
            verify=verify_images,
            max_pixels=max_pixels,
            contain_features=source.contain_features,
        )
        normalize = make_normalizer()
        kept_before, skipped_before = len(records), report.skipped
        for row in source.rows:
            report.rows_read += 1
            try:
                if row.parse_error is not None:
                    raise BadRow("malformed_json", row.parse_error)
                if not isinstance(row.value, dict):
                    raise BadRow("wrong_type", f"a row must be a JSON object, got {type_name(row.value)}")
                records.append(normalize(row.value, images))
            except BadRow as bad:
                error = DataError(
                    bad.detail,
                    file=source.label,
                    row=row.index,
                    line=row.line,
                    row_id=_row_id(row.value),
                    reason=bad.reason,
                )
                if not skip_bad_rows:
                    raise error from None
                logger.debug("skipping bad row: %s", error)
                report.add(error)
        kept, skipped = len(records) - kept_before, report.skipped - skipped_before
        logger.info("%s: %d rows kept, %d skipped", source.label, kept, skipped)
    if report.skipped:
        logger.warning("%s in %s", report.summary(), ", ".join(s.label for s in sources))
    return _to_dataset(records, features), report
