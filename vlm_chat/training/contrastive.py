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

import dataclasses
import json
import logging
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from accelerate.utils import set_seed
from torch import nn

from vlm_chat.console import setup_logging
from vlm_chat.losses import caption_keys, clip_loss, contrastive_accuracy, siglip_loss, triplet_loss
from vlm_chat.training.args import CaptionDataArgs, ConfigError, TrainConfig, config_to_dict, parse_config, save_config
from vlm_chat.training.checkpoints import rows_fingerprint
from vlm_chat.training.encoders import ContrastiveArgs, build_model, build_word_tokenizer
from vlm_chat.training.engine import TrainResult, train

logger = logging.getLogger(__name__)

__all__ = [
    "ContrastiveArgs",
    "ContrastiveCollator",
    "ContrastiveConfig",
    "ContrastiveResult",
    "DualEncoder",
    "build_model",
    "build_word_tokenizer",
    "load_contrastive_config",
    "main",
    "run_contrastive",
]

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


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    """All processes' rows ``[world * B, D]``; gradients flow back to the process that computed each row."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # Every rank computes the same global loss; the backward of this all_gather sums their gradients w.r.t. this
        # rank's rows, and DDP's averaging over ranks then undoes that factor world_size.
        return torch.cat(dist_nn.all_gather(tensor.contiguous()))
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


def _model_card(model_type: str, args: ContrastiveArgs, cfg: TrainConfig, command: str) -> str:
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
    lines += ["## Training", "", "```", command, "```", ""]
    last = _last_log_record(Path(cfg.output_dir))
    if last:
        lines += [
            f"Step {last['step']}: loss {last['loss']:.4f}, in-batch accuracy image->text "
            f"{last.get('acc_i2t', float('nan')):.3f}, text->image {last.get('acc_t2i', float('nan')):.3f}.",
            "",
        ]
    lines += ["## Configuration", "", "```json", json.dumps(config_to_dict(args, cfg), indent=2), "```", ""]
    return "\n".join(lines)


@dataclass
class ContrastiveConfig:
    """One stage-0 run: the dual encoder and its loss, the caption data, the engine settings.

    Args:
        model: the encoder to build (or ``init_from``) and the loss.
        data: the image-caption pairs.
        train: engine settings (transformers ``TrainingArguments`` names where they exist).
        command: how the run was started, for the model card (the command-line shim fills it in).
    """

    model: ContrastiveArgs
    data: CaptionDataArgs
    train: TrainConfig
    command: str = ""


@dataclass
class ContrastiveResult(TrainResult):
    """:class:`~vlm_chat.training.engine.TrainResult` plus the trained encoder.

    Attributes:
        model_type: ``clip`` or ``siglip``.
        model: the trained ``CLIPModel`` / ``SiglipModel``.
        processor: its processor.
    """

    model_type: str = ""
    model: Any = None
    processor: Any = None


def load_contrastive_config(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
                            argv: Sequence[str] | None = None) -> ContrastiveConfig:
    """A :class:`ContrastiveConfig` from a YAML file, then Python ``overrides``, then ``--key value`` in ``argv``.

    Raises:
        ConfigError: an unknown key (naming it and the valid ones), an old key name, or a wrong type.
    """
    args, data, cfg = parse_config((ContrastiveArgs, CaptionDataArgs, TrainConfig), list(argv or []),
                                   "train/contrastive.py", config_file=config_file, overrides=overrides)
    return ContrastiveConfig(model=args, data=data, train=cfg)


def run_contrastive(config: ContrastiveConfig) -> ContrastiveResult:
    """Train, and write ``output_dir/final`` (a standard CLIP/SigLIP directory).

    Args:
        config: the run (:func:`load_contrastive_config` reads one from YAML).

    Returns:
        The engine's result (``final_dir``, ``history``, ``last_checkpoint``, ...) with ``model_type`` and the trained
        ``model`` and its ``processor``.
    """
    from vlm_chat.data import load_captions

    args, data_args, cfg = dataclasses.replace(config.model), config.data, config.train
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
    command = config.command or "run_contrastive(load_contrastive_config('config.yaml'))"

    def on_save(directory: Path) -> None:
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        processor.image_processor.save_pretrained(directory)  # also preprocessor_config.json, for older loaders
        (directory / "README.md").write_text(_model_card(model_type, args, cfg, command), encoding="utf-8")

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
        dataset_fingerprint=rows_fingerprint(zip(rows["image"], rows["caption"])),
    )
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    return ContrastiveResult(**fields, model_type=model_type, model=model, processor=processor)


def main(argv: Sequence[str] | None = None) -> ContrastiveResult:
    """Command-line entry point of ``train/contrastive.py``."""
    setup_logging(logging.INFO)  # library bars and warnings only on a terminal
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = load_contrastive_config(argv=argv)
    except ConfigError as err:  # a config mistake deserves a message, not a traceback
        raise SystemExit(f"error: {err}") from None
    config.command = "python train/contrastive.py " + shlex.join(argv)
    result = run_contrastive(config)
    print(f"final model: {result.final_dir}")
    return result
