"""The transformers Llava export: loads without vlm-chat, answers as the source model, refuses what it cannot hold."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_image

from vlm_chat.export import ExportCheckError

LORA = {"lora_r": 4, "lora_dropout": 0.0}


def _chat(vision_dir, lm_dir, mapper="mlp", drop_cls=None, **mapper_config):
    from vlm_chat import VLMChat

    chat = VLMChat.from_components(str(vision_dir), str(lm_dir), mapper, device="cpu", lm_config=LORA,
                                   mapper_config=mapper_config or None)
    if drop_cls is not None:  # rebuild with the tower told to keep (or drop) its CLS token
        chat.config.vision.drop_cls = drop_cls
        chat.config.num_image_tokens = 0
        chat = VLMChat.from_config(chat.config, device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero: make the adapter matter, so an unmerged or misplaced copy shows
        for name, p in chat.model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return chat


def _probes():
    return [(make_image(), "What colour is the shape?"), (make_image((30, 60, 220), "square"), "Which shape?"),
            (None, "Say hello.")]


CASES = {  # vision tower, LLM, drop_cls -> Llava's feature strategy and the visual token count (32 px / 8 px patches)
    "clip-llama-cls-dropped": ("tiny_clip_dir", "tiny_llama_dir", None, "default", 16),
    "clip-llama-cls-kept": ("tiny_clip_dir", "tiny_llama_dir", False, "full", 17),
    "siglip-qwen2": ("tiny_siglip_dir", "tiny_qwen2_dir", None, "full", 16),
}


@pytest.mark.parametrize("case", CASES)
def test_llava_export_loads_with_transformers_and_answers_as_the_source(case, request, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    vision, lm, drop_cls, strategy, n_vis = CASES[case]
    chat = _chat(request.getfixturevalue(vision), request.getfixturevalue(lm), drop_cls=drop_cls)
    assert chat.config.num_image_tokens == n_vis
    out = tmp_path / "llava"
    report = chat.export(out, format="llava", probes=_probes(), max_new_tokens=8)
    assert report["greedy_equal"] == report["probes"] == 3
    assert report["max_logit_diff"] <= report["logit_tolerance"]

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_feature_select_strategy"] == strategy
    assert config["vision_feature_layer"] == -2
    assert config["image_seq_length"] == n_vis
    assert config["image_token_index"] == chat.processor.image_token_id  # LlavaConfig.image_token_id on disk
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == [chat.processor.image_token_id]
    assert gen["eos_token_id"] == chat.processor.stop_token_ids
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in out.rglob("*"))  # safetensors only

    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(model, LlavaForConditionalGeneration)
    # The merged weights: q_proj of layer 0 is W + scale * B @ A of the source adapter.
    src = chat.model.causal_lm.model.layers[0].self_attn.q_proj
    delta = src.lora_B["default"].weight @ src.lora_A["default"].weight
    merged = src.base_layer.weight + src.scaling["default"] * delta
    assert torch.allclose(model.model.language_model.layers[0].self_attn.q_proj.weight, merged, atol=1e-6)
    # The processor expands one <image> to exactly the model's visual token count.
    messages = [{"role": "user", "content": [{"type": "image", "image": make_image()}, {"type": "text", "text": "Hi"}]}]
    enc = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert enc["input_ids"][0].count(chat.processor.image_token_id) == n_vis


def test_export_runs_in_a_pipeline_without_vlm_chat(tiny_clip_dir, tiny_llama_dir, tmp_path):
    chat = _chat(tiny_clip_dir, tiny_llama_dir)
    out = tmp_path / "llava"
    chat.export(out, format="llava", probes=_probes()[:1], max_new_tokens=8)
    image = tmp_path / "blue.png"
    make_image((30, 60, 220), "square").save(image)
    script = f"""
import json, sys
from PIL import Image
from transformers import pipeline
pipe = pipeline("image-text-to-text", model={str(out)!r}, device="cpu")
messages = [{{"role": "user", "content": [{{"type": "image", "image": Image.open({str(image)!r}).convert("RGB")}},
                                          {{"type": "text", "text": "What is it?"}}]}}]
out = pipe(text=messages, max_new_tokens=8, return_full_text=False)
assert not any(m.startswith("vlm_chat") for m in sys.modules), "vlm_chat was imported"
print("ANSWER=" + json.dumps(out[0]["generated_text"]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout.split("ANSWER=")[-1])
    from PIL import Image

    expected = chat.generate(Image.open(image).convert("RGB"), "What is it?", max_new_tokens=8)
    assert answer.strip() == expected  # generate() strips the leading space of the first token


@pytest.mark.parametrize("mapper, extra, why", [
    ("perceiver", {}, "perceiver mapper has no Llava counterpart"),
    ("qformer", {}, "qformer mapper has no Llava counterpart"),
    ("mlp", {"depth": 1}, "has 1 linear layer"),
    ("mlp", {"depth": 3}, "has 3 linear layer"),
    ("mlp", {"pool": 2}, "average-pools the patch grid 2x2"),
    ("mlp", {"position_embedding": True}, "learned embedding per patch position"),
])
def test_what_llava_cannot_hold_is_refused_before_writing(tiny_clip_dir, tiny_smollm2_dir, tmp_path, mapper, extra,
                                                           why):
    chat = _chat(tiny_clip_dir, tiny_smollm2_dir, mapper, **extra)
    with pytest.raises(ValueError, match=why) as err:
        chat.export(tmp_path / "out", format="llava")
    assert "--format merged" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_qlora_without_a_full_precision_base_is_refused(tiny_clip_dir, tiny_smollm2_dir, tmp_path):
    chat = _chat(tiny_clip_dir, tiny_smollm2_dir)
    chat.config.lm.load_in_4bit = True  # what a QLoRA checkpoint's config says (bitsandbytes 4-bit needs a GPU)
    with pytest.raises(ValueError, match="4-bit .*load_in_4bit to false"):
        chat.export(tmp_path / "out", format="llava")
    assert list(tmp_path.iterdir()) == []


def test_a_mismatch_fails_the_export_and_keeps_the_previous_directory(tiny_clip_dir, tiny_llama_dir, tmp_path,
                                                                    monkeypatch):
    import vlm_chat.export as export

    chat = _chat(tiny_clip_dir, tiny_llama_dir)
    out = tmp_path / "llava"
    out.mkdir()
    (out / "previous.txt").write_text("old export")
    build = export.build_llava

    def broken(chat, merge_lora=True):  # a projector off by a little: what a wrong layout or activation would do
        llava = build(chat, merge_lora)
        with torch.no_grad():
            llava.model.multi_modal_projector.linear_2.bias.add_(0.05)
        return llava

    monkeypatch.setattr(export, "build_llava", broken)
    with pytest.raises(ExportCheckError, match=r"probe 0 \(image, 'What colour is the shape\?'\): logits differ"):
        chat.export(out, format="llava", probes=_probes(), max_new_tokens=4)
    assert [p.name for p in tmp_path.iterdir()] == ["llava"]
    assert [p.name for p in out.iterdir()] == ["previous.txt"]


def test_a_template_that_renders_otherwise_is_named(tiny_clip_dir, tiny_llama_dir, tmp_path, monkeypatch):
    import vlm_chat.export as export

    chat = _chat(tiny_clip_dir, tiny_llama_dir)
    template = export.processor_chat_template
    monkeypatch.setattr(export, "processor_chat_template", lambda chat: "{{ bos_token }}" + template(chat))  # 2 BOS
    with pytest.raises(ExportCheckError, match="prompt differs at token 1"):
        chat.export(tmp_path / "llava", format="llava", probes=_probes()[:1], max_new_tokens=4)
    assert not (tmp_path / "llava").exists()


def test_the_system_prompt_goes_into_the_exported_template(tiny_clip_dir, tiny_smollm2_dir, tmp_path):
    from vlm_chat import VLMChat

    chat = VLMChat.from_components(str(tiny_clip_dir), str(tiny_smollm2_dir), device="cpu", lm_config=LORA,
                                   system_prompt="")  # as the demo: an empty system turn instead of SmolLM2's default
    report = chat.export(tmp_path / "llava", format="llava", probes=_probes(), max_new_tokens=4)
    assert report["greedy_equal"] == 3
    text = (tmp_path / "llava" / "chat_template.jinja").read_text()
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tmp_path / "llava")
    rendered = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                        add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert "SmolLM" in text  # the LLM's own template follows the prelude


def test_unknown_format_and_merged_default(tiny_clip_dir, tiny_smollm2_dir, tmp_path):
    from vlm_chat import VLMChat

    chat = _chat(tiny_clip_dir, tiny_smollm2_dir)
    with pytest.raises(ValueError, match="unknown export format 'gguf'; valid formats: merged, llava"):
        chat.export(tmp_path / "x", format="gguf")
    assert chat.export(tmp_path / "merged") is None  # the default format: a vlm-chat checkpoint, LoRA merged
    card = (tmp_path / "merged" / "README.md").read_text()
    assert f"- language model: `{tiny_smollm2_dir}`, LoRA merged" in card  # the source LLM, not the lm/ copy
    loaded = VLMChat.from_pretrained(tmp_path / "merged", device="cpu")
    assert loaded.config.lm.use_lora is False
    image = make_image()
    assert loaded.generate(image, "Hi", max_new_tokens=6) == chat.generate(image, "Hi", max_new_tokens=6)


def test_cli_export(tiny_clip_dir, tiny_llama_dir, tmp_path, capsys):
    from vlm_chat.cli import main

    ckpt = tmp_path / "ckpt"
    _chat(tiny_clip_dir, tiny_llama_dir).save_pretrained(ckpt)
    assert main(["export", "--format", "llava", "--model", str(ckpt), str(tmp_path / "llava")]) == 0
    printed = capsys.readouterr().out
    assert "greedy text equal on 5/5 probes" in printed
    assert (tmp_path / "llava" / "model.safetensors").is_file()

    perceiver = tmp_path / "perceiver"
    _chat(tiny_clip_dir, tiny_llama_dir, "perceiver").save_pretrained(perceiver)
    assert main(["export", "--format", "llava", "--model", str(perceiver), str(tmp_path / "p")]) == 2
    assert "perceiver mapper has no Llava counterpart" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    assert main(["export", "--format", "merged", "--model", str(ckpt), str(ckpt)]) == 2
    assert "is the checkpoint this model was loaded from" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--model", str(ckpt), str(tmp_path / "q")])
    assert exit_.value.code == 2
    assert "--format" in capsys.readouterr().err


@pytest.mark.slow  # the real SmolLM2-135M: ~105 CPU-seconds (a 540 MB write, two models decoding 5 x 24 tokens)
def test_demo_model_exports_with_identical_greedy_text(tmp_path):
    import vlm_chat
    from vlm_chat import VLMChat

    chat = VLMChat.from_pretrained(vlm_chat.DEMO_MODEL, device="cpu")
    report = chat.export(tmp_path / "demo_llava", format="llava")
    assert report["greedy_equal"] == report["probes"] == 5
    assert report["max_logit_diff"] <= report["logit_tolerance"]
    assert (tmp_path / "demo_llava" / "model.safetensors").stat().st_size > 500e6  # the full LLM, not a reference
