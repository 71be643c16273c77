"""Shapes world: determinism, scenes that obey their own rules, and language that tells the truth about them."""

from __future__ import annotations

import io
import json
import re

import easy_vqa
import pytest

from vlm_chat.datasets import shapes as sw

N_SCENES = 300


@pytest.fixture(scope="module")
def scenes():
    return sw.generate_scenes(N_SCENES, seed=11)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _center(obj):
    x0, y0, x1, y1 = obj.bbox
    return (x0 + x1) / 2, (y0 + y1) / 2


def _find(scene, ref: str):
    """Objects matching a referring expression like "circle", "large circle", "red circle", "small red"."""
    words = ref.split()
    return [o for o in scene.objects if all(w in (o.color, o.shape, o.size) for w in words)]


def test_vocabulary_is_easy_vqas():
    answers = set(easy_vqa.get_answers())
    assert set(sw.COLORS) | set(sw.SHAPES) | {"yes", "no"} == answers
    assert len(sw.COLORS) == 8 and len(sw.SHAPES) == 3


def test_same_seed_same_scenes_and_bytes():
    a, b = sw.generate_scenes(6, seed=3), sw.generate_scenes(6, seed=3)
    assert a == b
    assert [_png(s.render()) for s in a] == [_png(s.render()) for s in b]
    # Scene i does not depend on how many scenes were asked for, nor on the start offset.
    assert sw.generate_scenes(2, seed=3, start=4) == a[4:6]
    other = sw.generate_scenes(6, seed=4)
    assert [s.objects for s in other] != [s.objects for s in a]


def test_scenes_obey_layout_rules(scenes):
    counts = set()
    for scene in scenes:
        n = len(scene.objects)
        counts.add(n)
        assert 1 <= n <= 4
        assert len({o.name for o in scene.objects}) == n  # colour+shape unique
        assert len({o.position for o in scene.objects}) == n  # one object per quadrant
        half = scene.image_size / 2
        for o in scene.objects:
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 < x1 <= scene.image_size and 0 <= y0 < y1 <= scene.image_size
            # The whole box lies in the quadrant its position names.
            assert (x1 <= half) if o.position.endswith("left") else (x0 >= half)
            assert (y1 <= half) if o.position.startswith("top") else (y0 >= half)
        assert all(230 <= c <= 255 for c in scene.background)
    assert counts == {1, 2, 3, 4}


def test_image_size_is_configurable_and_small_is_smaller():
    scene = sw.generate_scene(seed=0, index=5, image_size=128)
    assert scene.render().size == (128, 128)
    areas = {"small": [], "large": []}
    for s in sw.generate_scenes(200, seed=1):
        for o in s.objects:
            x0, y0, x1, y1 = o.bbox
            areas[o.size].append((x1 - x0) * (y1 - y0))
    assert max(areas["small"]) < min(areas["large"])


def test_rendered_pixels_match_the_scene(scenes):
    for scene in scenes[:60]:
        img = scene.render()
        assert img.size == (scene.image_size, scene.image_size) and img.mode == "RGB"
        assert img.getpixel((0, 0)) == scene.background  # quadrant margins keep the corner free
        for o in scene.objects:
            x0, y0, x1, y1 = o.bbox
            # A point inside every shape kind: horizontally centred, two thirds down the box.
            point = (int((x0 + x1) / 2), int(y0 + (y1 - y0) * 2 / 3))
            assert img.getpixel(point) == sw.COLOR_RGB[o.color], (scene, o)


def test_qa_answers_agree_with_the_scene(scenes):
    seen_types = set()
    for scene in scenes:
        qas = sw.qa_pairs(scene)
        assert qas == sw.qa_pairs(scene)  # deterministic by default
        for qa in qas:
            seen_types.add(qa.qtype)
            q, a = qa.question, qa.answer
            if qa.qtype == "count":
                assert a == str(len(scene.objects))
            elif qa.qtype == "count_attribute":
                (word,) = re.match(r"How many (\w+?)s? (?:shapes )?are there\?", q).groups()
                expected = scene.count(shape=word) if word in sw.SHAPES else scene.count(color=word)
                assert a == str(expected), q
            elif qa.qtype == "color":
                (ref,) = re.search(r".*the (.+)\?$", q).groups()
                (obj,) = _find(scene, ref)
                assert a == obj.color and obj.color not in ref
            elif qa.qtype == "shape":
                (ref,) = re.search(r"the (.+?) (?:object|shape)\?$", q).groups()
                (obj,) = _find(scene, ref)
                assert a == obj.shape and obj.shape not in ref
            elif qa.qtype == "size":
                (ref,) = re.search(r"Is the (.+) small or large\?", q).groups()
                (obj,) = _find(scene, ref)
                assert a == obj.size
            elif qa.qtype == "position":
                (ref,) = re.search(r"Where is the (.+)\?", q).groups()
                (obj,) = _find(scene, ref)
                cx, cy = _center(obj)
                half = scene.image_size / 2
                assert a == ("top" if cy < half else "bottom") + " " + ("left" if cx < half else "right")
            elif qa.qtype == "exists":
                color, shape = re.search(r"Is there an? (\w+) (\w+) in the image\?", q).groups()
                assert a == ("yes" if scene.has(color, shape) else "no")
            elif qa.qtype == "relation":
                ra, direction, rb = re.search(
                    r"Is the (.+) (to the left of|to the right of|above|below) the (.+)\?", q
                ).groups()
                (oa,), (ob,) = _find(scene, ra), _find(scene, rb)
                # Independent of the quadrant bookkeeping: boxes in different quadrants are disjoint on that axis.
                truth = {
                    "to the left of": oa.bbox[2] <= ob.bbox[0],
                    "to the right of": oa.bbox[0] >= ob.bbox[2],
                    "above": oa.bbox[3] <= ob.bbox[1] and oa.row != ob.row,
                    "below": oa.bbox[1] >= ob.bbox[3] and oa.row != ob.row,
                }[direction]
                if direction in ("to the left of", "to the right of"):
                    truth = truth and oa.col != ob.col
                assert a == ("yes" if truth else "no"), (q, oa, ob)
            else:
                raise AssertionError(f"unknown qtype {qa.qtype}")
    assert seen_types == {"count", "count_attribute", "color", "shape", "size", "position", "exists", "relation"}


def test_existence_questions_are_balanced(scenes):
    answers = [qa.answer for s in scenes for qa in sw.qa_pairs(s) if qa.qtype == "exists"]
    assert answers.count("yes") == answers.count("no")


def test_captions_name_exactly_the_objects(scenes):
    phrase = re.compile(r"an? (small|large) (\w+) (circle|rectangle|triangle)")
    for scene in scenes[:100]:
        expected = sorted((o.size, o.color, o.shape) for o in scene.objects)
        assert sorted(phrase.findall(sw.short_caption(scene).lower())) == expected
        detailed = sw.detailed_caption(scene)
        assert sorted(phrase.findall(detailed.lower())) == expected
        n = len(scene.objects)
        assert f"shows {sw.NUMBER_WORDS[n]} shape" in detailed
        for o in scene.objects:
            assert f"{o.color} {o.shape} is in the {o.position}" in detailed
        refs = sw.reference_captions(scene)
        assert refs[0] == sw.short_caption(scene) and len(set(refs)) == len(refs) >= 3
        for ref in refs:
            assert sorted(phrase.findall(ref.lower())) == expected


def test_messages_are_transformers_chat_with_one_image_marker(scenes):
    for scene in scenes[:50]:
        messages = sw.qa_messages(scene)
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert messages[0]["content"].startswith("<image>\n")
        assert sum(m["content"].count("<image>") for m in messages) == 1
        assert len(messages) // 2 == len(sw.qa_pairs(scene)) + 1  # QA turns plus the caption turn
        assert len(sw.qa_messages(scene, max_turns=3)) == 6
        prompt = messages[0]["content"].removeprefix("<image>\n")
        assert prompt in sw.SHORT_CAPTION_PROMPTS + sw.DETAILED_CAPTION_PROMPTS
        expected = sw.short_caption(scene) if prompt in sw.SHORT_CAPTION_PROMPTS else sw.detailed_caption(scene)
        assert messages[1]["content"] == expected


def test_rejected_answers_are_really_wrong(scenes):
    phrase = re.compile(r"an? (?:small|large) (\w+) (circle|rectangle|triangle)")
    kinds = set()
    for scene in scenes:
        for p in sw.preference_pairs(scene):
            kinds.add(p["kind"])
            assert p["chosen"] != p["rejected"]
            if p["kind"].startswith("caption"):
                assert p["chosen"] == sw.short_caption(scene)
                named = phrase.findall(p["rejected"].lower())
                assert len(named) == len(scene.objects)
                absent = [(c, s) for c, s in named if not scene.has(c, s)]
                assert len(absent) == 1, p  # exactly one hallucinated or mis-bound object
            elif p["kind"] == "exists":
                color, shape = re.search(r"Is there an? (\w+) (\w+) in the image\?", p["prompt"]).groups()
                assert not scene.has(color, shape) and (p["chosen"], p["rejected"]) == ("no", "yes")
            elif p["kind"] == "color":
                (ref,) = re.search(r".*the (.+)\?$", p["prompt"]).groups()
                (obj,) = _find(scene, ref)
                assert p["chosen"] == obj.color and p["rejected"] in sw.COLORS and p["rejected"] != obj.color
            elif p["kind"] == "count":
                assert p["chosen"] == str(len(scene.objects)) and p["rejected"] != p["chosen"]
            elif p["kind"] == "exists_present":
                color, shape = re.search(r"Is there an? (\w+) (\w+) in the image\?", p["prompt"]).groups()
                assert scene.has(color, shape) and (p["chosen"], p["rejected"]) == ("yes", "no")
    assert kinds == {"caption_absent", "caption_attribute", "exists", "color", "count", "exists_present"}


def test_pope_negatives_are_absent_and_balanced(scenes):
    rows = sw.pope_questions(scenes, per_image=3, seed=0)
    assert rows == sw.pope_questions(scenes, per_image=3, seed=0)
    assert {r["category"] for r in rows} == set(sw.POPE_CATEGORIES)
    popularity = {}
    for s in scenes:
        for o in s.objects:
            popularity[o.name] = popularity.get(o.name, 0) + 1
    for r in rows:
        scene = scenes[r["scene_index"]]
        color, shape = r["object"].split()
        assert r["question"] == f"Is there {'an' if color[0] in 'aeiou' else 'a'} {r['object']} in the image?"
        assert scene.has(color, shape) == (r["label"] == "yes"), r
        if r["category"] == "adversarial" and r["label"] == "no":
            # A near miss: shares colour or shape with a present object.
            assert any(o.color == color or o.shape == shape for o in scene.objects), r
        if r["category"] == "popular" and r["label"] == "no":
            # No absent object is strictly more popular than a chosen one... unless it too was chosen.
            chosen = {x["object"] for x in rows if x["scene_index"] == r["scene_index"] and x["category"] == "popular"}
            absent = [f"{c} {s}" for c in sw.COLORS for s in sw.SHAPES if not scene.has(c, s)]
            assert all(popularity.get(a, 0) <= popularity.get(r["object"], 0) for a in absent if a not in chosen)
    for category in sw.POPE_CATEGORIES:
        sub = [r for r in rows if r["category"] == category]
        for i, scene in enumerate(scenes):
            labels = [r["label"] for r in sub if r["scene_index"] == i]
            k = min(3, len(scene.objects))
            assert labels.count("yes") == labels.count("no") == k


def test_caption_prompts_match_vlmchat():
    from vlm_chat.chat import CAPTION_PROMPTS

    assert CAPTION_PROMPTS[False] == sw.SHORT_CAPTION_PROMPTS[0]
    assert CAPTION_PROMPTS[True] == sw.DETAILED_CAPTION_PROMPTS[0]


def test_written_dataset_reads_back_with_the_project_readers(tmp_path):
    from vlm_chat.data import load_captions, load_conversations, load_preferences

    counts = sw.write_shapes_dataset(tmp_path / "a", n_images=12, seed=5)
    sw.write_shapes_dataset(tmp_path / "b", n_images=12, seed=5)
    a, b = tmp_path / "a", tmp_path / "b"
    assert counts["images"] == 12 and len(list((a / "images").glob("*.png"))) == 12
    for name in ("conversations.json", "captions.jsonl", "preferences.jsonl", "pope.jsonl", "vqa.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert [p.read_bytes() for p in sorted((a / "images").glob("*.png"))] == [
        p.read_bytes() for p in sorted((b / "images").glob("*.png"))
    ]
    assert json.loads((a / "manifest.json").read_text())["files"] == counts

    convs, report = load_conversations(a / "conversations.json")
    assert len(convs) == 12 and report.skipped == 0
    assert convs[0]["messages"][0]["content"].startswith("<image>\n")
    caps, report = load_captions(a / "captions.jsonl")
    assert len(caps) == 24 and report.skipped == 0  # short + detailed per image
    prefs, report = load_preferences(a / "preferences.jsonl")
    assert len(prefs) == counts["preferences.jsonl"] and report.skipped == 0
    assert set(json.loads(line)["image"] for line in (a / "captions.jsonl").read_text().splitlines()) == {
        f"images/{p.name}" for p in (a / "images").glob("*.png")
    }
    scenes = sw.generate_scenes(12, seed=5)
    pope = [json.loads(line) for line in (a / "pope.jsonl").read_text().splitlines()]
    assert set(pope[0]) == {"image", "question", "label", "category", "object"}
    assert len(pope) == sum(2 * min(3, len(s.objects)) for s in scenes) * 3


def test_write_records_rejects_duplicate_ids(tmp_path):
    scene = sw.generate_scene()
    rec = sw.ImageRecord("x", scene.render(), captions=["c"])
    with pytest.raises(ValueError, match="duplicate image_id 'x'"):
        sw.write_records(tmp_path, [rec, rec])


def test_public_names_stay_importable_from_shapes():
    from vlm_chat.datasets import records, scenes

    for name in sw.__all__:
        assert hasattr(sw, name), name
    assert sw.Scene is scenes.Scene and sw.write_records is records.write_records
    assert sw.ImageRecord is records.ImageRecord and sw.generate_scenes is scenes.generate_scenes
