"""Shapes-world evaluation: caption object parsing and recall/precision (hand-computed), the per-type runner with
scripted models, and ``vlm-chat eval shapes`` on a tiny random model."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from vlm_chat.datasets import shapes as sw
from vlm_chat.eval.shapes import (
    ANSWER_VOCABULARY,
    caption_objects,
    evaluate_shapes,
    object_recall_precision,
    shapes_results,
)

QTYPES = {"count", "count_attribute", "color", "shape", "size", "exists", "position", "relation"}


def test_caption_objects_counts_and_mentions():
    assert caption_objects("Two red circles and a large blue triangle.") == {"red circle": 2, "blue triangle": 1}
    # A second mention of the same object is not a second object.
    assert caption_objects("A red circle is in the top left. The red circle is above the blue triangle.") == {
        "red circle": 1, "blue triangle": 1}
    assert caption_objects("4 grey rectangles; the small green triangles, one black large circle") == {
        "gray rectangle": 4, "green triangle": 2, "black circle": 1}
    assert caption_objects("Three shapes: a red shape, a circle and a triangle.") == {}
    assert caption_objects("The image shows two shapes. A large teal circle and a small teal circle.") == {
        "teal circle": 1}
    assert caption_objects("a red red circle") == {"red circle": 1}  # the colour right before the shape binds
    assert caption_objects("") == {}


def test_training_captions_name_exactly_the_scene():
    for scene in sw.generate_scenes(30, seed=5):
        objects = Counter(o.name for o in scene.objects)
        for caption in sw.reference_captions(scene, detailed=True) + sw.reference_captions(scene):
            assert caption_objects(caption) == objects, caption


def test_object_recall_precision_hand_computed():
    named = [{"red circle": 2, "blue triangle": 1}, {}]
    present = [{"red circle": 1, "green circle": 1}, {"black triangle": 1}]
    r = object_recall_precision(named, present)
    # matched: red circle min(2, 1) = 1; named 3, present 3
    assert r == {"recall": 1 / 3, "precision": 1 / 3, "f1": pytest.approx(1 / 3), "matched": 1, "named": 3,
                 "present": 3, "n": 2}
    r = object_recall_precision([{"red circle": 1}], [{"red circle": 1, "blue circle": 1, "gray circle": 2}])
    assert (r["recall"], r["precision"], r["f1"]) == (0.25, 1.0, pytest.approx(0.4))
    assert object_recall_precision([{}], [{"red circle": 1}])["precision"] == 0.0
    with pytest.raises(ValueError, match="2 named-object counts for 1 images"):
        object_recall_precision([{}, {}], [{}])


class SceneOracle:
    """Knows each scene (told apart by background colour); answers questions as ``answer_for`` says."""

    def __init__(self, scenes, answer_for, caption_for=sw.detailed_caption):
        self.by_background = {s.background: s for s in scenes}
        self.answer_for, self.caption_for = answer_for, caption_for
        self.prompts = []

    def generate_batch(self, images, prompts, **kw):
        self.prompts += prompts
        out = []
        for image, prompt in zip(images, prompts):
            scene = self.by_background[image.getpixel((0, 0))]
            if prompt == "Describe the image in detail.":
                out.append(self.caption_for(scene))
            else:
                qa = next(q for q in sw.qa_pairs(scene) if q.question == prompt)
                out.append(self.answer_for(qa))
        return out


def test_evaluate_shapes_perfect_and_biased_models():
    scenes = sw.generate_scenes(12, seed=21)
    qas = [qa for s in scenes for qa in sw.qa_pairs(s)]
    # Sentence answers are judged by their first vocabulary word ("2" for "two").
    spelled = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four"}
    perfect = SceneOracle(scenes, lambda qa: f"I think it is {spelled.get(qa.answer, qa.answer)}.")
    r = evaluate_shapes(perfect, scenes, batch_size=7, progress=False)
    assert r["accuracy"] == 1.0 and r["n"] == len(qas) and set(r["by_type"]) == QTYPES
    assert {t: v["n"] for t, v in r["by_type"].items()} == Counter(qa.qtype for qa in qas)
    assert r["caption_objects"]["recall"] == r["caption_objects"]["precision"] == 1.0
    assert r["caption_objects"]["present"] == sum(len(s.objects) for s in scenes)
    assert [p["question"] for p in r["predictions"]] == [qa.question for qa in qas]
    assert perfect.prompts.count("Describe the image in detail.") == 12

    def invent(scene):  # the true caption plus one absent object
        absent = next(f"{c} {s}" for c in sw.COLORS for s in sw.SHAPES if not scene.has(c, s))
        return sw.detailed_caption(scene) + f" There is also a {absent}."

    yes = SceneOracle(scenes, lambda qa: "Yes.", invent)
    r = evaluate_shapes(yes, scenes, progress=False)
    relation_yes = [qa.answer for qa in qas if qa.qtype == "relation"].count("yes")
    assert r["by_type"]["exists"]["accuracy"] == 0.5  # existence questions are balanced
    assert r["by_type"]["relation"]["accuracy"] == relation_yes / r["by_type"]["relation"]["n"]
    assert all(r["by_type"][t]["accuracy"] == 0.0 for t in QTYPES - {"exists", "relation"})
    n_objects = sum(len(s.objects) for s in scenes)
    assert r["caption_objects"]["recall"] == 1.0
    assert r["caption_objects"]["precision"] == n_objects / (n_objects + 12)
    # --limit: the first questions only; no captions when asked not to
    r = evaluate_shapes(perfect, scenes, limit=5, captions=False, progress=False)
    assert r["n"] == 5 and "caption_objects" not in r


def test_answer_vocabulary_holds_every_answer():
    answers = {qa.answer for s in sw.generate_scenes(60, seed=8) for qa in sw.qa_pairs(s)}
    assert answers <= set(ANSWER_VOCABULARY)


def test_shapes_results_flat_rows():
    scenes = sw.generate_scenes(3, seed=sw.TEST_SEED)
    oracle = SceneOracle(scenes, lambda qa: qa.answer)
    rows = shapes_results(oracle, scenes=3)
    assert rows["shapes_accuracy"] == 1.0 and rows["shapes_n"] == sum(len(sw.qa_pairs(s)) for s in scenes)
    assert rows["shapes_caption_recall"] == rows["shapes_caption_precision"] == 1.0
    assert {k for k in rows if k.startswith("shapes_")} >= {f"shapes_{t}" for t in QTYPES if any(
        qa.qtype == t for s in scenes for qa in sw.qa_pairs(s))}


def test_seeds_are_the_projects():
    assert (sw.TRAIN_SEED, sw.VALIDATION_SEED, sw.TEST_SEED) == (1, 2, 1234)


def test_cli_eval_shapes_on_a_tiny_model(capsys, tmp_path, tiny_clip_dir, tiny_llama_dir):
    from vlm_chat import VLMChat
    from vlm_chat.cli import main

    model = tmp_path / "model"
    VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), device="cpu").save_pretrained(model)
    out_file = tmp_path / "shapes.json"
    code = main(["eval", "shapes", "--model", str(model), "--scenes", "2", "--split", "val", "--max-new-tokens", "2",
                 "--output", str(out_file)])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary, full = json.loads(out), json.loads(out_file.read_text())
    scenes = sw.generate_scenes(2, seed=sw.VALIDATION_SEED)
    qas = [qa for s in scenes for qa in sw.qa_pairs(s)]
    assert summary["data"] == {"split": "val", "seed": 2, "scenes": 2} and summary["n"] == len(qas)
    assert "predictions" not in summary and "captions" not in summary and summary["caption_objects"]["n"] == 2
    assert [p["question"] for p in full["predictions"]] == [qa.question for qa in qas]
    assert len(full["captions"]) == 2
    code = main(["eval", "shapes", "--model", str(model), "--split", "train"])
    assert code == 2 and "test and val" in capsys.readouterr().err
