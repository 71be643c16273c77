"""The ``vlm-chat`` command line, run in-process through ``main([...])`` on a tiny random checkpoint."""

from __future__ import annotations

import json
import re

import pytest
from conftest import make_image

import vlm_chat
from vlm_chat import VLMChat
from vlm_chat.cli import main
from vlm_chat.serving import generation_kwargs

GEN = {"max_new_tokens": 6, "do_sample": False}


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory, tiny_clip_dir, tiny_llama_dir):
    path = tmp_path_factory.mktemp("tiny_vlm_cli")
    VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), device="cpu").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def chat(tiny_vlm_dir):
    return VLMChat.from_pretrained(tiny_vlm_dir, device="cpu")


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_images") / "red circle.png"  # a space in the name, as users have
    make_image().save(path)
    return str(path)


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_chat_prints_the_answer(capsys, tiny_vlm_dir, chat, image_path):
    code, out, err = _run(
        capsys, "chat", "--model", tiny_vlm_dir, "--image", image_path, "What", "color?", "--max-new-tokens", "6"
    )
    assert code == 0, err
    assert out == chat.generate(image_path, "What color?", **GEN) + "\n"  # words are joined into one question


def test_stream_prints_the_same_answer(capsys, tiny_vlm_dir, chat, image_path):
    code, out, err = _run(
        capsys,
        "chat",
        "--model",
        tiny_vlm_dir,
        "--image",
        image_path,
        "What color?",
        "--stream",
        "--max-new-tokens",
        "6",
    )
    assert code == 0, err
    assert out.strip() == chat.generate(image_path, "What color?", **GEN)


def test_text_only_chat(capsys, tiny_vlm_dir, chat):
    code, out, _ = _run(capsys, "chat", "--model", tiny_vlm_dir, "Hello there", "--max-new-tokens", "6")
    assert code == 0
    assert out == chat.generate(None, "Hello there", **GEN) + "\n"


def test_caption_short_and_detailed(capsys, tiny_vlm_dir, chat, image_path):
    code, out, _ = _run(capsys, "caption", image_path, "--model", tiny_vlm_dir, "--max-new-tokens", "6")
    assert code == 0 and out == chat.caption(image_path, **GEN) + "\n"
    code, out, _ = _run(capsys, "caption", image_path, "--detailed", "--model", tiny_vlm_dir, "--max-new-tokens", "6")
    assert code == 0 and out == chat.caption(image_path, detailed=True, **GEN) + "\n"


def test_seeded_sampling_is_reproducible(capsys, tiny_vlm_dir, image_path):
    argv = ["caption", image_path, "--model", tiny_vlm_dir, "--max-new-tokens", "12", "--temperature", "1.5"]
    outs = [_run(capsys, *argv, "--seed", str(seed))[1] for seed in (3, 3, 4)]
    assert outs[0] == outs[1]
    assert len(set(outs)) > 1  # different seeds sample different text: sampling really is on


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["chat", "--model", "__MODEL__", "--image", "/nonexistent/cat.png", "What?"], "image file not found"),
        (["caption", "__FAKE__", "--model", "__MODEL__"], "not a readable image file"),
        (["chat", "--model", "__MODEL__", "--image", "__IMAGE__", "   "], "the question is empty"),
        (["chat", "--model", "/nonexistent/model", "Hi"], "--model /nonexistent/model: directory not found"),
        (["caption", "__IMAGE__", "--model", "__IMAGE__"], "not a directory"),
        (["chat", "--model", "__EMPTY_DIR__", "Hi"], "config.json is missing"),
        (["eval", "pope", "--model", "__MODEL__", "--split", "train"], "--split chooses among the default easy-VQA"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, tmp_path, tiny_vlm_dir, image_path, argv, message):
    (tmp_path / "fake.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    swap = {
        "__FAKE__": str(tmp_path / "fake.png"),
        "__IMAGE__": image_path,
        "__EMPTY_DIR__": str(tmp_path / "empty"),
        "__MODEL__": tiny_vlm_dir,
    }
    code, out, err = _run(capsys, *[swap.get(a, a) for a in argv])
    assert code == 2 and out == ""
    assert message in err and err.startswith(f"vlm-chat {argv[0]}: error:")
    assert "Traceback" not in err


def test_missing_demo_model_says_to_pass_model(capsys, monkeypatch, tmp_path, image_path):
    monkeypatch.setattr(vlm_chat, "DEMO_MODEL", str(tmp_path / "demo_model"))
    for argv in (["chat", "--image", image_path, "Hi"], ["caption", image_path], ["serve", "--port", "1"]):
        code, _, err = _run(capsys, *argv)
        assert code == 2
        assert "demo model is not built yet" in err and "--model DIR" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["chat", "Hi", "--temperature", "-1"],
        ["chat", "Hi", "--top-p", "0"],
        ["chat", "Hi", "--max-new-tokens", "0"],
        ["serve", "--concurrency", "0"],
        ["chat"],
        ["frobnicate"],
    ],
)
def test_bad_flags_are_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: vlm-chat" in capsys.readouterr().err


def test_generation_kwargs():
    assert generation_kwargs(10, 0.0, 0.9) == {"max_new_tokens": 10, "do_sample": False}  # greedy ignores top-p
    assert generation_kwargs() == {"do_sample": False}
    assert generation_kwargs(5, 0.7, 0.8) == {"max_new_tokens": 5, "do_sample": True, "temperature": 0.7, "top_p": 0.8}
    for bad, name in (((0, 0.0, 0.9), "max_new_tokens"), ((5, -0.1, 0.9), "temperature"), ((5, 1.0, 1.5), "top_p")):
        with pytest.raises(ValueError, match=name):
            generation_kwargs(*bad)


# ---------------------------------------------------------------------------------------------------- eval


@pytest.fixture
def eval_files(tmp_path):
    make_image().save(tmp_path / "red.png")
    make_image((30, 60, 220), "square").save(tmp_path / "blue.png")
    rows = {
        "vqa.jsonl": [
            {"image": "red.png", "question": "What color is the shape?", "answer": "red"},
            {"image": "red.png", "question": "What shape is it?", "answer": "circle"},
            {"image": "blue.png", "question": "What color is the shape?", "answer": "blue"},
        ],
        "captions.jsonl": [
            {"image": "red.png", "caption": "A red circle."},
            {"image": "red.png", "caption": "A red circle on grey."},
            {"image": "blue.png", "caption": "A blue square."},
        ],
        "bad.jsonl": [{"image": "red.png", "question": "What color?"}],
    }
    for name, lines in rows.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
    return tmp_path


def test_eval_vqa_on_a_file(capsys, tiny_vlm_dir, chat, eval_files):
    """The score is known by construction: rows 0 and 2 take as their answer the first word the model says to them
    (the CLI's greedy decoding, asked through the API), row 1 an answer the model never says; so 2 of 3 are right."""
    data = eval_files / "vqa.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    said = [chat.generate(str(eval_files / r["image"]), r["question"], max_new_tokens=4) for r in rows]
    first_words = [re.findall(r"[a-z]+", s.lower()) for s in said]
    assert first_words[0] and first_words[2], said  # the construction needs a word in both answers
    rows[0]["answer"], rows[1]["answer"], rows[2]["answer"] = first_words[0][0], "zebra", first_words[2][0]
    assert "zebra" not in first_words[1]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_file = eval_files / "results" / "vqa.json"
    code, out, err = _run(
        capsys,
        "eval",
        "vqa",
        "--model",
        tiny_vlm_dir,
        "--data",
        str(data),
        "--max-new-tokens",
        "4",
        "--output",
        str(out_file),
    )
    assert code == 0, err
    summary, full = json.loads(out), json.loads(out_file.read_text())
    assert summary["n"] == 3 and summary["accuracy"] == 2 / 3 and "predictions" not in summary
    assert [p["response"] for p in full["predictions"]] == said
    assert [p["correct"] for p in full["predictions"]] == [True, False, True]


def test_eval_defaults_use_easyvqa_and_shapes(capsys, tiny_vlm_dir):
    from vlm_chat.datasets import easyvqa

    code, out, err = _run(capsys, "eval", "vqa", "--model", tiny_vlm_dir, "--limit", "3", "--max-new-tokens", "2")
    assert code == 0, err
    assert json.loads(out)["n"] == 3
    code, out, err = _run(capsys, "eval", "pope", "--model", tiny_vlm_dir, "--scenes", "2", "--max-new-tokens", "2")
    assert code == 0, err
    assert set(json.loads(out)["by_category"]) == {"random", "popular", "adversarial"}
    assert len(easyvqa.quick_eval_subset()) == 1000  # the documented default set


def test_eval_captions_group_references_by_image(capsys, tiny_vlm_dir, eval_files, tmp_path):
    out_file = tmp_path / "caps.json"
    code, out, err = _run(
        capsys,
        "eval",
        "captions",
        "--model",
        tiny_vlm_dir,
        "--data",
        str(eval_files / "captions.jsonl"),
        "--max-new-tokens",
        "4",
        "--output",
        str(out_file),
    )
    assert code == 0, err
    assert json.loads(out)["n"] == 2  # three rows, two images
    assert len(json.loads(out_file.read_text())["captions"]) == 2


def test_eval_bad_file_names_file_and_line(capsys, tiny_vlm_dir, eval_files):
    code, _, err = _run(capsys, "eval", "vqa", "--model", tiny_vlm_dir, "--data", str(eval_files / "bad.jsonl"))
    assert code == 2
    assert "bad.jsonl, line 1: missing field(s) ['answer']" in err


def test_eval_vqa_full_and_paraphrase_sets(capsys, tiny_vlm_dir, tmp_path):
    from vlm_chat.datasets import easyvqa

    out_file = tmp_path / "p.json"
    code, out, err = _run(capsys, "eval", "vqa", "--model", tiny_vlm_dir, "--paraphrase", "--limit", "4",
                          "--max-new-tokens", "2", "--output", str(out_file))
    assert code == 0, err
    questions = [p["question"] for p in json.loads(out_file.read_text())["predictions"]]
    asked = {q.question for q in easyvqa.load_split("test")}
    assert len(questions) == 4 and not set(questions) & asked  # phrasings easy-VQA never uses
    code, out, err = _run(capsys, "eval", "vqa", "--model", tiny_vlm_dir, "--full", "--limit", "2", "--max-new-tokens", "1")
    assert code == 0, err
    assert json.loads(out)["n"] == 2
    with pytest.raises(SystemExit):
        main(["eval", "vqa", "--full", "--paraphrase"])
    # --split train: the same seeded draw over the questions the models learn from (a fit check)
    code, out, err = _run(capsys, "eval", "vqa", "--model", tiny_vlm_dir, "--split", "train", "--limit", "3",
                          "--max-new-tokens", "1", "--output", str(out_file))
    assert code == 0, err
    train = easyvqa.quick_eval_subset(split="train")
    assert [p["question"] for p in json.loads(out_file.read_text())["predictions"]] == [s.question for s in train[:3]]
    assert set(s.image for s in train) <= set(easyvqa.image_paths("train").values())


def test_paraphrase_questions_are_balanced_and_answered_from_labels():
    from vlm_chat.datasets import easyvqa

    qs = easyvqa.paraphrase_questions(50, seed=1)
    assert len(qs) == 200 and qs == easyvqa.paraphrase_questions(50, seed=1)
    labels = dict(easyvqa.labelled_images("test"))
    for q in qs:
        color, shape = labels[q.image].split()
        if q.answer_type == "color":
            assert q.answer == color
        elif q.answer_type == "shape":
            assert q.answer == shape
    yes_no = [q.answer for q in qs if q.answer_type == "yes/no"]
    assert yes_no.count("yes") == yes_no.count("no") == 50


def test_eval_encoder_zero_shot_and_retrieval(capsys, tiny_clip_dir):
    import torch
    from PIL import Image
    from transformers import AutoProcessor, CLIPModel

    from vlm_chat.datasets import easyvqa

    code, out, err = _run(capsys, "eval", "encoder", "--model", str(tiny_clip_dir), "--limit", "20", "--scenes", "5")
    assert code == 0, err
    result = json.loads(out)
    # Zero-shot, recomputed with plain transformers: the first 20 labelled test images against "A <class>." prompts.
    items = easyvqa.labelled_images("test")[:20]
    model, processor = CLIPModel.from_pretrained(tiny_clip_dir).eval(), AutoProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        pixels = processor(images=[Image.open(p).convert("RGB") for p, _ in items], return_tensors="pt").pixel_values
        images = model.get_image_features(pixel_values=pixels)
        prompts = [easyvqa.ZERO_SHOT_TEMPLATE.format(c) for c in easyvqa.CLASS_NAMES]
        texts = model.get_text_features(**processor.tokenizer(  # the tiny tower holds 16 positions
            prompts, padding=True, truncation=True, max_length=model.config.text_config.max_position_embeddings,
            return_tensors="pt"))
    images, texts = (getattr(x, "pooler_output", x) for x in (images, texts))
    guesses = (torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T).argmax(1)
    right = sum(easyvqa.CLASS_NAMES[g] == name for g, (_, name) in zip(guesses.tolist(), items))
    assert result["zero_shot_n"] == 20 and result["zero_shot_accuracy"] == pytest.approx(right / 20)
    assert result["retrieval_n_images"] == 5 and result["i2t_r1"] <= result["i2t_r5"] and result["t2i_r1"] <= 1
    code, out, err = _run(capsys, "eval", "encoder", "--model", str(tiny_clip_dir / "nope"))
    assert code != 0 and "nope" in err
