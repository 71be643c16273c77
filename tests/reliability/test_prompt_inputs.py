"""Prompts, history, batches and generation settings: odd ones are answered, wrong ones are refused naming the problem.
"""

from __future__ import annotations

import pytest

from reliability.inputs import GEN, N_TOKENS, QUESTION, ask
from vlm_chat import VLMChat


def test_unicode_and_emoji_prompts(chat, refs):
    prompt = "Что это? 这是什么颜色？ 🎨🟥 Ünïcödé — «quotes» \u200d\U0001f469\u200d\U0001f4bb"
    answer = chat.generate(refs["scene"], prompt, **GEN)
    assert answer and "".join(chat.stream(refs["scene"], prompt, **GEN)).strip() == answer
    # The prompt reaches the model intact (no mojibake, no dropped code points).
    ids = chat.processor.encode_prompt(prompt, has_image=True).input_ids
    assert prompt in chat.processor.tokenizer.decode(ids)


def test_prompt_longer_than_the_context_keeps_every_image_token(tiny_clip_dir, tiny_llama_dir, refs):
    """The text is cut from the start; the visual tokens never are (and the image still decides the answer)."""
    small = VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), lm_config={"max_length": 96}, device="cpu")
    long_prompt = "Please look very carefully. " * 400 + QUESTION
    history = [{"role": "user", "content": "Describe it. " * 50}, {"role": "assistant", "content": "Shapes. " * 50}]
    answers = {}
    for name in ("scene", "gray"):
        answers[name] = small.generate(refs[name], long_prompt, history=history, **GEN)
        assert "".join(small.stream(refs[name], long_prompt, history=history, **GEN)).strip() == answers[name]
    assert answers["scene"] != answers["gray"]
    enc = small.processor.encode_prompt(long_prompt, history, has_image=True, reserve=N_TOKENS)
    assert len(enc.input_ids) <= 96 - N_TOKENS
    assert enc.input_ids.count(small.processor.image_token_id) == small.config.num_image_tokens
    assert QUESTION in small.processor.tokenizer.decode(enc.input_ids)  # the end of the prompt survives


def test_literal_image_marker_places_the_image(chat, refs):
    at_start = chat.generate(refs["scene"], QUESTION, **GEN)
    assert chat.generate(refs["scene"], f"<image>\n{QUESTION}", **GEN) == at_start  # the default place, spelled out
    elsewhere = chat.generate(refs["scene"], f"{QUESTION} Here it is: <image>", **GEN)
    assert elsewhere and elsewhere != at_start  # the marker moved the image
    assert chat.generate(refs["scene"], "<image>", **GEN)  # an image-only turn is a valid prompt


def test_text_only_turns(chat):
    text = chat.generate(None, "Hello! Who are you?", **GEN)
    assert text and "".join(chat.stream(None, "Hello! Who are you?", **GEN)).strip() == text
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert chat.generate(None, "How are you?", history=history, **GEN)


def test_multi_turn_with_the_marker_in_an_earlier_turn(chat, refs):
    history = [{"role": "user", "content": f"<image>\n{QUESTION}"}, {"role": "assistant", "content": "Shapes."}]
    same = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Shapes."}]
    assert chat.generate(refs["scene"], "And the colours?", history=history, **GEN) == chat.generate(
        refs["scene"], "And the colours?", history=same, **GEN
    )


def test_caption_is_the_prompt_less_call(chat, refs):
    short, detailed = chat.caption(refs["scene"], **GEN), chat.caption(refs["scene"], detailed=True, **GEN)
    assert short and detailed and short != detailed


BAD_PROMPTS = {
    "empty": ("", ValueError, "prompt is empty"),
    "whitespace_only": (" \n\t\u3000 ", ValueError, "prompt is empty"),
    "none": (None, TypeError, "prompt must be a string, got NoneType"),
    "bytes": (b"What?", TypeError, "prompt must be a string, got bytes"),
    "two_markers_one_image": ("<image> and <image>?", ValueError, "2 '<image>' markers for one image"),
}


@pytest.mark.parametrize("entry", ["generate", "stream"])
@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_bad_prompts_are_refused(chat, refs, case, entry):
    prompt, exc, pattern = BAD_PROMPTS[case]
    with pytest.raises(exc, match=pattern):
        ask(chat, entry, refs["scene"], prompt)


def test_markers_must_match_the_images(chat, refs):
    history = [{"role": "user", "content": "<image> first"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(ValueError, match="2 '<image>' marker"):  # one in the history, one in the prompt
        chat.generate(refs["scene"], "<image> again", history=history, **GEN)
    with pytest.raises(ValueError, match="1 '<image>' marker.*0 image"):  # a marker in a text-only turn
        chat.generate(None, "What is <image>?", **GEN)


def test_caption_needs_an_image(chat):
    with pytest.raises(ValueError, match="caption\\(\\) needs an image"):
        chat.caption(None)


def test_batches_must_be_consistent(chat, refs):
    with pytest.raises(ValueError, match="got 2 images for 1 prompts"):
        chat.generate_batch([refs["scene"], refs["gray"]], [QUESTION])
    with pytest.raises(ValueError, match="all images or all text-only"):
        chat.generate_batch([refs["scene"], None], [QUESTION, QUESTION])


def test_out_of_range_generation_settings_are_refused(chat, refs):
    with pytest.raises(ValueError, match="max_new_tokens"):
        chat.generate(refs["scene"], QUESTION, max_new_tokens=0)


def test_misspelled_generation_keyword_is_refused(chat, refs):
    """transformers' GenerationConfig keeps unknown keys and ignores them: max_new_token=2 generated 64 tokens."""
    with pytest.raises(
        TypeError, match="unknown generation keyword.*'max_new_token' \\(did you mean 'max_new_tokens'\\?\\)"
    ):
        chat.generate(refs["scene"], QUESTION, max_new_token=2)


@pytest.mark.parametrize(
    "history",
    [[{"role": "user"}], ["hello"], "not a list", [{"role": "bot", "content": "x"}]],
    ids=["no_content", "strings", "not_a_list", "unknown_role"],
)
def test_malformed_history_is_refused_naming_the_turn(chat, refs, history):
    """A KeyError('content') or "string indices must be integers" named neither the history nor the turn. A history
    that is not a list at all (a string, a number: found by tests/test_fuzz_generate.py) is refused as a whole."""
    with pytest.raises((ValueError, TypeError), match=r"history(\[0\]| must be a list of turns, got str)"):
        chat.generate(refs["scene"], QUESTION, history=history, **GEN)


def test_unknown_mapper_is_refused_listing_the_valid_ones(tiny_clip_dir, tiny_llama_dir):
    with pytest.raises(ValueError, match="unknown mapper 'resampler'; valid mappers: mlp, perceiver, qformer"):
        VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), mapper="resampler", device="cpu")


def test_anchor_batched_generation_pads_left_whatever_the_tokenizer_says(chat, refs):
    """transformers #32268: batched generation with a right-padding tokenizer generates after the pad tokens and
    gives wrong text for the shorter prompts. Many LLM tokenizers ship with padding_side="right"; generate_batch
    must left-pad anyway and match one-at-a-time answers for prompts of very different lengths.
    """
    tokenizer = chat.processor.tokenizer
    saved = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        prompts = ["Hi", "Describe every shape in this picture, its colour and its position, in detail please."]
        images = [refs["scene"], refs["gray"]]
        assert chat.generate_batch(images, prompts, **GEN) == [
            chat.generate(i, p, **GEN) for i, p in zip(images, prompts)
        ]
        assert chat.generate_batch([None, None], prompts, **GEN) == [chat.generate(None, p, **GEN) for p in prompts]
    finally:
        tokenizer.padding_side = saved
