"""easy-VQA loader: split sizes, answer vocabulary, derived captions that match the pixels, conversations, subset."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_chat.datasets import easyvqa as E
from vlm_chat.datasets.shapes import COLOR_RGB, COLORS, SHAPES


def _q(question: str, answer: str, image_id: int = 0) -> E.VQASample:
    return E.VQASample("x.png", question, answer, image_id, E.answer_type(answer))


def test_split_sizes_match_the_dataset_card():
    train, val, test = E.load_split("train"), E.load_split("val"), E.load_split("test")
    # The card's counts: the package's train split is our train + val.
    assert len(train) + len(val) == 38_575 and len(test) == 9_673
    assert len({s.image_id for s in train}) == len(E.image_paths("train")) == 3_600
    assert len({s.image_id for s in val}) == len(E.image_paths("val")) == 400
    assert len({s.image_id for s in test}) == len(E.image_paths("test")) == 1_000
    # The card's yes/no counts.
    assert sum(s.answer_type == "yes/no" for s in train + val) == 28_407
    assert sum(s.answer_type == "yes/no" for s in test) == 7_136
    assert all(Path(s.image).is_file() for s in test[:50])
    assert all("/test/" in s.image.replace("\\", "/") for s in test) and all("/train/" in s.image for s in train[:100])
    with pytest.raises(ValueError, match="split must be one of"):
        E.load_split("validation")


def test_validation_split_is_a_fixed_disjoint_tenth_of_train():
    import hashlib

    import easy_vqa

    train, val = E.load_split("train"), E.load_split("val")
    train_ids, val_ids = {s.image_id for s in train}, {s.image_id for s in val}
    assert not train_ids & val_ids and val_ids == set(E.validation_image_ids()) == set(E.image_paths("val"))
    assert not set(E.image_paths("train").values()) & set(E.image_paths("val").values())
    # Together they are exactly the package's train questions, in its order.
    texts, answers, ids = easy_vqa.get_train_questions()
    package = list(zip(texts, answers, ids))
    assert sorted((s.question, s.answer, s.image_id) for s in train + val) == sorted(package)
    assert [(s.question, s.answer, s.image_id) for s in val] == [q for q in package if q[2] in val_ids]
    assert len(val_ids) == 400 == len(easy_vqa.get_train_image_paths()) // 10
    # Stable across runs and machines: a stored digest of the draw (a string seed, SHA-512-hashed by `random`).
    digest = hashlib.sha256(",".join(map(str, sorted(val_ids))).encode()).hexdigest()
    assert sorted(val_ids)[:8] == [2, 6, 8, 14, 18, 19, 30, 32] and digest.startswith("9fbc7fb9f5caee06")
    # Everything built for training comes from "train" alone.
    assert {s.image_id for s in E.balance_yes_no(train)} <= train_ids
    assert {p["image_id"] for p in E.preference_pairs("train")} <= train_ids
    assert {r.image_id for r in E.build_records("train")} == {f"easyvqa_train_{i}" for i in train_ids}
    sub = E.quick_eval_subset(500, split="val")
    assert len(sub) == 500 and {s.image_id for s in sub} <= val_ids


def test_answer_vocabulary():
    vocab = E.answer_vocabulary()
    assert len(vocab) == 13 and set(vocab) == set(COLORS) | set(SHAPES) | {"yes", "no"}
    assert Counter(E.answer_type(a) for a in vocab) == {"color": 8, "shape": 3, "yes/no": 2}
    with pytest.raises(ValueError, match="not an easy-VQA answer"):
        E.answer_type("purple")


def test_attributes_follow_answers_and_negations():
    assert E.image_attributes([_q("what color is the shape?", "red"), _q("what shape is in the image?", "circle")]) == (
        "red",
        "circle",
    )
    assert E.image_attributes([_q("what is the teal shape?", "triangle")]) == ("teal", "triangle")
    assert E.image_attributes([_q("is there not a blue shape?", "no")]) == ("blue", None)
    assert E.image_attributes([_q("is no circle present?", "yes")]) == (None, None)
    # Ruling out all shapes but one determines it.
    qs = [_q("is there a circle?", "no"), _q("does the image not contain a triangle?", "yes")]
    assert E.image_attributes(qs) == (None, "rectangle")
    with pytest.raises(ValueError, match="both 'red' and 'blue'"):
        E.image_attributes([_q("what color is the shape?", "red"), _q("is there a blue shape?", "yes")])
    assert E.derived_caption("red", "circle") == "A red circle."
    assert E.derived_caption("red", None) == "A red shape."
    assert E.derived_caption(None, "circle") == "A circle."
    assert E.derived_caption(None, None) is None


def test_derived_captions_match_the_pixels():
    train = E.load_split("train")
    captions = E.derived_captions(train)
    full = {i: c for i, c in captions.items() if len(c.split()) == 3 and "shape" not in c}
    assert len(full) == 3_217 and len(captions) == 3_575  # the counts derived_captions documents
    paths = E.image_paths("train")
    rgb_to_name = {v: k for k, v in COLOR_RGB.items()}
    for image_id in sorted(captions)[:200]:
        words = captions[image_id].rstrip(".").lower().split()
        pixels = np.asarray(Image.open(paths[image_id]).convert("RGB")).reshape(-1, 3)
        values, counts = np.unique(pixels, axis=0, return_counts=True)
        # The most frequent exact palette colour is the shape's colour (edges are anti-aliased blends).
        palette = [
            (c, tuple(int(x) for x in v)) for v, c in zip(values, counts) if tuple(int(x) for x in v) in rgb_to_name
        ]
        color = rgb_to_name[max(palette)[1]]
        if words[1] in COLORS:
            assert words[1] == color, (image_id, captions[image_id])


def test_conversations_hold_all_questions_of_an_image():
    train = E.load_split("train")
    convs = E.conversations(train)
    assert len(convs) == 3_600 and all(len(c) == 1 for c in convs.values())
    by_image = E.group_by_image(train)
    for image_id, (messages,) in list(convs.items())[:300]:
        qs = by_image[image_id]
        assert messages[0]["content"] == "<image>\n" + qs[0].question
        assert [m["role"] for m in messages] == ["user", "assistant"] * len(qs)
        assert [m["content"] for m in messages[1::2]] == [q.answer for q in qs]
        assert sum("<image>" in m["content"] for m in messages) == 1
    total = sum(len(m) // 2 for (m,) in convs.values())
    assert total == 34_726
    split = E.conversations(train[:40], max_turns=3)
    for image_id, parts in split.items():
        assert [len(m) // 2 for m in parts][:-1] == [3] * (len(parts) - 1)
        assert sum(len(m) // 2 for m in parts) == len(E.group_by_image(train[:40])[image_id])
        assert all(m[0]["content"].startswith("<image>\n") for m in parts)
    shuffled = E.conversations(train[:40], shuffle_seed=1)
    assert shuffled == E.conversations(train[:40], shuffle_seed=1) != E.conversations(train[:40])


def test_balanced_yes_no_removes_the_question_form_prior():
    train = E.load_split("train")
    assert E.question_template("is there not a red shape in the image?") == "is there not a C shape in the image?"
    assert E.question_template("is there a circle?") == "is there a S?"

    def answers_by_template(samples):
        out = {}
        for s in samples:
            if s.answer_type == "yes/no":
                out.setdefault(E.question_template(s.question), Counter())[s.answer] += 1
        return out

    before = answers_by_template(train)
    assert len(before) == 16 and before["does the image contain a C shape?"] == {"no": 1976, "yes": 294}
    kept = E.balance_yes_no(train)
    after = answers_by_template(kept)
    assert set(after) == set(before)
    for template, counts in after.items():  # every template: as many yes as no, all of the rarer answer kept
        assert counts["yes"] == counts["no"] == min(before[template].values()), template
    assert len(kept) == 18_430
    assert [s for s in kept if s.answer_type != "yes/no"] == [s for s in train if s.answer_type != "yes/no"]
    index = {s: i for i, s in enumerate(train)}
    assert [index[s] for s in kept] == sorted(index[s] for s in kept)  # input order
    assert E.balance_yes_no(train) == kept and E.balance_yes_no(train, seed=1) != kept

    records = E.build_records("train", balance=True)
    assert sum(len(m) // 2 for r in records for m in r.conversations) == 18_430
    assert sum(len(r.vqa) for r in records) == 34_726  # VQA rows and captions still use every question
    single = E.build_records("train", max_turns=1, balance=True)  # data.easyvqa_max_turns=1: one question each
    assert sum(len(r.conversations) for r in single) == 18_430
    assert all(len(m) == 2 for r in single for m in r.conversations)
    for balance, low, high in ((False, 0.0, 0.3), (True, 0.4, 0.6)):  # share of "yes" for un-negated questions
        pairs = E.preference_pairs("train", balance=balance)
        chosen = [p["chosen"] for p in pairs if p["chosen"] in ("yes", "no") and " not " not in p["prompt"]
                  and not p["prompt"].startswith("is no ")]
        assert low < chosen.count("yes") / len(chosen) < high, balance


def test_quick_subset_is_fixed_and_from_test():
    a, b = E.quick_eval_subset(), E.quick_eval_subset()
    assert a == b and len(a) == 1_000
    test = E.load_split("test")
    index = {s: i for i, s in enumerate(test)}
    positions = [index[s] for s in a]
    assert positions == sorted(set(positions))  # distinct, in the package's order
    assert E.quick_eval_subset(seed=1) != a
    train = E.quick_eval_subset(split="train")
    assert len(train) == 1_000 and not {s.image for s in train} & {s.image for s in a}
    with pytest.raises(ValueError, match="split must be one of"):
        E.quick_eval_subset(split="validation")
    types = Counter(s.answer_type for s in a)
    assert set(types) == {"yes/no", "color", "shape"}


def test_written_test_split_reads_back(tmp_path):
    from vlm_chat.data import load_captions, load_conversations

    counts = E.write_easyvqa(tmp_path, split="test")
    assert counts["images"] == 1_000 and counts["vqa.jsonl"] == 9_673 and counts["conversations.json"] == 1_000
    convs, report = load_conversations(tmp_path / "conversations.json", verify_images=False)
    assert len(convs) == 1_000 and report.skipped == 0
    caps, report = load_captions(tmp_path / "captions.jsonl", verify_images=False)
    assert len(caps) == counts["captions.jsonl"] and report.skipped == 0
    rows = [json.loads(line) for line in (tmp_path / "vqa.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"image", "question", "answer", "answer_type"}
    original = E.image_paths("test")
    image_id = int(rows[0]["image"].rsplit("_", 1)[1].removesuffix(".png"))
    assert (tmp_path / rows[0]["image"]).read_bytes() == Path(original[image_id]).read_bytes()


def test_labelled_images_for_zero_shot():
    assert len(E.CLASS_NAMES) == 24 and len(set(E.CLASS_NAMES)) == 24
    items = E.labelled_images("test")
    assert len(items) == 888
    assert {name for _, name in items} <= set(E.CLASS_NAMES)
    assert len({name for _, name in items}) == 24  # every class occurs
    captions = E.derived_captions(E.load_split("test"))
    paths = E.image_paths("test")
    by_path = {p: i for i, p in paths.items()}
    for path, name in items[:100]:
        assert captions[by_path[path]] == f"A {name}."
