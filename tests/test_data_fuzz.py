"""Property-based tests of the data readers (hypothesis): whatever the rows hold, a reader ends in clean records or in a
``DataError`` naming the source, row and reason; never another exception, a write, or an image opened outside its
folder. With ``skip_bad_rows`` the bad rows are counted and exactly the good ones kept.

Run ``pytest tests/test_data_fuzz.py --hypothesis-show-statistics`` to see how many cases each property ran.
"""

from __future__ import annotations

import collections
import io
import json
import os
import tempfile
from pathlib import Path
from unittest import mock

import datasets as hf_datasets
import pytest
from datasets import Dataset
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm_chat.data import (
    IMAGE_MARKER,
    REASONS,
    DataError,
    load_captions,
    load_conversations,
    load_preferences,
    pack_by_image,
)

pytestmark = pytest.mark.timeout(300)

# No example database: a run writes nothing into the checkout (failures print their reproducing example instead).
FUZZ = settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
KNOWN_REASONS = set(REASONS) | {"file"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An image folder with good, broken and tricky entries, a secret image outside it, and a place for data files."""
    root = tmp_path_factory.mktemp("fuzz")
    folder = root / "img"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 6), (255, 0, 0)).save(folder / "a.png")
    Image.new("L", (4, 4), 128).save(folder / "sub" / "b.png")
    (folder / "notes.png").write_text("this is not an image")
    buf = io.BytesIO()
    Image.effect_noise((32, 32), 64).save(buf, format="PNG")
    (folder / "trunc.png").write_bytes(buf.getvalue()[:-40])
    (folder / "dir.png").mkdir()
    secret = root / "secret.png"
    Image.new("RGB", (8, 8), (0, 0, 255)).save(secret)
    os.symlink(secret, folder / "link.png")  # inside the folder, pointing out
    os.symlink(folder / "loop.png", folder / "loop.png")  # a symlink loop
    data = root / "data"
    data.mkdir()
    png = io.BytesIO()
    Image.new("RGB", (3, 3), (0, 255, 0)).save(png, format="PNG")
    return {"folder": folder, "secret": secret, "data": data, "png": png.getvalue(), "trunc": buf.getvalue()[:-40]}


def snapshot(*dirs: Path) -> dict:
    """Every entry under the folders with its size and modification time: a reader must change none of it."""
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            st_ = os.lstat(p)
            out[str(p)] = (st_.st_size, st_.st_mtime_ns)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Strategies

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def mostly(draw, good, bad, one_bad_in: int = 4):
    """A draw from ``bad`` one time in ``one_bad_in``, else from ``good``: enough clean rows to check what is kept."""
    return draw(bad) if draw(st.integers(1, one_bad_in)) == 1 else draw(good)


GOOD_TEXTS = [
    "What color?",
    "Red.",
    "A square.",
    "Two circles.",
    f"{IMAGE_MARKER}\nWhat is it?",
    f"Shape?\n{IMAGE_MARKER}",
]
BAD_TEXTS = [IMAGE_MARKER, IMAGE_MARKER * 2, f"a{IMAGE_MARKER}b{IMAGE_MARKER}", "", "  ", "\n"]
texts = st.sampled_from(GOOD_TEXTS) | st.sampled_from(BAD_TEXTS) | st.text(max_size=24)

GOOD_PATHS = ["a.png", "sub/b.png", "./a.png", "sub/../a.png", "<ABS_INSIDE>"]
BAD_PATHS = [
    "../secret.png", "sub/../../secret.png", "link.png", "loop.png", "notes.png", "trunc.png", "dir.png",
    "missing.png", "sub", "", " ", "a.png\x00", "/", "~/x.png", "\ud800.png", "a" * 300 + ".png", "../img/a.png",
    "<ABS_SECRET>", "<ABS_FOLDER>", "//etc/passwd",
]  # fmt: skip


def paths(world, surrogates=True):
    def concrete(name):
        return {
            "<ABS_SECRET>": str(world["secret"]),
            "<ABS_INSIDE>": str(world["folder"] / "a.png"),
            "<ABS_FOLDER>": str(world["folder"]),
        }.get(name, name)

    bad = [n for n in BAD_PATHS if surrogates or "\ud800" not in n]  # Arrow cannot hold a lone surrogate
    return st.builds(
        lambda good, bad, pick: concrete(good if pick else bad),
        st.sampled_from(GOOD_PATHS),
        st.sampled_from(bad) | st.text(alphabet="ab./_\\", max_size=10),
        st.booleans(),
    )


@st.composite
def mutated(draw, value, top=True):
    """Half the time ``value`` as is; else with some nodes replaced by arbitrary JSON, object keys dropped or added."""
    if top and draw(st.booleans()):
        return value
    if draw(st.integers(0, 7)) == 0:
        return draw(json_values)
    if isinstance(value, dict):
        out = {k: draw(mutated(v, False)) for k, v in value.items() if draw(st.integers(0, 7)) != 0}
        if draw(st.integers(0, 7)) == 0:
            out[draw(st.sampled_from(["image", "images", "id", "caption", "messages", "x"]))] = draw(json_values)
        return out
    if isinstance(value, list):
        return [draw(mutated(v, False)) for v in value]
    return value


def text(draw):
    return mostly(draw, st.sampled_from(GOOD_TEXTS), texts)


def parts(draw):
    good = st.lists(
        st.builds(lambda t: {"type": "text", "text": t}, st.sampled_from(GOOD_TEXTS)), min_size=1, max_size=2
    )
    odd = st.sampled_from(
        [{"type": "image"}, {"type": "image", "url": "http://x/y.png"}, {"type": "video"}, {"type": "text"}]
    )
    bad = st.lists(st.builds(lambda t: {"type": "text", "text": t}, texts) | odd, max_size=3) | texts
    return mostly(draw, good | st.sampled_from(GOOD_TEXTS), bad)


@st.composite
def llava_rows(draw, world):
    n = draw(st.integers(0, 4))
    speakers = st.sampled_from(["human", "gpt", "user", "assistant", "system", "GPT", "bot", ""])
    turns = []
    for i in range(2 * n):
        alternate = "human" if i % 2 == 0 else "gpt"
        who = mostly(draw, st.just(alternate), speakers, 6)
        turns.append({"from": who, "value": text(draw)})
    row = {"id": draw(st.integers(0, 99) | st.text(max_size=3)), "conversations": turns}
    if draw(st.booleans()):
        row["image"] = draw(paths(world))
    return draw(mutated(row))


@st.composite
def message_rows(draw, world):
    n = draw(st.integers(0, 3))
    messages = [
        {
            "role": mostly(draw, st.just("user" if i % 2 == 0 else "assistant"), st.sampled_from(["system", "bot"]), 6),
            "content": parts(draw),
        }
        for i in range(2 * n)
    ]
    row = {"messages": messages, "images": draw(st.lists(paths(world), max_size=mostly(draw, st.just(1), st.just(2))))}
    return draw(mutated(row))


@st.composite
def caption_rows(draw, world):
    image_key, text_key = draw(st.sampled_from([("image", "caption"), ("file_name", "text"), ("image", "text")]))
    return draw(mutated({image_key: draw(paths(world)), text_key: text(draw)}))


@st.composite
def preference_rows(draw, world):
    def turn(role):
        if draw(st.booleans()):
            return text(draw)
        return [{"role": mostly(draw, st.just(role), st.just("system"), 6), "content": parts(draw)}]

    row = {"prompt": turn("user"), "chosen": turn("assistant"), "rejected": turn("assistant")}
    if draw(st.booleans()):
        row["images" if draw(st.booleans()) else "image"] = draw(paths(world))
    return draw(mutated(row))


KINDS = {
    "llava": (llava_rows, lambda p, **k: load_conversations(p, format="llava", **k)),
    "messages": (message_rows, lambda p, **k: load_conversations(p, format="messages", **k)),
    "detect": (llava_rows, load_conversations),
    "captions": (caption_rows, load_captions),
    "preferences": (preference_rows, load_preferences),
}


# ---------------------------------------------------------------------------------------------------------------------
# What every outcome must look like


def attempt(load, source, **kwargs):
    """The reader's result, or the DataError it raised; any other exception fails the test."""
    try:
        return load(source, **kwargs)
    except DataError as err:
        return err


def check_error(err: DataError, label: str, n_rows: int, lines: list[int | None] | None = None) -> None:
    message = str(err)
    assert err.file == label and message.startswith(label), message
    assert err.reason in KNOWN_REASONS and message.endswith(f"[{err.reason}]"), message
    if err.reason == "file":
        assert err.row is None
        return
    assert err.row is not None and 0 <= err.row < n_rows and f", row {err.row}" in message, message
    if lines is not None:
        assert err.line == lines[err.row], (err.line, lines)


def check_records(ds: Dataset, folder: Path) -> None:
    """Kept records are clean: images inside the folder (or in memory), alternating turns, markers where allowed."""
    inside = os.path.realpath(folder)
    for record in ds.to_list():
        image = record["image"]
        if isinstance(image, str):
            assert os.path.isabs(image) and Path(image).is_relative_to(inside) and Path(image).is_file(), image
        else:
            assert image is None or isinstance(image, bytes)
        if "messages" in record:
            roles = [m["role"] for m in record["messages"]]
            assert roles and roles == ["user", "assistant"] * (len(roles) // 2), roles
            texts_ = [m["content"] for m in record["messages"]]
        else:
            texts_ = [record.get(k) for k in ("caption", "prompt", "chosen", "rejected") if k in record]
        assert all(t.strip() for t in texts_), texts_
        first_allows_marker = "caption" not in record
        assert all(IMAGE_MARKER not in t for t in texts_[1:]), texts_
        assert texts_[0].count(IMAGE_MARKER) <= (1 if first_allows_marker and image is not None else 0), texts_


def check_both_modes(load, source, label, n_rows, folder, lines=None):
    """Strict and skipping reads agree; returns the skipping read's (dataset, report), or None on a source error."""
    strict = attempt(load, source, image_folder=folder)
    lenient = attempt(load, source, image_folder=folder, skip_bad_rows=True)
    for outcome in (strict, lenient):
        if isinstance(outcome, DataError):
            check_error(outcome, label, n_rows, lines)
    if isinstance(lenient, DataError):
        assert lenient.reason == "file", str(lenient)  # a skipping read raises only for the source as a whole
        event("source error")
        return None
    ds, report = lenient
    # Shown by --hypothesis-show-statistics: how often rows were kept and which reasons came up.
    event("some rows kept" if len(ds) else "no row kept")
    for reason in report.counts:
        event(f"bad row: {reason}")
    assert report.rows_read == n_rows and len(ds) + report.skipped == n_rows
    assert set(report.counts) <= set(REASONS)
    if isinstance(strict, DataError) and strict.reason != "file":
        assert report.counts.get(strict.reason, 0) >= 1  # the row the strict read stopped at is counted
    elif not isinstance(strict, DataError):
        assert report.skipped == 0 and strict[0].to_list() == ds.to_list()
    check_records(ds, folder)
    return ds, report


def write_jsonl(path: Path, rows: list) -> list[int]:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return list(range(1, len(rows) + 1))


# ---------------------------------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("kind", sorted(KINDS))
@FUZZ
@given(data=st.data())
def test_any_rows_end_in_clean_records_or_a_named_error(world, kind, data):
    strategy, load = KINDS[kind]
    # A file starting with a one-line list is a JSON array (of its items), not JSONL: first rows that are lists are
    # tested in tests/test_data.py.
    rows = data.draw(
        st.lists(strategy(world), max_size=5).filter(lambda rows: not rows or not isinstance(rows[0], list)),
        label="rows",
    )
    with tempfile.TemporaryDirectory(dir=world["data"]) as tmp:
        path = Path(tmp) / "rows.jsonl"
        lines = write_jsonl(path, rows)
        before = snapshot(world["folder"], Path(tmp))
        opened = []
        real_open = Image.open
        with mock.patch.object(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k)):
            check_both_modes(load, path, str(path), len(rows), world["folder"], lines)
        assert snapshot(world["folder"], Path(tmp)) == before  # nothing written, nothing changed
        secret = os.path.realpath(world["secret"])
        assert all(os.path.realpath(fp) != secret for fp in opened if isinstance(fp, (str, os.PathLike)))


@pytest.mark.parametrize("kind", ["llava", "messages", "captions", "preferences"])
@FUZZ
@given(data=st.data())
def test_skipping_keeps_exactly_the_rows_that_read_alone(world, kind, data):
    """With skip_bad_rows, the kept records are those of the rows that read cleanly on their own, in order, and the
    counts are the reasons those that do not give when read alone."""
    strategy, load = KINDS[kind]
    # Read alone, a row that is a list would be a JSON array file: such rows are left to the test above.
    rows = data.draw(
        st.lists(strategy(world), min_size=1, max_size=4).filter(
            lambda rows: not any(isinstance(r, list) for r in rows)
        ),
        label="rows",
    )
    with tempfile.TemporaryDirectory(dir=world["data"]) as tmp:
        path = Path(tmp) / "all.jsonl"
        write_jsonl(path, rows)
        result = attempt(load, path, image_folder=world["folder"], skip_bad_rows=True)
        kept, reasons = [], collections.Counter()
        for i, row in enumerate(rows):
            one = Path(tmp) / f"row{i}.jsonl"
            write_jsonl(one, [row])
            alone = attempt(load, one, image_folder=world["folder"])
            if isinstance(alone, DataError):
                check_error(alone, str(one), 1, [1])
                reasons[alone.reason] += 1
            else:
                kept += alone[0].to_list()
        if "file" in reasons:  # a source-level error (none expected from a JSONL file with an image folder)
            assert isinstance(result, DataError) and result.reason == "file"
            return
        ds, report = result
        assert ds.to_list() == kept and report.counts == dict(reasons)
        event(
            f"{len(kept)} of {len(rows)} rows kept" if len(rows) < 3 else ("some rows kept" if kept else "no row kept")
        )


def malformed_lines(world):
    good = {"image": "a.png", "caption": "A red square."}
    return st.lists(
        st.one_of(
            st.just(json.dumps(good)),
            json_values.map(json.dumps),
            st.text(max_size=20).filter(lambda t: "\n" not in t and "\r" not in t),
            st.sampled_from(
                ['{"image": "a.png", "caption": "x"', "[" * 3000, '{"a": 1}}', "nul\x00l", ",", "\ufeff{}"]
            ),
            st.just(""),
            st.integers(1, 60).map(lambda n: json.dumps(good)[:n]),
        ),
        max_size=8,
    )


def sniffed_shape(body: str):
    """How the readers' documented rule reads a file: "jsonl", "broken", or the list of rows of a JSON array.

    A file whose first character is ``[`` is a JSON array, unless it fails to parse only because more follows a first
    line that is a whole JSON value (JSONL whose first row is a list).
    """
    if not body.lstrip().startswith("["):
        return "jsonl"
    try:
        return json.loads(body)
    except RecursionError:
        return "broken"
    except json.JSONDecodeError as e:
        first = next(line for line in body.split("\n") if line.strip())
        try:
            json.loads(first)
        except (json.JSONDecodeError, RecursionError):
            return "broken"
        return "jsonl" if e.msg == "Extra data" else "broken"


@FUZZ
@given(data=st.data())
def test_malformed_json_and_jsonl_name_the_file_and_line(world, data):
    lines = data.draw(malformed_lines(world), label="lines")
    as_array = data.draw(st.booleans(), label="as_array")
    with tempfile.TemporaryDirectory(dir=world["data"]) as tmp:
        path = Path(tmp) / ("rows.json" if as_array else "rows.jsonl")
        text = ("[" + ",\n".join(lines) + "]") if as_array else "\n".join(lines)
        path.write_text(text, encoding="utf-8")
        body = text[1:] if text.startswith("\ufeff") else text  # a leading byte-order mark is allowed
        shape = sniffed_shape(body)
        if shape == "broken":  # an array that does not parse cannot be read row by row: a file error
            result = attempt(load_captions, path, image_folder=world["folder"], skip_bad_rows=True)
            assert isinstance(result, DataError) and result.reason == "file", result
            check_error(result, str(path), 0)
            assert "malformed JSON" in str(result)
            return
        if shape != "jsonl":
            assert check_both_modes(load_captions, path, str(path), len(shape), world["folder"]) is not None
            return
        # JSONL: rows are the non-blank lines, each named by its own line number.
        numbered = [(n, line) for n, line in enumerate(body.split("\n"), start=1) if line.strip()]
        result = check_both_modes(
            load_captions, path, str(path), len(numbered), world["folder"], [n for n, _ in numbered]
        )
        assert result is not None
        malformed = 0
        for _, line in numbered:
            try:
                json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                malformed += 1
        assert result[1].counts.get("malformed_json", 0) == malformed


def test_invalid_utf8_and_deep_nesting_are_named_errors(world, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"image": "a.png", "caption": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl: not UTF-8 text .*\[file\]"):
        load_captions(bad, world["folder"], skip_bad_rows=True)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"deep\.json: malformed JSON: nested too deeply to parse \[file\]"):
        load_captions(deep, world["folder"])
    deep_line = tmp_path / "deep.jsonl"
    deep_line.write_text(json.dumps({"image": "a.png", "caption": "ok"}) + "\n" + "[" * 100_000 + "\n")
    ds, report = load_captions(deep_line, world["folder"], skip_bad_rows=True)
    assert len(ds) == 1 and report.counts == {"malformed_json": 1} and "nested too deeply" in report.examples[0]


@settings(max_examples=10, deadline=None, database=None)
@given(exchanges=st.integers(500, 3000), marker_turn=st.integers(0, 5))
def test_huge_conversations_read_whole_or_name_the_turn(world, exchanges, marker_turn):
    turns = []
    for i in range(exchanges):
        q = f"Question {i}?"
        turns += [{"from": "human", "value": (IMAGE_MARKER + "\n" + q) if i == marker_turn else q}]
        turns += [{"from": "gpt", "value": f"Answer {i}."}]
    with tempfile.TemporaryDirectory(dir=world["data"]) as tmp:
        path = Path(tmp) / "huge.jsonl"
        write_jsonl(path, [{"id": "big", "image": "a.png", "conversations": turns}])
        result = attempt(load_conversations, path, image_folder=world["folder"])
        if marker_turn == 0:
            ds, _ = result
            assert len(ds[0]["messages"]) == 2 * exchanges
        else:  # a marker after the first turn
            assert isinstance(result, DataError) and result.reason == "image_markers"
            assert f"turn {2 * marker_turn} (user) contains '<image>'" in str(result)


def image_values(world):
    return st.sampled_from([world["png"], world["trunc"], b"", b"GIF89a", b"\x89PNG\r\n\x1a\n", None])


@FUZZ
@given(data=st.data())
def test_datasets_get_the_same_checks(world, data):
    """In-memory images (bytes or Image feature), path strings and text columns of any one type per column."""
    n = data.draw(st.integers(1, 5), label="n")
    as_feature = data.draw(st.booleans(), label="as_image_feature")
    use_paths = data.draw(st.booleans(), label="use_paths")
    images = data.draw(
        st.lists(paths(world, surrogates=False) if use_paths else image_values(world), min_size=n, max_size=n)
    )
    caption_type = data.draw(st.sampled_from(["text", "int", "none", "list"]), label="caption_type")
    captions = data.draw(
        st.lists(
            {
                "text": texts,
                "int": st.integers(-(2**63), 2**63 - 1),
                "none": st.none(),
                "list": st.lists(texts, max_size=2),
            }[caption_type],
            min_size=n,
            max_size=n,
        )
    )
    ds = Dataset.from_dict({"image": images, "caption": captions})
    if as_feature and not use_paths:
        ds = ds.cast_column("image", hf_datasets.Image())
    label = f"Dataset ({n} rows)"
    result = check_both_modes(load_captions, ds, label, n, world["folder"])
    if use_paths and result is not None:
        # The same rows as JSONL keep the same records: one validation for every source.
        with tempfile.TemporaryDirectory(dir=world["data"]) as tmp:
            path = Path(tmp) / "same.jsonl"
            write_jsonl(path, [{"image": i, "caption": c} for i, c in zip(images, captions)])
            from_file = attempt(load_captions, path, image_folder=world["folder"], skip_bad_rows=True)
            assert from_file[0].to_list() == result[0].to_list()


@st.composite
def packable_records(draw):
    records = []
    for _ in range(draw(st.integers(0, 8))):
        image = draw(st.sampled_from(["/a.png", "/b.png", None, b"\x89PNG-bytes"]))
        first = draw(st.sampled_from(["Q", f"{IMAGE_MARKER}\nQ", f"Q\n{IMAGE_MARKER}", IMAGE_MARKER]))
        if image is None:
            first = "Q"
        messages = [{"role": "user", "content": first}, {"role": "assistant", "content": "A"}]
        for _ in range(draw(st.integers(0, 2))):
            messages += [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
        records.append({"image": image, "messages": messages})
    return records


@FUZZ
@given(records=packable_records(), max_turns=st.none() | st.integers(1, 4))
def test_pack_by_image_keeps_every_exchange_in_order(records, max_turns):
    packed = pack_by_image(records, max_turns=max_turns)

    def answers(recs, image):
        return [m["content"] for r in recs if r["image"] == image for m in r["messages"] if m["role"] == "assistant"]

    for image in {r["image"] for r in records}:
        assert answers(packed, image) == answers(records, image)  # nothing lost, nothing reordered per image
    for r in packed:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert sum(m["content"].count(IMAGE_MARKER) for m in r["messages"]) <= 1
        assert all(m["content"].strip() for m in r["messages"])
        exchanges = len(roles) // 2
        if max_turns is not None and exchanges > max_turns:  # only a record longer than max_turns on its own
            assert any(r["messages"] == x["messages"] for x in records)
