"""Stage 0's models: a word-level caption tokenizer and a new (or continued) CLIP / SigLIP dual encoder.

The tokenizer and pooling rules are explained in :mod:`vlm_chat.training.contrastive`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["SPECIAL_TOKENS", "ContrastiveArgs", "build_model", "build_word_tokenizer"]

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
# EOS must not be id 2: CLIPTextTransformer treats eos_token_id == 2 as the legacy OpenAI config and pools at
# argmax(input_ids) instead of at the EOS token.
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]  # ids 0, 1, 2, 3


@dataclass
class ContrastiveArgs:
    """Stage-0 model and loss settings; sizes apply only when building a new model (no ``init_from``)."""

    model_type: Literal["clip", "siglip"] | None = field(
        default=None, metadata={"help": "clip | siglip; default clip, or the init_from checkpoint's type."}
    )
    init_from: str | None = field(
        default=None, metadata={"help": "A CLIP/SigLIP directory (model + processor) to continue training."}
    )
    loss: Literal["clip", "siglip", "triplet"] | None = field(
        default=None, metadata={"help": "clip | siglip | triplet; default: the model type's own loss."}
    )
    margin: float = field(default=0.2, metadata={"help": "triplet: cosine margin to the hardest negative."})
    same_caption_positive: bool = field(
        default=True,
        metadata={"help": "Pairs whose captions are identical count as matches, not negatives (vlm_chat.losses)."},
    )
    logit_scale_init: float | None = field(
        default=None, metadata={"help": "log of the initial logit scale; default log(1/0.07) clip, log(10) siglip."}
    )
    logit_bias_init: float = field(default=-10.0, metadata={"help": "siglip loss: initial logit bias."})
    image_size: int = 32
    patch_size: int = 8
    vision_hidden_size: int = 64
    vision_layers: int = 2
    text_hidden_size: int = 64
    text_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = field(default=4, metadata={"help": "MLP width as a multiple of the hidden size."})
    projection_dim: int = field(default=64, metadata={"help": "clip: shared embedding size (siglip: vision size)."})
    max_text_length: int = field(default=32, metadata={"help": "Text positions (tokens incl. <bos>/<eos>)."})
    vocab_size: int = field(default=8192, metadata={"help": "Most words kept in the caption vocabulary."})
    vocab_min_frequency: int = field(default=1, metadata={"help": "Words rarer than this map to <unk>."})

    def __post_init__(self):
        for name in ("image_size", "patch_size", "vision_hidden_size", "vision_layers", "text_hidden_size",
                     "text_layers", "num_heads", "mlp_ratio", "projection_dim", "max_text_length"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"config key {name!r} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for name in ("vision_hidden_size", "text_hidden_size"):
            if getattr(self, name) % self.num_heads:
                raise ValueError(f"{name} {getattr(self, name)} is not divisible by num_heads {self.num_heads}")
        if self.max_text_length < 3:
            raise ValueError("max_text_length must leave room for <bos>, a word and <eos> (>= 3)")


def build_word_tokenizer(captions: Sequence[str], model_type: str, max_length: int, vocab_size: int = 8192,
                         min_frequency: int = 1):  # fmt: skip
    """A word-level tokenizer trained on ``captions``, as a transformers fast tokenizer.

    Lower-cased, NFKC-normalised words; punctuation is split off. ``<bos> words <eos>`` for CLIP,
    ``words <eos>`` for SigLIP (as their own tokenizers do). Ids: ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2,
    ``<eos>`` 3, then words by frequency.

    Args:
        captions: training captions.
        model_type: ``clip`` or ``siglip``.
        max_length: ``model_max_length`` (the text tower's positions).
        vocab_size: most entries, special tokens included.
        min_frequency: words seen fewer times become ``<unk>``.

    Returns:
        A ``PreTrainedTokenizerFast``; ``AutoTokenizer.from_pretrained`` reloads what it saves.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(list(captions), trainer)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    single = f"{BOS} $A {EOS}" if model_type == "clip" else f"$A {EOS}"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(BOS, bos), (EOS, eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=max_length,
        padding_side="right",
    )


def _new_model(args: ContrastiveArgs, model_type: str, tokenizer) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    text = dict(
        hidden_size=args.text_hidden_size,
        intermediate_size=args.text_hidden_size * args.mlp_ratio,
        num_hidden_layers=args.text_layers,
        num_attention_heads=args.num_heads,
        max_position_embeddings=args.max_text_length,
        **ids,
    )
    vision = dict(
        hidden_size=args.vision_hidden_size,
        intermediate_size=args.vision_hidden_size * args.mlp_ratio,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=args.num_heads,
        image_size=args.image_size,
        patch_size=args.patch_size,
    )
    if model_type == "clip":
        scale = args.logit_scale_init if args.logit_scale_init is not None else math.log(1 / 0.07)
        config = CLIPConfig(
            text_config=text, vision_config=vision, projection_dim=args.projection_dim, logit_scale_init_value=scale
        )
        config.text_config.eos_token_id = tokenizer.eos_token_id  # pooling position (see module docstring)
        return CLIPModel(config)
    # SigLIP has no separate projection for images: the text head projects to the vision width.
    config = SiglipConfig(text_config={**text, "projection_size": args.vision_hidden_size}, vision_config=vision)
    model = SiglipModel(config)
    with torch.no_grad():  # the paper's initialisation: t' = log 10, b = -10
        model.logit_scale.fill_(args.logit_scale_init if args.logit_scale_init is not None else math.log(10.0))
        model.logit_bias.fill_(args.logit_bias_init)
    return model


def _image_processor(model_type: str, image_size: int):
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    if model_type == "clip":
        return CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    return SiglipImageProcessor(size={"height": image_size, "width": image_size})


def build_model(args: ContrastiveArgs, captions: Sequence[str] | None = None):
    """Build a new dual encoder and its processor, or load ``args.init_from``.

    Args:
        args: stage settings.
        captions: training captions (the tokenizer's vocabulary) for a new model.

    Returns:
        ``(model, processor, model_type)``: a ``CLIPModel``/``SiglipModel``, its ``CLIPProcessor``/
        ``SiglipProcessor``, and ``"clip"``/``"siglip"``.
    """
    from transformers import AutoConfig, AutoProcessor, CLIPModel, CLIPProcessor, SiglipModel, SiglipProcessor

    if args.init_from:
        config = AutoConfig.from_pretrained(args.init_from)
        if config.model_type not in ("clip", "siglip"):
            raise ValueError(f"init_from {args.init_from}: model_type {config.model_type!r}, expected clip or siglip")
        if args.model_type and args.model_type != config.model_type:
            raise ValueError(f"model_type {args.model_type!r} but init_from {args.init_from} is {config.model_type!r}")
        model_cls = CLIPModel if config.model_type == "clip" else SiglipModel
        model = model_cls.from_pretrained(args.init_from)
        processor = AutoProcessor.from_pretrained(args.init_from)
        logger.info(
            "continuing from %s (%s); size settings in the config are ignored", args.init_from, config.model_type
        )
        return model, processor, config.model_type

    model_type = args.model_type or "clip"
    if not captions:
        raise ValueError("a new model needs training captions to build its vocabulary")
    tokenizer = build_word_tokenizer(
        captions, model_type, args.max_text_length, args.vocab_size, args.vocab_min_frequency
    )
    model = _new_model(args, model_type, tokenizer)
    processor_cls = CLIPProcessor if model_type == "clip" else SiglipProcessor
    processor = processor_cls(image_processor=_image_processor(model_type, args.image_size), tokenizer=tokenizer)
    logger.info(
        "new %s: vision %dx%d (%d px, patch %d), text %dx%d, vocabulary %d words, %.2fM parameters",
        model_type, args.vision_layers, args.vision_hidden_size, args.image_size, args.patch_size, args.text_layers,
        args.text_hidden_size, len(tokenizer), sum(p.numel() for p in model.parameters()) / 1e6,
    )  # fmt: skip
    return model, processor, model_type


