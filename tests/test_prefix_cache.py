"""Shared-prefix generation gives today's greedy answers, runs each image once, and falls back where it cannot share."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image

from vlm_chat import VLMChat
from vlm_chat.eval.common import generate_grouped
from vlm_chat.prefix_cache import generate_shared_prefix, shared_prefix_length

# Several questions per image, of different token lengths (so the batch pads between prefix and question).
QUESTIONS = ["What color is it?", "Is there a red circle in the picture, or is it something else entirely?", "Shape?",
             "How many shapes are there in this image?"]


def test_shared_prefix_length_hand_checked():
    img = 9
    assert shared_prefix_length([[1, 2, img, img, 5, 6], [1, 2, img, img, 5, 7, 8]], img) == 5
    assert shared_prefix_length([[1, img, 3], [1, img, 3]], img) == 2  # each keeps its last token
    assert shared_prefix_length([[1, 2, img, 4], [1, 3, img, 4]], img) is None  # the image is past the shared part
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4]], img) is None  # no image
    assert shared_prefix_length([[1, img], [1, img, 3]], img) is None  # the shortest would keep nothing of its own
    assert shared_prefix_length([], img) is None


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def chat(request, tiny_clip_dir, tiny_llama_dir, tiny_qwen2_dir):
    lm = tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir
    return VLMChat.from_components(str(tiny_clip_dir), str(lm), mapper="mlp", device="cpu")


def _images():
    return [make_image((220, 40, 40)), make_image((30, 60, 220), "square"), make_image((40, 200, 40))]


def test_same_greedy_answers_as_generate_batch(chat):
    images = _images()
    batch_images = [im for im in images for _ in QUESTIONS]  # the same object for an image's questions
    prompts = QUESTIONS * len(images)
    expected = chat.generate_batch(batch_images, prompts, max_new_tokens=6)
    assert generate_shared_prefix(chat, batch_images, prompts, max_new_tokens=6) == expected
    assert len(set(expected)) > 1  # the answers differ, so agreement means something
    # One at a time (no padding at all) agrees too.
    assert [chat.generate(im, q, max_new_tokens=6) for im, q in zip(batch_images, prompts)] == expected


def test_prefix_runs_once_per_image(chat, monkeypatch):
    images = _images()
    seen = []
    original = chat.model.vision.forward
    monkeypatch.setattr(chat.model.vision, "forward", lambda pixels, *a, **k: seen.append(len(pixels)) or
                        original(pixels, *a, **k))
    batch_images = [im for im in images for _ in QUESTIONS]
    generate_shared_prefix(chat, batch_images, QUESTIONS * len(images), max_new_tokens=3)
    assert seen == [len(images)]  # one tower pass over the 3 distinct images, not 12
    seen.clear()
    chat.generate_batch(batch_images, QUESTIONS * len(images), max_new_tokens=3)
    assert seen == [len(batch_images)]


def test_grouped_runner_same_answers_either_way(chat, tmp_path):
    paths = []
    for i, im in enumerate(_images()):
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    images = [paths[i % 3] for i in range(10)]  # interleaved: grouping has work to do
    prompts = [QUESTIONS[i % 4] for i in range(10)]
    shared = generate_grouped(chat, images, prompts, 4, "", False, share_prefix=True, max_new_tokens=5)
    plain = generate_grouped(chat, images, prompts, 4, "", False, share_prefix=False, max_new_tokens=5)
    assert shared == plain


def test_falls_back_where_sharing_does_not_apply(chat, monkeypatch):
    calls = []
    original = chat.generate_batch
    monkeypatch.setattr(chat, "generate_batch", lambda *a, **k: calls.append(k) or original(*a, **k))
    image = make_image()
    # Sampling: today's path, with the keywords passed on.
    torch.manual_seed(0)
    generate_shared_prefix(chat, [image, image], ["What?", "Where?"], do_sample=True, max_new_tokens=2)
    assert calls == [{"do_sample": True, "max_new_tokens": 2}]
    # Text-only prompts.
    calls.clear()
    generate_shared_prefix(chat, [None, None], ["Hi", "Hello there"], max_new_tokens=2)
    assert len(calls) == 1
    # The image after text that differs: no prefix holds it.
    calls.clear()
    out = generate_shared_prefix(chat, [image, image], ["Look: <image> what?", "See <image> where?"],
                                 max_new_tokens=2)
    assert len(calls) == 1 and out == original([image, image], ["Look: <image> what?", "See <image> where?"],
                                               max_new_tokens=2)
    # Greedy, image first: shared, generate_batch not called.
    calls.clear()
    generate_shared_prefix(chat, [image, image], ["What?", "Where?"], max_new_tokens=2)
    assert calls == []


def test_scripted_models_get_generate_batch():
    class Scripted:
        def generate_batch(self, images, prompts, **kw):
            return [f"{p}:{kw}" for p in prompts]

    assert generate_shared_prefix(Scripted(), ["a", "a"], ["x", "y"], max_new_tokens=1) == [
        "x:{'max_new_tokens': 1}", "y:{'max_new_tokens': 1}"]


def test_grouped_batches_hold_whole_images_when_sharing():
    class Recorder:
        def __init__(self):
            self.batches = []

        def generate_batch(self, images, prompts, **kw):
            self.batches.append(list(prompts))
            return list(prompts)

    sizes = {"a": 2, "b": 5, "c": 1, "d": 1, "e": 3}
    pictures = {name: make_image() for name in sizes}
    images = [pictures[name] for name, n in sizes.items() for _ in range(n)]
    prompts = [f"{name}{k}" for name, n in sizes.items() for k in range(n)]
    shared, plain = Recorder(), Recorder()
    assert generate_grouped(shared, images, prompts, 4, "", False, share_prefix=True) == prompts
    # Whole images per batch; "b" (5 questions) is the one split.
    assert shared.batches == [["a0", "a1"], ["b0", "b1", "b2", "b3"], ["b4", "c0", "d0"], ["e0", "e1", "e2"]]
    assert generate_grouped(plain, images, prompts, 4, "", False, share_prefix=False) == prompts
    assert plain.batches == [prompts[0:4], prompts[4:8], prompts[8:12]]  # runs of batch_size questions, as before
