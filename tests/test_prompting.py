"""Prompt building, image-token expansion and assistant-label masks from the chat template itself."""

import pytest
from transformers import AutoTokenizer, CLIPImageProcessor

from vlm_chat.prompting import IGNORE_INDEX, VLMProcessor

CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]},
    {"role": "assistant", "content": "The circle is red."},
    {"role": "user", "content": "And how many shapes are there?"},
    {"role": "assistant", "content": "There are 2 shapes: a circle and a square."},
]
ASSISTANT_TEXTS = ["The circle is red.", "There are 2 shapes: a circle and a square."]


def _processor(tokenizer, n_vis=4, max_length=256):
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return VLMProcessor(tokenizer, CLIPImageProcessor(), "<image>", n_vis, max_length)


def _runs(labels):
    """Contiguous runs of supervised token ids."""
    runs, cur = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(label)
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("family", ["smollm2", "chatml", "llama3", "llama2"])
def test_assistant_mask_decodes_to_exactly_the_assistant_text(tokenizer_factory, family):
    proc = _processor(tokenizer_factory(family))
    enc = proc.encode_conversation(CONVERSATION, num_images=1)
    runs = _runs(enc.labels)
    assert len(runs) == 2
    decoded = [proc.tokenizer.decode(r, skip_special_tokens=True).strip() for r in runs]
    assert decoded == ASSISTANT_TEXTS
    # Each run ends with the template's end-of-turn token, so the model learns to stop.
    for run in runs:
        assert run[-1] in proc.stop_token_ids
    # Labels equal the input ids where supervised.
    assert all(lab in (IGNORE_INDEX, tok) for lab, tok in zip(enc.labels, enc.input_ids))


@pytest.mark.parametrize("family", ["smollm2", "chatml", "llama3", "llama2"])
def test_stop_tokens_come_from_the_template(tokenizer_factory, family):
    proc = _processor(tokenizer_factory(family))
    names = {proc.tokenizer.convert_ids_to_tokens(i) for i in proc.stop_token_ids}
    expected = {"smollm2": "<|im_end|>", "chatml": "<|im_end|>", "llama3": "<|eot_id|>", "llama2": "</s>"}[family]
    assert expected in names


def test_image_token_is_expanded_once_per_image(tokenizer_factory):
    proc = _processor(tokenizer_factory("chatml"), n_vis=7)
    enc = proc.encode_conversation(CONVERSATION, num_images=1)
    positions = [i for i, t in enumerate(enc.input_ids) if t == proc.image_token_id]
    assert len(positions) == 7 and positions == list(range(positions[0], positions[0] + 7))
    assert all(enc.labels[i] == IGNORE_INDEX for i in positions)


def test_literal_image_marker_places_the_image(tokenizer_factory):
    proc = _processor(tokenizer_factory("chatml"), n_vis=3)
    enc = proc.encode_prompt("Look at this: <image> what is it?", has_image=True)
    text = proc.tokenizer.decode(enc.input_ids)
    assert "Look at this: " + "<image>" * 3 + " what is it?" in text
    default = proc.tokenizer.decode(proc.encode_prompt("what is it?", has_image=True).input_ids)
    assert "<image>" * 3 + "\nwhat is it?" in default


def test_two_markers_for_one_image_is_an_error(tokenizer_factory):
    proc = _processor(tokenizer_factory("chatml"))
    with pytest.raises(ValueError, match="2 '<image>' markers"):
        proc.encode_prompt("<image> and <image>?", has_image=True)
    with pytest.raises(ValueError, match="1 '<image>' marker"):
        proc.encode_prompt("text only <image>", has_image=False)


def test_text_only_prompt_has_no_image_tokens(tokenizer_factory):
    proc = _processor(tokenizer_factory("smollm2"))
    enc = proc.encode_prompt("Hello there", has_image=False)
    assert proc.image_token_id not in enc.input_ids
    assert proc.tokenizer.decode(enc.input_ids).endswith("<|im_start|>assistant\n")


def test_history_turns_are_rendered(tokenizer_factory):
    proc = _processor(tokenizer_factory("smollm2"), n_vis=2)
    history = [{"role": "user", "content": "What color?"}, {"role": "assistant", "content": "Red."}]
    text = proc.tokenizer.decode(proc.encode_prompt("And the shape?", history).input_ids)
    assert text.index("<image><image>\nWhat color?") < text.index("Red.") < text.index("And the shape?")


def test_training_truncation_never_cuts_visual_tokens(tokenizer_factory):
    proc = _processor(tokenizer_factory("chatml"), n_vis=40, max_length=45)
    # The image tokens alone end past max_length: the sample is skipped, not cut.
    assert proc.encode_conversation(CONVERSATION, num_images=1) is None
    proc = _processor(tokenizer_factory("chatml"), n_vis=4, max_length=40)
    enc = proc.encode_conversation(CONVERSATION, num_images=1)
    assert len(enc.input_ids) == 40 and enc.input_ids.count(proc.image_token_id) == 4


def test_inference_truncation_cuts_text_not_image(tokenizer_factory):
    proc = _processor(tokenizer_factory("chatml"), n_vis=8, max_length=64)
    long_prompt = "word " * 200 + "final question?"
    enc = proc.encode_prompt(long_prompt, reserve=8)
    assert len(enc.input_ids) <= 56
    assert enc.input_ids.count(proc.image_token_id) == 8
    assert "final question?" in proc.tokenizer.decode(enc.input_ids)
    with pytest.raises(ValueError, match="does not fit"):
        _processor(tokenizer_factory("chatml"), n_vis=60, max_length=64).encode_prompt("hi", reserve=8)


def test_sample_without_assistant_turn_is_refused(tokenizer_factory):
    proc = _processor(tokenizer_factory("chatml"))
    with pytest.raises(ValueError, match="assistant turn"):
        proc.encode_conversation([{"role": "user", "content": "<image>\nhi"}], num_images=1)


def test_pad_left_and_right(tokenizer_factory):
    proc = _processor(tokenizer_factory("chatml"))
    a, b = proc.encode_prompt("a"), proc.encode_prompt("a much longer prompt here")
    left = proc.pad([a, b], "left")
    right = proc.pad([a, b], "right")
    assert left["attention_mask"][0, 0] == 0 and left["attention_mask"][0, -1] == 1
    assert right["attention_mask"][0, 0] == 1 and right["attention_mask"][0, -1] == 0
    assert left["input_ids"][0, -len(a.input_ids):].tolist() == a.input_ids


def test_system_prompt_replaces_the_template_default_in_training_and_chat(tiny_smollm2_dir):
    """SmolLM2's template inserts a 20-token default system turn; a configured system prompt replaces it everywhere."""

    tokenizer = AutoTokenizer.from_pretrained(tiny_smollm2_dir)
    default = VLMProcessor(tokenizer, None, "<image>", 4, 256)
    empty = VLMProcessor(tokenizer, None, "<image>", 4, 256, system_prompt="")
    conv = [{"role": "user", "content": "<image>\nWhat color?"}, {"role": "assistant", "content": "red"}]
    assert "SmolLM" in default.render(conv, add_generation_prompt=False)
    assert "SmolLM" not in empty.render(conv, add_generation_prompt=False)
    a, b = default.encode_conversation(conv, 1), empty.encode_conversation(conv, 1)
    assert len(b.input_ids) < len(a.input_ids) - 10
    supervised = [t for t, label in zip(b.input_ids, b.labels) if label != -100]
    assert tokenizer.decode(supervised) == "red<|im_end|>"
    prompt = empty.encode_prompt("What color?", has_image=True)
    assert prompt.input_ids == b.input_ids[: len(prompt.input_ids)]  # chat sees exactly the training prefix
    # a conversation that brings its own system turn keeps it
    own = [{"role": "system", "content": "Be terse."}, *conv]
    assert "Be terse." in empty.render(own, add_generation_prompt=False)
