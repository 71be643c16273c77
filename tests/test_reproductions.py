"""``bench.reproduce_siglip`` and ``bench.reproduce_summary_tokens`` at their smallest setting, on tiny data;
``bench.yes_no_context`` and ``bench.vqa_errors_vs_tower`` on fakes and a tiny tower.

They check what the scripts compute, not what the claims say: the number of examples or steps held fixed, one encoder
per (loss, batch), the visual-token counts and tokens per step of each mapper, and a results JSON + table. The
measured numbers live in docs/reproductions.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import reproduce_siglip, reproduce_summary_tokens, vqa_errors_vs_tower, yes_no_context


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One tiny copy of the quickstart's data for both scripts (shapes world only, 32-px images)."""
    return tmp_path_factory.mktemp("repro_data")


def test_siglip_reproduction_holds_examples_fixed(tmp_path, data_root, capsys):
    script = reproduce_siglip
    out = tmp_path / "siglip"
    summary = script.main(["--tiny", "--data", str(data_root), "--output", str(out), "--batches", "4,8",
                           "--examples", "16"])
    runs = {(r["loss"], r["batch"]): r for r in summary["runs"]}
    assert set(runs) == {(loss, b) for loss in ("clip", "siglip", "triplet") for b in (4, 8)}
    for (loss, batch), r in runs.items():
        assert r["examples"] == 16 and r["steps"] == 16 // batch  # same examples seen, steps = examples / batch
        assert r["zero_shot_n"] == script.TINY_ZERO_SHOT_IMAGES
        log = [json.loads(x) for x in (out / "runs" / f"{loss}-b{batch}" / "train_log.jsonl").read_text().splitlines()]
        assert len(log) == r["steps"]  # the run really took that many steps of the stage-0 engine
        config = (out / "runs" / f"{loss}-b{batch}" / "config.yaml").read_text()
        assert f"loss: {loss}" in config and "model_type: clip" in config and "same_caption_positive: true" in config
    assert json.loads((out / "results.json").read_text())["runs"] == summary["runs"]
    # The reported zero-shot score is the trained encoder's on the first 48 labelled easy-VQA test images.
    from vlm_chat.datasets import easyvqa
    from vlm_chat.eval import evaluate_encoder

    classes = easyvqa.labelled_images("test")[: script.TINY_ZERO_SHOT_IMAGES]
    for key in (("clip", 4), ("triplet", 8)):
        again = evaluate_encoder(runs[key]["final_dir"], class_items=classes, class_names=easyvqa.CLASS_NAMES,
                                 class_template=easyvqa.ZERO_SHOT_TEMPLATE)
        assert runs[key]["zero_shot_accuracy"] == again["zero_shot_accuracy"], key
    printed = capsys.readouterr().out
    assert "| batch | steps | clip zero-shot | siglip zero-shot | triplet zero-shot |" in printed
    # --hold steps: every batch size gets the same step count instead.
    steps = script.parse_args(["--hold", "steps", "--steps", "7"])
    assert script.run_steps(steps, 16) == script.run_steps(steps, 256) == 7


def test_summary_tokens_reproduction_counts_tokens(tmp_path, data_root, tiny_clip_dir, tiny_smollm2_dir, capsys):
    script = reproduce_summary_tokens
    out = tmp_path / "summary"
    summary = script.main(["--tiny", "--data", str(data_root), "--output", str(out), "--vision", str(tiny_clip_dir),
                           "--lm", str(tiny_smollm2_dir), "--num_queries", "4", "--pretrain_steps", "0"])
    rows = summary["mappers"]
    assert list(rows) == ["mlp", "perceiver", "qformer"]
    # tiny_clip_dir: 32-px images, 8-px patches -> 16 patch tokens; the query mappers give --num_queries.
    assert [rows[m]["visual_tokens"] for m in rows] == [16, 4, 4]
    for shape in ("packed", "single"):
        t = {m: rows[m]["timing"][shape] for m in rows}
        batch = summary["settings"]["batch"]
        # Same rows for every mapper: the token counts differ by exactly the visual tokens saved.
        assert t["mlp"]["tokens"] - t["perceiver"]["tokens"] == batch * (16 - 4)
        assert t["perceiver"]["tokens"] == t["qformer"]["tokens"]
        assert t["mlp"]["speedup_vs_mlp"] == 1.0 and all(x["step_s"] > 0 for x in t.values())
    assert rows["mlp"]["timing"]["packed"]["tokens"] > rows["mlp"]["timing"]["single"]["tokens"]
    for m, r in rows.items():
        assert r["vqa_n"] == summary["settings"]["vqa_questions"]
        assert (out / m / "instruct" / "final" / "mapper.safetensors").is_file()
        log = (out / m / "instruct" / "train_log.jsonl").read_text().splitlines()
        assert len(log) == summary["settings"]["instruct_steps"]
    assert "| mapper | visual tokens |" in capsys.readouterr().out
    # The reported accuracy is the trained model's on the first questions of the fixed easy-VQA test subset.
    from vlm_chat import VLMChat
    from vlm_chat.datasets import easyvqa
    from vlm_chat.eval import evaluate_vqa

    trained = VLMChat.from_pretrained(str(out / "qformer" / "instruct" / "final"), device="cpu")
    again = evaluate_vqa(trained, easyvqa.quick_eval_subset(summary["settings"]["vqa_questions"]),
                         vocabulary=easyvqa.answer_vocabulary(), progress=False)
    assert rows["qformer"]["vqa_accuracy"] == again["accuracy"]


def test_summary_tokens_timing_only_and_no_timing(tmp_path, data_root, tiny_clip_dir, tiny_smollm2_dir, capsys):
    """The split used when training runs on a GPU machine and the step time is measured on the CPU."""
    script = reproduce_summary_tokens
    common = ["--tiny", "--data", str(data_root), "--vision", str(tiny_clip_dir), "--lm", str(tiny_smollm2_dir),
              "--num_queries", "4", "--pretrain_steps", "0", "--mappers", "mlp,qformer"]
    timed = script.main([*common, "--output", str(tmp_path / "t"), "--timing_only"])["mappers"]
    assert [timed[m]["visual_tokens"] for m in timed] == [16, 4]
    assert all("vqa_accuracy" not in r and r["timing"]["packed"]["step_s"] > 0 for r in timed.values())
    assert not (tmp_path / "t" / "mlp" / "instruct").exists()  # nothing trained
    assert "s/step packed" in capsys.readouterr().out
    scored = script.main([*common, "--output", str(tmp_path / "s"), "--no_timing", "--feature_layer", "-1"])["mappers"]
    assert all("timing" not in r and r["vqa_n"] == 4 for r in scored.values())
    for r in scored.values():  # --feature_layer reaches the trained model's config
        saved = json.loads((Path(r["final_dir"]) / "config.json").read_text())
        assert r["feature_layer"] == -1 and saved["vision"]["feature_layer"] == -1
    printed = capsys.readouterr().out
    assert "easy-VQA acc" in printed and "s/step" not in printed


def test_yes_no_context_diagnostic_tells_a_context_reader_apart():
    """``bench.yes_no_context``: a fake model that answers only from the earlier turns scores 1.0 with them and
    its bias alone; the questions are easy-VQA test yes/no questions about images whose attributes are known."""
    from vlm_chat.datasets import easyvqa

    script = yes_no_context

    class ContextReader:
        asked_alone: list[tuple[str, str]] = []

        def generate_batch(self, images, prompts, histories, **kw):
            out = []
            for image, prompt, history in zip(images, prompts, histories):
                if history is None:
                    self.asked_alone.append((image, prompt))
                    out.append("no")
                    continue
                known = {history[1]["content"], history[3]["content"]}
                words = prompt.rstrip("?").split()
                named = next(w for w in words if w in easyvqa.COLORS or w in easyvqa.SHAPES)
                negated = "not" in words or "no" in words
                out.append("yes" if (named in known) != negated else "no")
            return out

    reader = ContextReader()
    r = script.measure(reader, n=40, seed=0)
    assert r["n"] == 40 and r["with_context"] == 1.0
    # Alone it always says "no": its score is the share of "no" answers among the questions it was asked.
    answers = {(s.image, s.question): s.answer for s in easyvqa.load_split("test")}
    assert len(reader.asked_alone) == 40 and len(set(reader.asked_alone)) == 40
    assert r["alone"] == sum(answers[q] == "no" for q in reader.asked_alone) / 40
    with pytest.raises(ValueError, match="--n"):
        script.measure(ContextReader(), n=0)


def test_vqa_errors_vs_tower_splits_errors_by_what_the_tower_sees(tmp_path, tiny_clip_dir):
    """``bench.vqa_errors_vs_tower``: errors are counted by whether the tower's zero-shot gets their image wrong,
    right, or has no label for it; the script runs the tower through ``from_pretrained`` on easy-VQA test images."""
    script = vqa_errors_vs_tower
    predictions = [
        {"image": "a.png", "correct": False}, {"image": "a.png", "correct": False},  # tower wrong on a
        {"image": "b.png", "correct": False}, {"image": "b.png", "correct": True},  # tower right on b
        {"image": "c.png", "correct": False},  # c has no label
        {"image": "d.png", "correct": True},
    ]
    counts = script.split_errors(predictions, labelled={"a.png", "b.png", "d.png"}, wrong={"a.png", "d.png"})
    assert counts == {"questions": 6, "errors": 4, "error_images": 3, "errors_on_tower_wrong_images": 2,
                      "errors_on_tower_right_images": 1, "errors_on_unlabelled_images": 1,
                      "tower_wrong_images_with_errors": 1}

    from vlm_chat.datasets import easyvqa

    items = easyvqa.labelled_images("test")[:6]
    vqa = tmp_path / "vqa.json"
    vqa.write_text(json.dumps({"predictions": [{"image": items[0][0], "correct": False},
                                               {"image": items[1][0], "correct": True}]}))
    result = script.main(["--vision", str(tiny_clip_dir), "--vqa", str(vqa), "--limit", "6"])
    from vlm_chat.eval import evaluate_encoder

    guesses = evaluate_encoder(str(tiny_clip_dir), class_items=items, class_names=easyvqa.CLASS_NAMES,
                               class_template=easyvqa.ZERO_SHOT_TEMPLATE, return_predictions=True)
    wrong = {path for (path, name), guess in zip(items, guesses["zero_shot_predictions"]) if guess != name}
    assert result["labelled_images"] == 6 and result["tower_wrong_images"] == len(wrong)
    split = result["vqa"][str(vqa)]
    assert split["errors"] == 1 and split["errors_on_unlabelled_images"] == 0
    assert split["errors_on_tower_wrong_images"] == int(items[0][0] in wrong)
    assert split["errors_on_tower_right_images"] == int(items[0][0] not in wrong)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match="bad.json"):
        script.main(["--vision", str(tiny_clip_dir), "--vqa", str(bad), "--limit", "2"])
