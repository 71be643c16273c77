"""Metrics against hand-computed values; runners against scripted models and one tiny real VLMChat."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from vlm_chat import eval as ev
from vlm_chat.datasets import shapes as sw

EASY_VOCAB = ["circle", "green", "red", "gray", "yes", "teal", "black", "rectangle", "yellow", "triangle", "brown",
              "blue", "no"]  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Normalization and VQA accuracy


def test_normalize_answer():
    assert ev.normalize_answer("The shape is Red.") == "shape is red"
    assert ev.normalize_answer("Top-left!") == "top left"
    assert ev.normalize_answer("It's THREE") == "its 3"
    assert ev.normalize_answer("  an   apple ") == "apple"


def test_first_vocabulary_word_decides():
    assert ev.extract_answer("No, it is not red.", EASY_VOCAB) == "no"
    assert ev.extract_answer("The shape is RED; not blue", EASY_VOCAB) == "red"
    assert ev.extract_answer("not sure", EASY_VOCAB) is None  # "no" does not match inside "not"
    assert ev.extract_answer("I think it is a circle", EASY_VOCAB) == "circle"
    assert ev.extract_answer("in the top left corner", ["top left", "left", "top"]) == "top left"
    assert ev.extract_answer("three of them", ["3", "4"]) == "3"


def test_vqa_scores_hand_computed():
    responses = ["Red.", "yes it is", "The answer is no", "blue, or red", "a triangle"]
    answers = ["red", "no", "no", "red", "circle"]
    types = ["color", "yes/no", "yes/no", "color", "shape"]
    scores = ev.vqa_scores(responses, answers, types, EASY_VOCAB)
    assert scores["correct"] == 2 and scores["n"] == 5 and scores["accuracy"] == pytest.approx(0.4)
    assert scores["by_type"] == {
        "color": {"accuracy": 0.5, "n": 2},
        "shape": {"accuracy": 0.0, "n": 1},
        "yes/no": {"accuracy": 0.5, "n": 2},
    }
    assert scores["extracted"] == ["red", "yes", "no", "blue", "triangle"]
    assert ev.vqa_scores(["hmm"], ["red"], vocabulary=EASY_VOCAB)["unanswered"] == 1
    # Default vocabulary = the answers; default types from the answers.
    scores = ev.vqa_scores(["two", "Yes"], ["2", "no"])
    assert scores["accuracy"] == 0.5 and set(scores["by_type"]) == {"number", "yes/no"}
    with pytest.raises(ValueError, match="2 responses for 1 answers"):
        ev.vqa_scores(["a", "b"], ["a"])


# --------------------------------------------------------------------------------------------------------------------
# POPE


def test_pope_metrics_hand_computed():
    labels = ["yes", "yes", "yes", "no", "no"]
    responses = ["Yes.", "No, there is not.", "yes", "Yes, there is", "I don't see one"]  # last: unparsed -> no
    m = ev.pope_metrics(responses, labels)
    # tp=2 fp=1 fn=1 tn=1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(3 / 5)
    assert m["unparsed"] == 1 and m["n"] == 5
    always_no = ev.pope_metrics(["no"] * 4, ["yes", "no", "no", "yes"])
    assert always_no["precision"] == 0.0 and always_no["f1"] == 0.0 and always_no["accuracy"] == 0.5
    with pytest.raises(ValueError, match="labels must be 'yes' or 'no'"):
        ev.pope_metrics(["yes"], ["maybe"])


# --------------------------------------------------------------------------------------------------------------------
# Captions


def test_caption_scores_identical_is_max():
    refs = [
        "a large red circle and a small blue triangle",
        "three shapes on a light pink background",
        "the image shows one small green rectangle in the top left",
    ]
    perfect = ev.caption_scores(refs, [[r] for r in refs])
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["cider"] == pytest.approx(10.0, abs=1e-6)  # CIDEr-D's maximum: cosine 1 at every n, times 10
    # Case and punctuation do not matter (the tokenizer drops them).
    assert ev.caption_scores([r.upper() + "." for r in refs], [[r] for r in refs])["cider"] == pytest.approx(10.0)
    worse = ev.caption_scores(["a large red circle and a small green triangle", refs[1], refs[2]], [[r] for r in refs])
    assert worse["bleu4"] < 1.0 and worse["cider"] < 10.0
    assert worse["cider_per_image"][1:] == pytest.approx([10.0, 10.0]) and worse["cider_per_image"][0] < 10.0
    empty = ev.caption_scores(["", "", ""], [[r] for r in refs])
    assert empty["cider"] == 0.0 and empty["bleu4"] < 1e-6
    with pytest.raises(ValueError, match="references\\[0\\] must be a non-empty list"):
        ev.caption_scores(["x"], ["x"])


def test_caption_tokenize():
    assert ev.caption_tokenize("A Red, circle!  It's big.") == "a red circle its big"


# --------------------------------------------------------------------------------------------------------------------
# Encoder metrics


def test_zero_shot_accuracy_hand_computed():
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    images = torch.tensor([[2.0, 0.1], [0.1, 3.0], [-1.0, -0.5], [0.0, 1.0]])  # predicted: 0, 1, 2, 1
    assert ev.zero_shot_accuracy(images, classes, torch.tensor([0, 1, 2, 1])) == 1.0
    assert ev.zero_shot_accuracy(images, classes, torch.tensor([0, 0, 0, 0])) == 0.25
    assert ev.zero_shot_predictions(images, classes).tolist() == [0, 1, 2, 1]
    with pytest.raises(ValueError, match="labels must have shape"):
        ev.zero_shot_accuracy(images, classes, torch.tensor([0, 1]))


def test_retrieval_recall_hand_checked_4x4():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3],  # image 0: own text ranks 1st
            [0.8, 0.5, 0.6, 0.1],  # image 1: own text (0.5) ranks 3rd
            [0.1, 0.2, 0.3, 0.4],  # image 2: own text (0.3) ranks 2nd
            [0.7, 0.6, 0.5, 0.4],  # image 3: own text ranks 4th
        ]
    )
    r = ev.retrieval_recall(sim, ks=(1, 2, 3, 5))
    assert r["i2t_r1"] == 0.25 and r["i2t_r2"] == 0.5 and r["i2t_r3"] == 0.75 and r["i2t_r5"] == 1.0
    # Columns: text 0 -> image 0 (0.9) ranks 1st; text 1 -> image 1 (0.5) 2nd after 0.6; text 2 -> image 2 (0.3)
    # 3rd after 0.6 and 0.5; text 3 -> image 3 (0.4) ties with image 2 (0.4), which counts against it: 2nd.
    assert r["t2i_r1"] == 0.25 and r["t2i_r2"] == 0.75 and r["t2i_r3"] == 1.0
    # Ties count against the model: a constant matrix has no hits below k = N.
    flat = ev.retrieval_recall(torch.ones(4, 4), ks=(1, 3, 4))
    assert flat["i2t_r1"] == 0.0 and flat["i2t_r3"] == 0.0 and flat["i2t_r4"] == 1.0
    # Several positives per image: a hit if any of them is in the top k.
    pos = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.bool)
    sim2 = torch.tensor([[0.1, 0.9, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.9, 0.0, 0.0, 0.1]])
    r2 = ev.retrieval_recall(sim2, pos, ks=(1,))
    assert r2["i2t_r1"] == 0.75  # image 3's text ranks 2nd
    assert r2["t2i_r1"] == 0.75  # text 0's best image is image 3 (a negative); others hit
    with pytest.raises(ValueError, match="needs an explicit positives"):
        ev.retrieval_recall(torch.zeros(2, 3))


# --------------------------------------------------------------------------------------------------------------------
# Runners with scripted models


class PixelOracle:
    """Answers easy-VQA-style colour questions from the image's pixels, so a correct runner scores 100%."""

    def __init__(self):
        self.calls = []

    def generate_batch(self, images, prompts, **kw):
        self.calls.append((list(images), list(prompts), kw))
        out = []
        for img, prompt in zip(images, prompts):
            colors = {v: k for k, v in sw.COLOR_RGB.items()}
            found = {colors[p] for p in img.getdata() if p in colors}
            if prompt.startswith("what color"):
                out.append(f"The shape is {found.pop()}.")
            else:  # "is there a <colour> shape?"
                out.append("Yes." if prompt.split()[3] in found else "No, there is not.")
        return out


def _samples(tmp_path, n_images=5):
    scenes = sw.generate_scenes(n_images, seed=2, min_objects=1, max_objects=1)
    samples = []
    for i, scene in enumerate(scenes):
        path = tmp_path / f"{i}.png"
        scene.render().save(path)
        color = scene.objects[0].color
        other = next(c for c in sw.COLORS if c != color)
        samples += [
            {"image": str(path), "question": "what color is the shape?", "answer": color, "answer_type": "color"},
            {"image": str(path), "question": f"is there a {other} shape?", "answer": "no", "answer_type": "yes/no"},
            {"image": str(path), "question": f"is there a {color} shape?", "answer": "yes", "answer_type": "yes/no"},
        ]
    # Interleave images so grouping has something to do.
    return samples[::2] + samples[1::2]


def test_evaluate_vqa_groups_by_image_and_keeps_order(tmp_path):
    samples = _samples(tmp_path)
    chat = PixelOracle()
    result = ev.evaluate_vqa(chat, samples, batch_size=3, max_new_tokens=5, vocabulary=EASY_VOCAB, progress=False)
    assert result["accuracy"] == 1.0 and result["n"] == 15
    assert result["by_type"] == {"color": {"accuracy": 1.0, "n": 5}, "yes/no": {"accuracy": 1.0, "n": 10}}
    assert [p["question"] for p in result["predictions"]] == [s["question"] for s in samples]
    assert all(p["correct"] for p in result["predictions"])
    # Each batch holds one image's three questions, as the same loaded object, and generation keywords pass through.
    assert len(chat.calls) == 5
    for images, _prompts, kw in chat.calls:
        assert len(images) == 3 and all(im is images[0] for im in images)
        assert kw == {"max_new_tokens": 5}


def test_evaluate_vqa_scores_a_biased_model(tmp_path):
    samples = _samples(tmp_path)

    class AlwaysYes:
        def generate_batch(self, images, prompts, **kw):
            return ["Yes!"] * len(prompts)

    result = ev.evaluate_vqa(AlwaysYes(), samples, batch_size=4, vocabulary=EASY_VOCAB, progress=False)
    assert result["accuracy"] == pytest.approx(5 / 15)
    assert result["by_type"]["color"]["accuracy"] == 0.0 and result["by_type"]["yes/no"]["accuracy"] == 0.5


def test_evaluate_vqa_names_the_bad_sample(tmp_path):
    with pytest.raises(ValueError, match="samples\\[1\\] has no 'answer'"):
        ev.evaluate_vqa(
            PixelOracle(), [{"image": "a", "question": "q", "answer": "x"}, {"image": "a", "question": "q"}]
        )
    with pytest.raises(FileNotFoundError, match="sample 0"):
        ev.evaluate_vqa(PixelOracle(), [{"image": str(tmp_path / "nope.png"), "question": "q", "answer": "x"}],
                        progress=False)  # fmt: skip


def test_evaluate_pope_per_category(tmp_path):
    scenes = sw.generate_scenes(6, seed=4)
    rows = sw.pope_questions(scenes, per_image=2)
    for i, scene in enumerate(scenes):
        scene.render().save(tmp_path / f"{i}.png")
    samples = [{**r, "image": str(tmp_path / f"{r['scene_index']}.png")} for r in rows]

    class SaysYesToRed:  # hallucinates every red object, otherwise right
        def generate_batch(self, images, prompts, **kw):
            out = []
            for img, prompt in zip(images, prompts):
                sample = next(s for s in samples if s["question"] == prompt and img.getpixel((0, 0)) == _bg(s))
                out.append("yes" if sample["label"] == "yes" or " red " in prompt else "no")
            return out

    def _bg(sample):
        return scenes[sample["scene_index"]].background

    result = ev.evaluate_pope(SaysYesToRed(), samples, batch_size=5, progress=False)
    assert set(result["by_category"]) == set(sw.POPE_CATEGORIES)
    labels = [s["label"] for s in samples]
    expected = ev.pope_metrics(["yes" if lab == "yes" or " red " in s["question"] else "no" for s, lab in
                                zip(samples, labels)], labels)  # fmt: skip
    assert result["overall"] == expected
    assert result["overall"]["recall"] == 1.0


def test_evaluate_captions_with_scripted_model(tmp_path):
    scenes = sw.generate_scenes(4, seed=9)
    items = [(s.render(), sw.reference_captions(s)) for s in scenes]
    captions = {s.background: sw.short_caption(s) for s in scenes}

    class Captioner:
        def generate_batch(self, images, prompts, **kw):
            assert all(p == "Describe the image in one short sentence." for p in prompts)
            return [captions[im.getpixel((0, 0))] for im in images]

    result = ev.evaluate_captions(Captioner(), items, batch_size=3, progress=False)
    assert result["captions"] == [sw.short_caption(s) for s in scenes]
    assert result["bleu4"] == pytest.approx(1.0, abs=1e-6)  # the first reference is the short caption itself


# --------------------------------------------------------------------------------------------------------------------
# Runners with real (tiny, random) models


def test_evaluate_vqa_on_tiny_vlmchat(tmp_path, tiny_clip_dir, tiny_llama_dir):
    from vlm_chat import VLMChat

    chat = VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), mapper="mlp", device="cpu")
    samples = _samples(tmp_path, n_images=2)
    result = ev.evaluate_vqa(chat, samples, batch_size=4, max_new_tokens=3, vocabulary=EASY_VOCAB, progress=False)
    assert result["n"] == 6 and 0.0 <= result["accuracy"] <= 1.0
    assert sum(t["n"] for t in result["by_type"].values()) == 6
    # Batched answers are the same as one-at-a-time greedy answers.
    first = samples[0]
    one = chat.generate(first["image"], first["question"], max_new_tokens=3)
    assert result["predictions"][0]["response"] == one


def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", model_max_length=16)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_evaluate_encoder_on_tiny_dual_encoder(tmp_path, family):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(0)
    tokenizer = _word_tokenizer(sorted({w for w in " ".join(sw.short_caption(s) for s in sw.generate_scenes(40)).lower()
                                        .replace(",", " ").replace(".", " ").split()}))  # fmt: skip
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "vocab_size": len(tokenizer), "max_position_embeddings": 16}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    if family == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    processor = SimpleNamespace(image_processor=image_processor, tokenizer=tokenizer)

    scenes = sw.generate_scenes(12, seed=6)
    caption_items = [(s.render(), sw.short_caption(s)) for s in scenes]
    caption_items.append((scenes[0].render(), sw.short_caption(scenes[0])))  # a duplicate caption merges
    names = [f"{c} {s}" for c in sw.COLORS for s in sw.SHAPES]
    class_items = [(s.render(), s.objects[0].name) for s in scenes]
    r = ev.evaluate_encoder(model, processor, caption_items, class_items, names, class_template="a {}", batch_size=5)
    assert r["retrieval_n_images"] == 13 and r["retrieval_n_texts"] == 12 and r["zero_shot_n"] == 12
    assert 0.0 <= r["zero_shot_accuracy"] <= 1.0
    for d in ("i2t", "t2i"):
        assert 0.0 <= r[f"{d}_r1"] <= r[f"{d}_r5"] <= r[f"{d}_r10"] <= 1.0
    # Same numbers as the pure functions on embeddings computed by hand.
    with torch.no_grad():
        pixels = image_processor(images=[im for im, _ in class_items], return_tensors="pt")["pixel_values"]
        img = model.get_image_features(pixel_values=pixels)
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        padding = "max_length" if family == "siglip" else True
        enc = tokenizer([f"a {n}" for n in names], padding=padding, truncation=True, max_length=16, return_tensors="pt")
        kw = {"input_ids": enc["input_ids"]} if family == "siglip" else dict(enc)
        txt = model.get_text_features(**kw)
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    labels = torch.tensor([names.index(n) for _, n in class_items])
    assert r["zero_shot_accuracy"] == pytest.approx(ev.zero_shot_accuracy(img, txt, labels))
    guesses = ev.evaluate_encoder(model, processor, None, class_items, names, "a {}", 5, return_predictions=True)
    assert guesses["zero_shot_predictions"] == [names[k] for k in ev.zero_shot_predictions(img, txt).tolist()]
    right = sum(g == n for g, (_, n) in zip(guesses["zero_shot_predictions"], class_items))
    assert right / len(class_items) == pytest.approx(r["zero_shot_accuracy"])

    # From a saved directory (loaded with AutoModel) the numbers are the same.
    model.save_pretrained(tmp_path / "enc")
    r2 = ev.evaluate_encoder(str(tmp_path / "enc"), processor, caption_items, class_items, names, "a {}", 5)
    assert r2 == pytest.approx(r)


def test_load_eval_jsonl_reads_written_sets(tmp_path):
    counts = sw.write_shapes_dataset(tmp_path, n_images=3, seed=1)
    vqa = ev.load_eval_jsonl(tmp_path / "vqa.jsonl", required=("image", "question", "answer"))
    pope = ev.load_eval_jsonl(tmp_path / "pope.jsonl", required=("image", "question", "label"))
    assert len(vqa) == counts["vqa.jsonl"] and len(pope) == counts["pope.jsonl"]
    assert all(os.path.isabs(r["image"]) and os.path.isfile(r["image"]) for r in vqa + pope)
    (tmp_path / "bad.jsonl").write_text('{"image": "images/x.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 1: missing field"):
        ev.load_eval_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('\n{"image": "nope.png", "question": "q"}\n')
    with pytest.raises(FileNotFoundError, match="line 2: image"):
        ev.load_eval_jsonl(tmp_path / "bad.jsonl")
