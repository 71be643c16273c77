"""Typed configuration of a VLM: which vision tower, which mapper, which LLM and how it is adapted.

The same dataclasses are written to a checkpoint's ``config.json`` and read back by ``VLMChat.from_pretrained``; they
are also the ``model`` part of the training configs. Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Bumped when the checkpoint layout changes incompatibly; ``from_pretrained`` refuses other versions.
FORMAT_VERSION = 1


@dataclass
class VisionConfig:
    """The frozen vision tower.

    Args:
        name_or_path: Hub id or local directory of a CLIP/SigLIP model (full dual encoder or vision-only).
        feature_layer: Which hidden state to take (index into ``hidden_states``; -2 = second to last layer, as LLaVA).
        drop_cls: Drop a leading CLS token. ``None`` = decide by model family (CLIP has one, SigLIP has none).
    """

    name_or_path: str = ""
    feature_layer: int = -2
    drop_cls: bool | None = None


@dataclass
class MapperConfig:
    """The trainable mapper from patch features ``[B, N_patch, d_vis]`` to visual tokens ``[B, N_vis, d_lm]``.

    Args:
        kind: ``mlp`` (LLaVA), ``perceiver`` (Flamingo/Idefics2 resampler) or ``qformer`` (BLIP-2 queries).
        depth: MLP depth (number of linear layers; 1 = a single linear projection).
        pool: MLP only: average-pool the patch grid by ``pool x pool`` before projecting (2 -> 4x fewer tokens).
        num_queries: Latents / queries of the perceiver and Q-Former (= visual token count).
        num_layers: Blocks of the perceiver and Q-Former.
        num_heads: Attention heads of the perceiver and Q-Former.
        hidden_size: Internal width of the perceiver and Q-Former (``None`` = the vision width).
        position_embedding: Add a learned embedding per input token (its place in the patch grid) to the features
            before mapping. A contrastive tower's patch tokens can lose where they are: the demo recipe's tower
            carries a token's quadrant at 0.77 in its embeddings but at chance (0.27) at layer -2, so without this
            the LLM can tell where a shape is only from the token order (docs/experiments/
            2026-12-04-visual-tokens-do-not-say-where.md). Off by default; Llava exports refuse it.
    """

    kind: str = "mlp"
    depth: int = 2
    pool: int = 1
    num_queries: int = 16
    num_layers: int = 2
    num_heads: int = 4
    hidden_size: int | None = None
    position_embedding: bool = False


@dataclass
class LMConfig:
    """The causal language model and its LoRA adapter.

    Args:
        name_or_path: Hub id, local directory, or an offline alias such as ``smollm2-135m-instruct``
            (see :mod:`vlm_chat.offline`).
        use_lora: Wrap the LLM with a PEFT LoRA adapter (False: the LLM stays fully frozen).
        lora_r, lora_alpha, lora_dropout: LoRA hyper-parameters.
        lora_target_modules: Module names to adapt, or ``all-linear`` (every linear layer except the LM head).
        load_in_4bit: QLoRA: load the base weights in 4-bit NF4 through bitsandbytes.
        dtype: Compute dtype of the LLM: ``auto`` (fp32 on CPU, bf16 on a GPU that supports it), ``float32``,
            ``bfloat16`` or ``float16``.
        max_length: Longest sequence (prompt + answer, visual tokens included) the model is given.
        trust_remote_code: Passed to transformers; off unless the user asks.
    """

    name_or_path: str = ""
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] = "all-linear"
    load_in_4bit: bool = False
    dtype: str = "auto"
    max_length: int = 1024
    trust_remote_code: bool = False


@dataclass
class VLMConfig:
    """Everything needed to rebuild a VLM; saved as a checkpoint's ``config.json``."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    mapper: MapperConfig = field(default_factory=MapperConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    image_token: str = "<image>"
    #: System turn for conversations without one, in training and chat alike; None: the chat template's default.
    system_prompt: str | None = None
    #: Visual tokens per image; derived from the tower and mapper when the model is built.
    num_image_tokens: int = 0
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> VLMConfig:
        """Build from a plain dict, refusing unknown keys, wrong types and other format versions."""
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{source}: checkpoint format_version {version!r} is not supported by this vlm-chat "
                f"(expects {FORMAT_VERSION}); re-export the checkpoint with a matching version."
            )
        return from_dict(cls, data, source)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> VLMConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(data, source=str(path))


def _check_type(value: Any, annotation: Any) -> bool:
    """True when ``value`` fits a (possibly union / generic) type annotation."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_check_type(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def from_dict(cls: type, data: dict[str, Any], source: str = "config", prefix: str = ""):
    """Instantiate dataclass ``cls`` from ``data`` (recursively), with errors that name the offending key."""
    if not isinstance(data, dict):
        raise TypeError(f"{source}: '{prefix or cls.__name__}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)}; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = from_dict(annotation, value, source, prefix=f"{prefix}{name}.")
            continue
        if not _check_type(value, annotation):
            raise TypeError(
                f"{source}: key '{prefix}{name}' must be {getattr(annotation, '__name__', annotation)}, "
                f"got {type(value).__name__} ({value!r})"
            )
        if annotation is float and isinstance(value, int):
            value = float(value)
        kwargs[name] = value
    return cls(**kwargs)
