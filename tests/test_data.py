"""Dataset readers: every format reads into normalized records; every kind of bad row is named or counted."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import datasets as hf_datasets
import numpy as np
import pytest
from datasets import Dataset
from PIL import Image

from vlm_chat import data
from vlm_chat.data import (
    REASONS,
    DataError,
    load_captions,
    load_conversations,
    load_preferences,
    pack_by_image,
)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """tmp_path/img with two small PNGs, a text file named .png and a truncated PNG; a valid PNG outside it."""
    img = tmp_path / "img"
    (img / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 6), (255, 0, 0)).save(img / "a.png")
    Image.new("L", (4, 4), 128).save(img / "sub" / "b.png")
    (img / "notes.png").write_text("this is not an image")
    # Truncated inside the pixel data: the header still opens, only verify() notices.
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(img / "noise.png")
    (img / "trunc.png").write_bytes((img / "noise.png").read_bytes()[:-40])
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "secret.png")
    return img


def write_jsonl(path: Path, rows: list, blank_lines_after: tuple[int, ...] = ()) -> Path:
    lines = []
    for i, row in enumerate(rows):
        lines.append(row if isinstance(row, str) else json.dumps(row))
        if i in blank_lines_after:
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def llava(i, image="a.png", *turns):
    turns = turns or (("human", "<image>\nWhat color is it?"), ("gpt", "Red."))
    row = {"id": f"r{i}", "conversations": [{"from": f, "value": v} for f, v in turns]}
    if image is not None:
        row["image"] = image
    return row


# ---------------------------------------------------------------------------------------------------------------------
# Formats that read


def test_llava_json_array_reads_into_normalized_records(tmp_path, folder):
    rows = [
        llava(0, "a.png", ("human", "<image>\nWhat color?"), ("gpt", "Red."), ("human", "Shape?"), ("gpt", "Square.")),
        llava(1, "sub/b.png", ("human", "Describe.\n<image>"), ("gpt", "A gray square.")),
        llava(2, None, ("human", "What is 2+2?"), ("gpt", "4")),
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows, indent=2))
    ds, report = load_conversations(path, image_folder=folder)

    assert isinstance(ds, Dataset) and len(ds) == 3 and report.skipped == 0 and report.rows_read == 3
    assert ds[0]["image"] == str((folder / "a.png").resolve())
    assert ds[0]["messages"] == [
        {"role": "user", "content": "<image>\nWhat color?"},  # the marker stays where the data put it
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Shape?"},
        {"role": "assistant", "content": "Square."},
    ]
    assert ds[1]["image"] == str((folder / "sub" / "b.png").resolve())
    assert ds[1]["messages"][0]["content"] == "Describe.\n<image>"
    assert ds[2]["image"] is None  # text-only
    assert os.path.isabs(ds[0]["image"])


def test_llava_jsonl_defaults_image_folder_to_the_file_directory(tmp_path, folder):
    path = write_jsonl(folder / "train.jsonl", [llava(0), llava(1, "sub/b.png")], blank_lines_after=(0,))
    ds, _ = load_conversations(str(path))
    assert [Path(r["image"]).name for r in ds] == ["a.png", "b.png"]


def test_messages_format_with_string_and_part_contents(tmp_path, folder):
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Red"}, {"type": "text", "text": "."}]},
                {"role": "user", "content": "And the shape?"},
                {"role": "assistant", "content": "A square."},
            ],
            "images": ["a.png"],
        },
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "images": []},
    ]
    ds, _ = load_conversations(write_jsonl(tmp_path / "chat.jsonl", rows), image_folder=folder)
    assert ds[0]["image"] == str((folder / "a.png").resolve())
    assert [m["content"] for m in ds[0]["messages"]] == ["<image>\nWhat color?", "Red.", "And the shape?", "A square."]
    assert ds[1]["image"] is None and ds[1]["messages"][1] == {"role": "assistant", "content": "Hello!"}


def test_format_is_detected_per_file(tmp_path, folder):
    a = write_jsonl(tmp_path / "a.jsonl", [llava(0)])
    b = write_jsonl(
        tmp_path / "b.jsonl",
        [
            {
                "messages": [{"role": "user", "content": "<image> Q"}, {"role": "assistant", "content": "A"}],
                "images": ["a.png"],
            }
        ],
    )
    ds, _ = load_conversations([a, b], image_folder=folder)
    assert [r["messages"][1]["content"] for r in ds] == ["Red.", "A"]
    # A file detected as LLaVA does not silently accept messages-format rows.
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [llava(0), {"messages": []}])
    with pytest.raises(DataError, match=r"mixed\.jsonl, row 1 \(line 2\).*no 'conversations' field"):
        load_conversations(mixed, image_folder=folder)


def test_captions_jsonl_and_imagefolder_metadata(tmp_path, folder):
    jl = write_jsonl(tmp_path / "caps.jsonl", [{"image": "a.png", "caption": "A red square."}])
    ds, _ = load_captions(jl, image_folder=folder)
    assert ds.to_list() == [{"image": str((folder / "a.png").resolve()), "caption": "A red square."}]

    # datasets' imagefolder convention: metadata.jsonl next to the images, file_name relative to it, caption or text.
    write_jsonl(
        folder / "metadata.jsonl",
        [{"file_name": "a.png", "caption": "red"}, {"file_name": "sub/b.png", "text": "gray"}],
    )
    ds, _ = load_captions(folder)
    assert [(Path(r["image"]).name, r["caption"]) for r in ds] == [("a.png", "red"), ("b.png", "gray")]


def test_preferences_plain_and_conversational(tmp_path, folder):
    rows = [
        {"image": "a.png", "prompt": "<image>\nWhat color?", "chosen": "Red.", "rejected": "Blue."},
        {
            "images": ["sub/b.png"],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Shape?"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A square."}]}],
            "rejected": [{"role": "assistant", "content": "A dog."}],
        },
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    ]
    ds, _ = load_preferences(write_jsonl(tmp_path / "prefs.jsonl", rows), image_folder=folder)
    assert ds[0] == {
        "image": str((folder / "a.png").resolve()),
        "prompt": "<image>\nWhat color?",
        "chosen": "Red.",
        "rejected": "Blue.",
    }
    assert ds[1]["prompt"] == "<image>\nShape?" and ds[1]["chosen"] == "A square." and ds[1]["rejected"] == "A dog."
    assert ds[2]["image"] is None


def test_utf8_bom_and_unicode_text(tmp_path, folder):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(
        "\ufeff".encode() + json.dumps(llava(0, "a.png", ("human", "<image>\n颜色? 🎨"), ("gpt", "红"))).encode()
    )
    ds, _ = load_conversations(path, image_folder=folder)
    assert ds[0]["messages"][0]["content"] == "<image>\n颜色? 🎨"


# ---------------------------------------------------------------------------------------------------------------------
# Bad rows: each raises an error naming file, row, line and id; or is skipped and counted

BAD_CONVERSATIONS = [
    ("missing_image", llava(1, "nope.png"), "'nope.png' not found"),
    ("missing_image", llava(1, "sub"), "is not a file"),
    ("unreadable_image", llava(1, "notes.png"), "cannot be read as an image"),
    ("unreadable_image", llava(1, "trunc.png"), "cannot be read as an image"),
    ("no_assistant_turn", llava(1, "a.png", ("human", "<image>\nQ")), "no assistant turn"),
    ("roles_not_alternating", llava(1, "a.png", ("human", "<image>\nQ"), ("human", "Q2"), ("gpt", "A")), "turn 1"),
    ("roles_not_alternating", llava(1, "a.png", ("gpt", "A"), ("human", "<image>\nQ")), "first turn"),
    ("roles_not_alternating", llava(1, "a.png", ("human", "<image>\nQ"), ("gpt", "A"), ("human", "Q2")), "no answer"),
    ("empty_text", llava(1, "a.png", ("human", "<image>\nQ"), ("gpt", "   ")), "turn 1 (assistant) is empty"),
    ("empty_text", llava(1, None, ("human", ""), ("gpt", "A")), "turn 0 (user) is empty"),
    ("wrong_type", {"id": "r1", "image": "a.png", "conversations": "hi"}, "'conversations' must be a list"),
    ("wrong_type", llava(1, "a.png", ("human", "<image>\nQ"), ("gpt", 42)), "'value' must be a string"),
    ("wrong_type", llava(1, 7), "'image' must be a path or a list of paths"),
    ("wrong_type", [1, 2, 3], "must be a JSON object, got a list"),
    ("missing_field", {"id": "r1", "image": "a.png", "conversations": [{"from": "human"}]}, "no 'value' field"),
    ("unknown_role", llava(1, "a.png", ("system", "Be nice."), ("human", "Q"), ("gpt", "A")), "'system'"),
    ("image_markers", llava(1, "a.png", ("human", "<image>\n<image>\nQ"), ("gpt", "A")), "2 '<image>' markers"),
    ("image_markers", llava(1, None, ("human", "<image>\nQ"), ("gpt", "A")), "no image"),
    ("image_markers", llava(1, "a.png", ("human", "Q"), ("gpt", "A"), ("human", "<image>"), ("gpt", "B")), "turn 2"),
    ("multiple_images", {**llava(1), "image": ["a.png", "sub/b.png"]}, "lists 2 images"),
    ("path_escape", llava(1, "../secret.png"), "outside the image folder"),
    ("path_escape", llava(1, "sub/../../secret.png"), "outside the image folder"),
    ("malformed_json", '{"id": "r1", "image": "a.png", "conversations": [', "malformed JSON"),
]


@pytest.mark.parametrize(
    "reason,row,detail", BAD_CONVERSATIONS, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BAD_CONVERSATIONS)]
)
def test_bad_conversation_row_names_file_row_line_and_id(tmp_path, folder, reason, row, detail):
    # A good row, a blank line, then the bad row: row index 1 sits on line 3.
    path = write_jsonl(tmp_path / "conv.jsonl", [llava(0), row], blank_lines_after=(0,))
    with pytest.raises(DataError) as info:
        load_conversations(path, image_folder=folder)
    err = info.value
    assert (err.reason, err.row, err.line, err.file) == (reason, 1, 3, str(path))
    message = str(err)
    assert message.startswith(f"{path}, row 1 (line 3")
    assert detail in message
    if isinstance(row, dict):
        assert err.row_id == "r1" and "id 'r1'" in message


@pytest.mark.parametrize(
    "reason,row,detail", BAD_CONVERSATIONS, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BAD_CONVERSATIONS)]
)
def test_bad_conversation_row_is_skipped_and_counted(tmp_path, folder, reason, row, detail):
    path = write_jsonl(tmp_path / "conv.jsonl", [llava(0), row, llava(2)])
    ds, report = load_conversations(path, image_folder=folder, skip_bad_rows=True)
    assert len(ds) == 2 and report.counts == {reason: 1} and report.rows_read == 3
    assert "row 1" in report.examples[0] and detail in report.examples[0]


def test_absolute_and_symlinked_escapes_are_refused_and_never_opened(tmp_path, folder, monkeypatch):
    secret = tmp_path / "secret.png"
    os.symlink(secret, folder / "link.png")
    rows = [llava(0, str(secret)), llava(1, "link.png"), llava(2, "../secret.png"), llava(3, str(folder / "a.png"))]
    opened = []
    real_open = Image.open
    monkeypatch.setattr(
        data.Image, "open", lambda fp, *a, **k: opened.append(os.path.realpath(fp)) or real_open(fp, *a, **k)
    )

    path = write_jsonl(tmp_path / "conv.jsonl", rows)
    with pytest.raises(DataError, match=r"row 0 .*outside the image folder.*\[path_escape\]"):
        load_conversations(path, image_folder=folder)
    ds, report = load_conversations(path, image_folder=folder, skip_bad_rows=True)
    assert report.counts == {"path_escape": 3}
    # An absolute path that stays inside the folder is fine; the outside file was never opened by any call.
    assert [r["image"] for r in ds] == [str((folder / "a.png").resolve())]
    assert str(secret.resolve()) not in opened and opened == [str((folder / "a.png").resolve())]


def test_messages_format_bad_rows(tmp_path, folder):
    def row(content, images=("a.png",), role="user"):
        return {
            "id": 5,
            "messages": [{"role": role, "content": content}, {"role": "assistant", "content": "A"}],
            "images": list(images),
        }

    cases = [
        (row([{"type": "video"}]), "wrong_type", "unsupported part type 'video'"),
        (row([{"type": "image", "url": "http://x/y.png"}]), "wrong_type", "put the path in the row's 'images'"),
        (row([{"type": "text", "text": None}]), "wrong_type", "needs a string 'text'"),
        (row([{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q"}]), "image_markers", "2 '<image>'"),
        (row([{"type": "image"}, {"type": "text", "text": "Q"}], images=()), "image_markers", "no image"),
        (row("Q", role="system"), "unknown_role", "'system' is not supported"),
        ({"id": 5, "messages": [{"role": "user"}], "images": []}, "missing_field", "no 'content' field"),
    ]
    for bad, reason, detail in cases:
        path = write_jsonl(tmp_path / "m.jsonl", [row("Q"), bad])
        with pytest.raises(DataError) as info:
            load_conversations(path, image_folder=folder, format="messages")
        assert info.value.reason == reason and detail in str(info.value), (bad, str(info.value))
        assert "m.jsonl, row 1 (line 2, id 5)" in str(info.value)


def test_skip_bad_rows_counts_per_reason_and_logs_a_summary(tmp_path, folder, caplog):
    rows = [
        llava(0),
        llava(1, "nope.png"),
        "{not json",
        llava(3, "notes.png"),
        llava(4, "gone.png"),
        llava(5, "../secret.png"),
        llava(6, "a.png", ("human", "<image>\nQ")),
        llava(7, "sub/b.png"),
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="vlm_chat.data"):
        ds, report = load_conversations(path, image_folder=folder, skip_bad_rows=True)
    assert [Path(r["image"]).name for r in ds] == ["a.png", "b.png"]
    assert report.counts == {
        "missing_image": 2,
        "malformed_json": 1,
        "unreadable_image": 1,
        "path_escape": 1,
        "no_assistant_turn": 1,
    }
    assert report.skipped == 6 and report.rows_read == 8
    assert set(report.counts) <= set(REASONS)
    assert "skipped 6 of 8 rows: missing_image=2" in caplog.text and "mixed.jsonl" in caplog.text


def test_jsonl_line_numbers_count_blank_lines_and_rows_do_not(tmp_path, folder):
    path = tmp_path / "lines.jsonl"
    path.write_text("\n".join(["", json.dumps(llava(0)), "", "", json.dumps(llava(1)), '{"id": "r2", oops}', ""]))
    with pytest.raises(DataError) as info:
        load_conversations(path, image_folder=folder)
    assert (info.value.row, info.value.line, info.value.reason) == (2, 6, "malformed_json")
    assert "lines.jsonl, row 2 (line 6): malformed JSON at column" in str(info.value)


def test_malformed_json_array_is_a_file_error_even_when_skipping(tmp_path, folder):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "r0"},\n  {"id": "r1",, }\n]')
    with pytest.raises(DataError, match=r"broken\.json: malformed JSON at line 3, column"):
        load_conversations(path, image_folder=folder, skip_bad_rows=True)


def test_file_level_errors(tmp_path, folder):
    with pytest.raises(DataError, match=r"missing\.jsonl: data file not found"):
        load_conversations(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="image folder .* does not exist"):
        load_conversations(write_jsonl(tmp_path / "c.jsonl", [llava(0)]), image_folder=tmp_path / "nowhere")
    with pytest.raises(DataError, match="no metadata.jsonl"):
        load_captions(folder / "sub")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"caption": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_captions(latin1, image_folder=folder)


def test_images_are_checked_once_and_over_the_pixel_cap_refused(tmp_path, folder, monkeypatch):
    calls = []
    real_open = Image.open
    monkeypatch.setattr(data.Image, "open", lambda fp, *a, **k: calls.append(fp) or real_open(fp, *a, **k))
    path = write_jsonl(tmp_path / "c.jsonl", [llava(i) for i in range(5)])
    ds, _ = load_conversations(path, image_folder=folder)
    assert len(ds) == 5 and len(calls) == 1  # five rows, one image, one open

    with pytest.raises(DataError, match=r"8x6 pixels.*\[unreadable_image\]"):
        load_conversations(path, image_folder=folder, max_pixels=47)
    ds, _ = load_conversations(path, image_folder=folder, max_pixels=48)
    assert len(ds) == 5
    # verify_images=False checks existence only: a non-image file passes, a missing one does not.
    ds, _ = load_conversations(write_jsonl(tmp_path / "n.jsonl", [llava(0, "notes.png")]), folder, verify_images=False)
    assert len(ds) == 1


def test_caption_and_preference_bad_rows(tmp_path, folder):
    caption_cases = [
        ({"image": "a.png"}, "missing_field", "no 'caption'"),
        ({"image": "a.png", "caption": " "}, "empty_text", "is empty"),
        ({"image": "a.png", "caption": ["red"]}, "wrong_type", "must be a string"),
        ({"image": "a.png", "caption": "<image> red"}, "image_markers", "contains '<image>'"),
        ({"image": None, "caption": "red"}, "missing_field", "needs an image"),
        ({"image": "/etc/passwd", "caption": "red"}, "path_escape", "outside the image folder"),
    ]
    for bad, reason, detail in caption_cases:
        path = write_jsonl(tmp_path / "caps.jsonl", [{"image": "a.png", "caption": "ok"}, bad])
        with pytest.raises(DataError) as info:
            load_captions(path, image_folder=folder)
        assert (
            info.value.reason == reason
            and detail in str(info.value)
            and "caps.jsonl, row 1 (line 2)" in str(info.value)
        )

    ok = {"id": "p", "image": "a.png", "prompt": "<image>\nQ", "chosen": "Red.", "rejected": "Blue."}
    preference_cases = [
        ({**ok, "rejected": " Red. "}, "identical_pair", "same text"),
        ({k: v for k, v in ok.items() if k != "chosen"}, "missing_field", "no 'chosen'"),
        ({**ok, "chosen": "<image> Red."}, "image_markers", "chosen contains"),
        ({**ok, "prompt": "<image><image>Q"}, "image_markers", "2 '<image>' markers"),
        ({**ok, "chosen": [{"role": "user", "content": "Red."}]}, "unknown_role", "expected a 'assistant' message"),
        ({**ok, "chosen": 3}, "wrong_type", "must be a string or a message list"),
        ({**ok, "image": "notes.png"}, "unreadable_image", "cannot be read"),
    ]
    for bad, reason, detail in preference_cases:
        path = write_jsonl(tmp_path / "prefs.jsonl", [ok, bad])
        with pytest.raises(DataError) as info:
            load_preferences(path, image_folder=folder)
        assert info.value.reason == reason and detail in str(info.value), str(info.value)
        assert "prefs.jsonl, row 1 (line 2, id 'p')" in str(info.value)
    ds, report = load_preferences(path, image_folder=folder, skip_bad_rows=True)
    assert len(ds) == 1 and report.counts == {"unreadable_image": 1}


# ---------------------------------------------------------------------------------------------------------------------
# pack_by_image


def qa(image, q, a, marker=True):
    return {
        "image": image,
        "messages": [
            {"role": "user", "content": ("<image>\n" if marker else "") + q},
            {"role": "assistant", "content": a},
        ],
    }


def test_pack_by_image_merges_in_first_appearance_order():
    records = [
        qa("/a.png", "Q1", "A1"),
        qa("/b.png", "Q2", "A2"),
        qa(None, "T", "t", marker=False),
        qa("/a.png", "Q3", "A3"),
        qa("/b.png", "Q4", "A4"),
        qa("/a.png", "Q5", "A5"),
    ]
    packed = pack_by_image(records)
    assert [r["image"] for r in packed] == ["/a.png", "/b.png", None]
    assert [m["content"] for m in packed[0]["messages"]] == ["<image>\nQ1", "A1", "Q3", "A3", "Q5", "A5"]
    assert [m["content"] for m in packed[1]["messages"]] == ["<image>\nQ2", "A2", "Q4", "A4"]
    assert packed[2] == records[2]
    assert sum(m["content"].count("<image>") for r in packed for m in r["messages"]) == 2
    assert records[3]["messages"][0]["content"] == "<image>\nQ3"  # input left untouched
    assert pack_by_image(records) == packed  # deterministic


def test_pack_by_image_max_turns_and_image_only_questions():
    records = [qa("/a.png", f"Q{i}", f"A{i}") for i in range(5)]
    packed = pack_by_image(records, max_turns=2)
    assert [[m["content"] for m in r["messages"] if m["role"] == "user"] for r in packed] == [
        ["<image>\nQ0", "Q1"],
        ["<image>\nQ2", "Q3"],
        ["<image>\nQ4"],
    ]
    # A question that is only the marker cannot follow another about the same image: it would become empty.
    lone = {
        "image": "/a.png",
        "messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "cap"}],
    }
    packed = pack_by_image([records[0], lone, records[1]])
    assert [len(r["messages"]) for r in packed] == [2, 4]
    assert packed[1]["messages"][0]["content"] == "<image>" and packed[1]["messages"][2]["content"] == "Q1"
    with pytest.raises(ValueError, match="max_turns"):
        pack_by_image(records, max_turns=0)


def test_pack_by_image_on_a_loaded_dataset(tmp_path, folder):
    rows = [llava(0), llava(1, "sub/b.png"), llava(2, "./a.png", ("human", "Shape?\n<image>"), ("gpt", "Square."))]
    ds, _ = load_conversations(write_jsonl(tmp_path / "c.jsonl", rows), image_folder=folder)
    packed = pack_by_image(ds)
    assert isinstance(packed, Dataset) and packed.features == ds.features and len(packed) == 2
    # "a.png" and "./a.png" are one file: grouped.
    assert [m["content"] for m in packed[0]["messages"]] == ["<image>\nWhat color is it?", "Red.", "Shape?", "Square."]


# ---------------------------------------------------------------------------------------------------------------------
# Data from the ecosystem: datasets.Dataset objects, load_dataset names and folders, metadata.jsonl conversations


def conv_turns(q="<image>\nWhat color?", a="Red."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def test_dataset_with_image_feature_carries_in_memory_images_as_bytes_load_image_decodes(folder):
    from vlm_chat.images import load_image

    in_memory = Image.new("RGB", (5, 3), (0, 200, 0))
    from_file = Image.open(folder / "a.png")  # has a filename: datasets stores its path, not its bytes
    ds = Dataset.from_dict({"image": [in_memory, from_file], "caption": ["green", "red"]})
    assert isinstance(ds.features["image"], hf_datasets.Image)

    out, report = load_captions(ds)
    assert report.rows_read == 2 and report.skipped == 0
    # An Arrow column has one type: both images travel as encoded bytes, the file's bytes exactly.
    assert out.features["image"].dtype == "binary" and out["caption"] == ["green", "red"]
    assert out[1]["image"] == (folder / "a.png").read_bytes()
    assert np.array_equal(np.asarray(load_image(out[0]["image"])), np.asarray(in_memory))
    assert np.array_equal(np.asarray(load_image(out[1]["image"])), np.asarray(Image.open(folder / "a.png")))
    hash(out[0]["image"])  # the training feature cache keys on the image value

    # Only files: the column stays a column of absolute paths (nothing read into memory).
    files_only = Dataset.from_dict({"image": [str(folder / "a.png")], "caption": ["red"]}).cast_column(
        "image", hf_datasets.Image()
    )
    out, _ = load_captions(files_only)
    assert out.to_list() == [{"image": str((folder / "a.png").resolve()), "caption": "red"}]


def test_dataset_messages_with_images_list_and_arrow_nulls(folder):
    """TRL's vision form: ``images`` a list of Image, content parts whose missing keys Arrow fills with null."""
    rows = [
        {
            "images": [Image.new("RGB", (4, 4), (9, 9, 9))],
            "messages": [
                {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Q?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A."}]},
            ],
        },
        {
            "images": [],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
            ],
        },
    ]
    ds = Dataset.from_list(rows)
    out, _ = load_conversations(ds)
    assert [m["content"] for m in out[0]["messages"]] == ["<image>\nQ?", "A."]
    assert isinstance(out[0]["image"], bytes) and Image.open(io.BytesIO(out[0]["image"])).size == (4, 4)
    assert out[1]["image"] is None and out[1]["messages"][1] == {"role": "assistant", "content": "Hello"}

    prefs = Dataset.from_list(
        [{"images": [Image.new("RGB", (4, 4))], "prompt": "<image>\nQ", "chosen": "yes", "rejected": "no"}]
    )
    out, _ = load_preferences(prefs)
    assert out[0]["prompt"] == "<image>\nQ" and isinstance(out[0]["image"], bytes)


def test_dataset_rows_get_the_same_checks_and_messages(folder):
    ds = Dataset.from_dict(
        {
            "id": ["a", "b", "c"],
            "image": ["a.png", "../secret.png", "sub/b.png"],
            "conversations": [conv_turns(), conv_turns(), conv_turns(a="  ")],
        }
    )
    # Path strings in a dataset are relative to an image folder, which an in-memory dataset does not have.
    with pytest.raises(DataError, match=r"Dataset \(3 rows\): 'image' holds the path 'a.png'.*pass image_folder="):
        load_conversations(ds)
    with pytest.raises(DataError) as info:
        load_conversations(ds, image_folder=folder)
    assert (info.value.reason, info.value.row, info.value.line, info.value.row_id) == ("path_escape", 1, None, "b")
    assert str(info.value).startswith("Dataset (3 rows), row 1 (id 'b'): image path '../secret.png' resolves outside")
    out, report = load_conversations(ds, image_folder=folder, skip_bad_rows=True)
    assert out["image"] == [str((folder / "a.png").resolve())] and report.counts == {"path_escape": 1, "empty_text": 1}

    # Bytes that are no image, a null caption (Arrow's form of a missing field), a missing column.
    bad = Dataset.from_dict({"image": [b"not a png", (folder / "a.png").read_bytes()], "caption": ["x", None]})
    with pytest.raises(
        DataError, match=r"row 0: the in-memory image in 'image' \(9 bytes\) cannot be read.*unreadable"
    ):
        load_captions(bad)
    out, report = load_captions(bad, skip_bad_rows=True)
    assert len(out) == 0 and report.counts == {"unreadable_image": 1, "missing_field": 1}
    with pytest.raises(DataError, match=r"captions need a 'caption' or 'text' column; the dataset has \['image'\]"):
        load_captions(Dataset.from_dict({"image": ["a.png"]}), image_folder=folder)


def test_dataset_image_feature_paths_are_held_to_an_explicit_image_folder(tmp_path, folder):
    image = hf_datasets.Image()
    ds = Dataset.from_dict({"image": [str(folder / "a.png"), str(tmp_path / "secret.png")], "caption": ["a", "b"]})
    ds = ds.cast_column("image", image)
    out, _ = load_captions(ds)  # no folder named: the files datasets itself would open
    assert [Path(p).name for p in out["image"]] == ["a.png", "secret.png"]
    with pytest.raises(DataError, match=r"row 1: image path '.*secret.png' resolves outside .*\[path_escape\]"):
        load_captions(ds, image_folder=folder)


def test_load_dataset_names_and_folders(tmp_path, folder):
    cache = {"cache_dir": str(tmp_path / "hf_cache")}
    # datasets' own imagefolder builder, by name: images come back as paths in the folder.
    write_jsonl(
        folder / "metadata.jsonl", [{"file_name": "a.png", "text": "red"}, {"file_name": "sub/b.png", "text": "gray"}]
    )
    out, _ = load_captions("imagefolder", dataset_kwargs={"data_dir": str(folder), **cache})
    assert sorted(zip((Path(p).name for p in out["image"]), out["caption"])) == [("a.png", "red"), ("b.png", "gray")]

    # A local folder of JSONL that datasets reads (no metadata.jsonl): path strings are relative to that folder.
    local = tmp_path / "local"
    local.mkdir()
    write_jsonl(local / "train.jsonl", [{"image": "a.png", "conversations": conv_turns()}])
    Image.new("RGB", (3, 3)).save(local / "a.png")
    out, _ = load_conversations(local, dataset_kwargs=cache)
    assert out["image"] == [str((local / "a.png").resolve())]

    # A save_to_disk folder (a DatasetDict: the split is picked), in-memory images kept through the round trip.
    saved = tmp_path / "saved"
    hf_datasets.DatasetDict(
        {"train": Dataset.from_dict({"image": [Image.new("RGB", (2, 2))], "caption": ["tiny"]})}
    ).save_to_disk(saved)
    out, _ = load_captions(saved)
    assert out["caption"] == ["tiny"] and isinstance(out[0]["image"], bytes)
    with pytest.raises(DataError, match=r"has splits \['train'\], not 'test'; pass split="):
        load_captions(saved, split="test")

    # A hub name offline: a clear error naming what was tried, not a traceback from deep inside datasets.
    with pytest.raises(DataError, match=r"no such file or folder, and datasets.load_dataset\('someone/nothing'"):
        load_conversations("someone/nothing", dataset_kwargs=cache)
    with pytest.raises(DataError, match=r"nowhere\.jsonl: data file not found"):
        load_conversations("nowhere.jsonl")


def test_conversations_and_preferences_from_an_image_folder_with_metadata(folder):
    write_jsonl(
        folder / "metadata.jsonl",
        [
            {"file_name": "a.png", "conversations": conv_turns()},
            {"file_name": "../secret.png", "conversations": conv_turns()},
        ],
    )
    with pytest.raises(DataError, match=r"metadata\.jsonl, row 1 \(line 2\): image path '../secret.png'.*path_escape"):
        load_conversations(folder)
    out, report = load_conversations(folder, skip_bad_rows=True)
    assert out["image"] == [str((folder / "a.png").resolve())] and report.counts == {"path_escape": 1}

    write_jsonl(folder / "metadata.jsonl", [{"file_name": "sub/b.png", "prompt": "Q", "chosen": "A", "rejected": "B"}])
    out, _ = load_preferences(folder)
    assert out[0]["image"] == str((folder / "sub" / "b.png").resolve())
    write_jsonl(folder / "metadata.jsonl", [{"file_name": "a.png", "image": "a.png", "conversations": conv_turns()}])
    with pytest.raises(DataError, match="row has both 'image' and 'file_name'"):
        load_conversations(folder)


def test_jsonl_whose_first_row_is_a_list_is_still_jsonl(tmp_path, folder):
    path = tmp_path / "c.jsonl"
    path.write_text("[1, 2]\n" + json.dumps(llava(1)) + "\n")
    with pytest.raises(DataError) as info:
        load_conversations(path, image_folder=folder)
    assert (info.value.row, info.value.line, info.value.reason) == (0, 1, "wrong_type")
    ds, report = load_conversations(path, image_folder=folder, skip_bad_rows=True)
    assert len(ds) == 1 and report.counts == {"wrong_type": 1}
    # A one-line array is an array; a broken one is still a file error.
    path.write_text("[" + json.dumps(llava(0)) + ", " + json.dumps(llava(1)) + "]\n")
    assert len(load_conversations(path, image_folder=folder)[0]) == 2
    path.write_text("[\n" + json.dumps(llava(0)) + ",\n]\n")
    with pytest.raises(DataError, match=r"c\.jsonl: malformed JSON at line 3"):
        load_conversations(path, image_folder=folder, skip_bad_rows=True)


def test_paths_the_file_system_cannot_take_are_bad_rows(tmp_path, folder):
    # Each of these raised OSError, UnicodeEncodeError or RecursionError before the fuzz tests found them.
    rows = [
        {"image": "a" * 300 + ".png", "caption": "too long a name"},
        {"image": "\ud800.png", "caption": "a lone surrogate"},
        {"image": "a.png", "caption": "fine"},
    ]
    path = write_jsonl(tmp_path / "caps.jsonl", rows)
    with pytest.raises(DataError, match=r"row 0 \(line 1\): image 'a{300}\.png' cannot be looked up.*\[missing_image\]"):
        load_captions(path, folder)
    ds, report = load_captions(path, folder, skip_bad_rows=True)
    assert ds["caption"] == ["fine"] and report.counts == {"missing_image": 1, "wrong_type": 1}
    assert "row 1 (line 2): 'image' is not a usable file name" in report.examples[1]
