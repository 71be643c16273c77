"""vlm-chat: a frozen CLIP/SigLIP vision tower, a small trainable mapper and a LoRA-tuned causal LM."""

from pathlib import Path

__version__ = "0.1.0"

#: Directory of the shipped demo model (mapper, adapter, tokenizer, processor and its own small vision tower).
DEMO_MODEL = str(Path(__file__).resolve().parent / "demo_model")


def __getattr__(name):
    # Lazy import keeps `import vlm_chat` cheap (torch/transformers load only when the model is used).
    if name == "VLMChat":
        from vlm_chat.chat import VLMChat

        return VLMChat
    raise AttributeError(f"module 'vlm_chat' has no attribute {name!r}")


__all__ = ["DEMO_MODEL", "VLMChat", "__version__"]
