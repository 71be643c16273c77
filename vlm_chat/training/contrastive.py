"""Stage 0: train a CLIP or SigLIP dual encoder on image-caption pairs (contrastive, sigmoid or triplet loss).

No pretrained CLIP/SigLIP installs offline, so this stage makes one. It writes a *standard* transformers
directory (``model.safetensors``, ``config.json``, tokenizer, image processor, processor), so that
``CLIPModel``/``CLIPVisionModel``/``AutoProcessor.from_pretrained(dir)`` (or the SigLIP classes) load it
exactly as they load ``openai/clip-vit-base-patch32`` - and so does stage 1 as its vision tower.

The text tokenizer is a word-level vocabulary built from the training captions with the ``tokenizers``
library, wrapped as a transformers fast tokenizer. Text pooling decides what it must produce:

* ``CLIPTextTransformer`` pools the hidden state at the first ``eos_token_id`` (causal attention), so the
  tokenizer appends ``<eos>`` to every caption (``<bos> words <eos>``) and the text config's
  ``eos_token_id`` is set to that id. Padding after it changes nothing (``padding=True`` is fine).
* ``SiglipTextTransformer`` pools the *last position* (bidirectional attention). As with Google's SigLIP,
  texts are padded to a fixed ``max_length`` (the text config's ``max_position_embeddings``), so the last
  position always has the same index and sees every real token. At inference call the processor with
  ``padding="max_length"``, as the transformers SigLIP docs say.

Losses (``vlm_chat.losses``): ``clip`` (symmetric InfoNCE, learned temperature), ``siglip`` (pairwise
sigmoid, learned temperature and bias), ``triplet`` (hardest in-batch negative, both directions; the
temperature is unused and frozen). Under several processes the embeddings are all-gathered with their
gradients, so a 2-process run computes the loss over the same global batch as a 1-process run with twice
the per-device batch.
"""

import json
import logging
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from accelerate.utils import set_seed
from torch import nn

from vlm_chat.losses import caption_keys, clip_loss, contrastive_accuracy, siglip_loss, triplet_loss
from vlm_chat.training.args import CaptionDataArgs, ConfigError, TrainConfig, config_to_dict, parse_config, save_config
from vlm_chat.training.engine import train

logger = logging.getLogger(__name__)

__all__ = [
    "ContrastiveArgs",
    "ContrastiveCollator",
    "DualEncoder",
    "build_model",
    "build_word_tokenizer",
    "main",
    "run",
]

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


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer, model, processor


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


# ----------------------------------------------------------------------------------------------------------------
# Training pieces


class DualEncoder(nn.Module):
    """A ``CLIPModel``/``SiglipModel`` plus what its loss needs; one ``forward`` so DDP sees every parameter.

    The SigLIP loss needs a learned bias; a ``CLIPModel`` has none, so one is added here (it is a training
    detail: retrieval ranks by similarity, which the bias does not change, so it is not saved in the model
    directory; engine checkpoints keep it). Parameters the chosen loss does not use are frozen.

    Args:
        model: the dual encoder.
        loss: ``clip``, ``siglip`` or ``triplet``.
        logit_bias_init: initial bias when the model lacks one.
    """

    def __init__(self, model: nn.Module, loss: str, logit_bias_init: float = -10.0):
        super().__init__()
        self.model = model
        self.loss = loss
        if loss == "siglip" and not hasattr(model, "logit_bias"):
            self.extra_logit_bias = nn.Parameter(torch.tensor([float(logit_bias_init)]))
        if loss == "triplet":
            model.logit_scale.requires_grad_(False)
        if loss != "siglip" and hasattr(model, "logit_bias"):
            model.logit_bias.requires_grad_(False)

    @property
    def logit_bias(self) -> torch.Tensor:
        return self.model.logit_bias if hasattr(self.model, "logit_bias") else self.extra_logit_bias

    def forward(self, pixel_values, input_ids, attention_mask=None):
        """Returns ``(image_emb [B, D], text_emb [B, D], logit_scale [], logit_bias [] | None)``."""
        out = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        # CLIP caps the temperature multiplier at 100 (training is unstable beyond it).
        scale = self.model.logit_scale.clamp(max=math.log(100.0)).exp().reshape(())
        bias = self.logit_bias.reshape(()) if self.loss == "siglip" else None
        return out.image_embeds, out.text_embeds, scale, bias


class _GatherWithGrad(torch.autograd.Function):
    """all_gather that passes gradients back to their process (equal batch sizes on every rank)."""

    @staticmethod
    def forward(ctx, tensor):
        ctx.rank, ctx.batch = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)  # [world * B, D]

    @staticmethod
    def backward(ctx, grad):
        # Every rank computed the same global loss; sum their gradients w.r.t. this rank's rows. DDP then
        # averages parameter gradients over ranks, which undoes the factor world_size of this sum.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _GatherWithGrad.apply(tensor)
    return tensor


class ContrastiveLoss:
    """``loss_fn(model, batch) -> (loss, metrics)`` for the engine: the chosen loss on the global batch."""

    def __init__(self, loss: str, margin: float = 0.2, same_caption_positive: bool = False):
        if loss not in ("clip", "siglip", "triplet"):
            raise ValueError(f"unknown contrastive loss {loss!r}; valid: ['clip', 'siglip', 'triplet']")
        self.loss = loss
        self.margin = margin
        self.same_caption_positive = same_caption_positive

    def __call__(self, model, batch):
        image_emb, text_emb, scale, bias = model(**batch)
        image_emb = _gather(image_emb.float())  # [B_global, D]
        text_emb = _gather(text_emb.float())  # [B_global, D]
        positives = None
        if self.same_caption_positive:
            keys = caption_keys(batch["input_ids"], batch.get("attention_mask"))  # [B]
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                parts = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, keys)
                keys = torch.cat(parts)  # [B_global]
            positives = keys[:, None] == keys[None, :]  # [B_global, B_global]
        if self.loss == "clip":
            loss = clip_loss(image_emb, text_emb, scale.float(), positives)
        elif self.loss == "siglip":
            loss = siglip_loss(image_emb, text_emb, scale.float(), bias.float(), positives)
        else:
            loss = triplet_loss(image_emb, text_emb, self.margin, positives)
        metrics = {"logit_scale": scale.detach(), **contrastive_accuracy(image_emb, text_emb, positives)}
        if bias is not None:
            metrics["logit_bias"] = bias.detach()
        return loss, metrics


class ContrastiveCollator:
    """Rows ``{"image": path, "caption"}`` -> processor tensors (``pixel_values``, ``input_ids``, ``attention_mask``).

    Args:
        processor: the model's ``CLIPProcessor``/``SiglipProcessor``.
        model_type: ``clip`` pads to the longest caption, ``siglip`` to ``max_length`` (see module docstring).
        max_length: text positions of the model; longer captions are truncated (keeping ``<eos>``).
        cache_mb: keep preprocessed images in memory up to this many MB, keyed by path. Stage 0 sees each image
            many times and, with a small tower, decoding the PNG and running the image processor cost more than
            the model step; there is no augmentation, so the tensor is the same every epoch.
    """

    def __init__(self, processor, model_type: str, max_length: int, cache_mb: int = 0):
        self.processor = processor
        self.padding = "max_length" if model_type == "siglip" else "longest"
        self.max_length = max_length
        self.cache_bytes, self.cached_bytes = cache_mb * 2**20, 0
        self.pixels: dict[str, torch.Tensor] = {}

    def _pixel_values(self, images: list) -> torch.Tensor:
        from vlm_chat.images import load_image

        keys = [im if isinstance(im, str) and self.cache_bytes else None for im in images]
        missing = [i for i, k in enumerate(keys) if k is None or k not in self.pixels]
        if missing:
            fresh = self.processor.image_processor(
                images=[load_image(images[i]) for i in missing], return_tensors="pt"
            )["pixel_values"]  # [n, 3, H, W]
            computed = dict(zip(missing, fresh))
            for i, pixels in computed.items():
                size = pixels.numel() * pixels.element_size()
                if keys[i] is not None and self.cached_bytes + size <= self.cache_bytes:
                    self.pixels[keys[i]] = pixels
                    self.cached_bytes += size
        else:
            computed = {}
        return torch.stack([computed[i] if i in computed else self.pixels[k] for i, k in enumerate(keys)])

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        enc = self.processor.tokenizer(
            [row["caption"] for row in rows],
            padding=self.padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
        return {"pixel_values": self._pixel_values([row["image"] for row in rows]), **batch}


def _last_log_record(output_dir: Path) -> dict | None:
    log = output_dir / "train_log.jsonl"
    lines = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
    return json.loads(lines[-1]) if lines else None


def _model_card(model_type: str, args: ContrastiveArgs, cfg: TrainConfig, argv: Sequence[str]) -> str:
    cls = "CLIPModel" if model_type == "clip" else "SiglipModel"
    origin = f"`{args.init_from}`" if args.init_from else "scratch"
    lines = [
        f"# {model_type.upper()} dual encoder (vlm-chat stage 0)",
        "",
        f"A `{cls}` trained from {origin} with the `{args.loss}` loss by `train/contrastive.py`.",
        "",
        "```python",
        f"from transformers import AutoProcessor, {cls}",
        f"model = {cls}.from_pretrained(path)",
        "processor = AutoProcessor.from_pretrained(path)",
        "```",
        "",
    ]
    if model_type == "siglip":
        lines += ['Call the processor with `padding="max_length"`: the text tower pools the last position.', ""]
    lines += ["## Training", "", "```", "python train/contrastive.py " + shlex.join(argv), "```", ""]
    last = _last_log_record(Path(cfg.output_dir))
    if last:
        lines += [
            f"Step {last['step']}: loss {last['loss']:.4f}, in-batch accuracy image->text "
            f"{last.get('acc_i2t', float('nan')):.3f}, text->image {last.get('acc_t2i', float('nan')):.3f}.",
            "",
        ]
    lines += ["## Configuration", "", "```json", json.dumps(config_to_dict(args, cfg), indent=2), "```", ""]
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``--config`` + overrides, train, and write ``output_dir/final`` (a standard CLIP/SigLIP directory).

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``); keys in ``docs/training.md``.

    Returns:
        The engine's result dict (``final_dir``, ``history``, ``last_checkpoint``, ...) plus ``model_type``,
        and the trained ``model`` and its ``processor``.
    """
    from vlm_chat.data import load_captions

    argv = list(sys.argv[1:] if argv is None else argv)
    args, data_args, cfg = parse_config((ContrastiveArgs, CaptionDataArgs, TrainConfig), argv, "train/contrastive.py")
    rows, report = load_captions(data_args.train_file, data_args.image_folder, skip_bad_rows=cfg.skip_bad_rows)
    if data_args.max_train_samples:
        rows = rows.select(range(min(data_args.max_train_samples, len(rows))))
    logger.info("%d image-caption pairs from %s (%s)", len(rows), data_args.train_file, report.summary())

    set_seed(cfg.seed)  # the new model's initialisation
    model, processor, model_type = build_model(args, list(rows["caption"]))
    args.model_type = model_type  # saved config records what was resolved
    args.loss = args.loss or model_type
    save_config(Path(cfg.output_dir) / "config.yaml", args, data_args, cfg)

    wrapper = DualEncoder(model, args.loss, args.logit_bias_init)
    max_length = model.config.text_config.max_position_embeddings

    def on_save(directory: Path) -> None:
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        processor.image_processor.save_pretrained(directory)  # also preprocessor_config.json, for older loaders
        (directory / "README.md").write_text(_model_card(model_type, args, cfg, argv), encoding="utf-8")

    def enable_gradient_checkpointing(module: DualEncoder) -> None:
        module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    result = train(
        wrapper,
        rows,
        ContrastiveCollator(processor, model_type, max_length, cache_mb=data_args.image_cache_mb),
        ContrastiveLoss(args.loss, args.margin, args.same_caption_positive),
        cfg,
        on_save=on_save,
        gradient_checkpointing_fn=enable_gradient_checkpointing,
    )
    result.update(model_type=model_type, model=model, processor=processor)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point of ``train/contrastive.py``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run(argv)
    except ConfigError as err:  # a config mistake deserves a message, not a traceback
        raise SystemExit(f"error: {err}") from None
    print(f"final model: {result['final_dir']}")
