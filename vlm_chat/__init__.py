"""vlm-chat: a frozen CLIP/SigLIP vision tower, a small trainable mapper and a LoRA-tuned causal LM."""

import logging
from pathlib import Path

# peft imports bitsandbytes, whose CPU backend warns at import that an optional hub-downloaded kernel package
# ("kernels") is missing; it falls back to its own kernels, so on every CLI call the warning is only noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

#: Directory of the shipped demo model (mapper, adapter, tokenizer, processor and its own small vision tower).
DEMO_MODEL = str(Path(__file__).resolve().parent / "demo_model")
#: The demo's vision tower is its whole stage-0 dual encoder (a CLIPModel directory: vision + text towers, tokenizer,
#: processor); the VLM reads its vision half, zero-shot and retrieval checks (``vlm-chat eval encoder``) read both.
DEMO_ENCODER = str(Path(DEMO_MODEL) / "vision")


def __getattr__(name):
    # Lazy import keeps `import vlm_chat` cheap (torch/transformers load only when the model is used).
    if name == "VLMChat":
        from vlm_chat.chat import VLMChat

        return VLMChat
    raise AttributeError(f"module 'vlm_chat' has no attribute {name!r}")


__all__ = ["DEMO_ENCODER", "DEMO_MODEL", "VLMChat", "__version__"]
