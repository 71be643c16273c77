"""Stages 1-3 of VLM training as data: what each reads, what it trains, and its loss. Thin scripts call :func:`run`.

| stage    | data                                   | trains              | loss                                  |
|----------|----------------------------------------|---------------------|---------------------------------------|
| pretrain | captions                               | mapper              | caption tokens (cross-entropy)        |
| instruct | conversations (QA turns packed/image)  | mapper + LoRA       | assistant tokens (cross-entropy)      |
| dpo      | image, prompt, chosen, rejected        | LoRA (+ mapper)     | sigmoid DPO vs adapters-disabled ref  |
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel

from vlm_chat.chat import CAPTION_PROMPTS, VLMChat
from vlm_chat.config import LMConfig, MapperConfig, VisionConfig, VLMConfig
from vlm_chat.images import load_image
from vlm_chat.losses import dpo_loss
from vlm_chat.training.args import TrainConfig, parse_config, save_config
from vlm_chat.training.engine import train

logger = logging.getLogger(__name__)

STAGES = ("pretrain", "instruct", "dpo")


@dataclass
class ModelArgs:
    """Which VLM to train: a checkpoint to continue from, or components to assemble."""

    init_from: str | None = field(default=None, metadata={"help": "A vlm-chat checkpoint directory to start from."})
    vision: str | None = field(default=None, metadata={"help": "CLIP/SigLIP hub id or directory (no init_from)."})
    lm: str | None = field(default=None, metadata={"help": "Causal LM hub id, directory or offline alias."})
    mapper: str = field(default="mlp", metadata={"help": "mlp | perceiver | qformer."})
    mapper_depth: int = 2
    mapper_pool: int = 1
    num_queries: int = 16
    mapper_layers: int = 2
    mapper_heads: int = 4
    feature_layer: int = -2
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str = field(default="all-linear", metadata={"help": "'all-linear' or comma-separated names."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: 4-bit NF4 base weights (bitsandbytes)."})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16 (model weights)."})
    max_length: int = field(default=512, metadata={"help": "Longest training sequence, visual tokens included."})
    system_prompt: str | None = field(
        default=None, metadata={"help": "System turn of every conversation (default: the chat template's own)."}
    )

    def vlm_config(self) -> VLMConfig:
        if not (self.vision and self.lm):
            raise ValueError("set init_from, or both vision and lm")
        targets = self.lora_target_modules
        return VLMConfig(
            system_prompt=self.system_prompt,
            vision=VisionConfig(name_or_path=self.vision, feature_layer=self.feature_layer),
            mapper=MapperConfig(
                kind=self.mapper,
                depth=self.mapper_depth,
                pool=self.mapper_pool,
                num_queries=self.num_queries,
                num_layers=self.mapper_layers,
                num_heads=self.mapper_heads,
            ),
            lm=LMConfig(
                name_or_path=self.lm,
                lora_r=self.lora_r,
                lora_alpha=self.lora_alpha,
                lora_dropout=self.lora_dropout,
                load_in_4bit=self.load_in_4bit,
                dtype=self.dtype,
                max_length=self.max_length,
                lora_target_modules=targets if targets == "all-linear" else targets.split(","),
            ),
        )


@dataclass
class DataArgs:
    """Training data (formats: docs/data.md)."""

    train_file: str = field(metadata={"help": "Captions (pretrain), conversations (instruct) or preferences (dpo)."})
    image_folder: str | None = field(default=None, metadata={"help": "Root of relative image paths."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N samples."})
    pack_by_image: bool = field(default=True, metadata={"help": "instruct: merge QA rows of one image into one."})
    max_turns_per_sample: int | None = field(default=None, metadata={"help": "Cap on QA pairs per packed sample."})
    independent_turns: bool = field(
        default=False,
        metadata={
            "help": "instruct: train each QA pair of a conversation as if asked alone about the image (it sees the "
            "image and its own question, not the earlier answers); the image prefix is still encoded once."
        },
    )


@dataclass
class StageArgs:
    """Stage-specific settings."""

    mapper_lr: float = field(default=1e-3, metadata={"help": "Learning rate of the mapper."})
    lora_lr: float = field(default=2e-4, metadata={"help": "Learning rate of the LoRA weights."})
    train_mapper: bool = field(default=True, metadata={"help": "Train the mapper (dpo: off by default in configs)."})
    beta: float = field(default=0.1, metadata={"help": "dpo: strength of the implicit KL penalty."})
    dpo_reference: str = field(
        default="init",
        metadata={
            "help": "dpo reference model: 'init' = the init_from checkpoint's adapter, frozen (the SFT model, as in "
            "the DPO paper); 'base' = the LLM with adapters disabled."
        },
    )
    cache_vision_features: bool = field(
        default=True, metadata={"help": "Run the frozen tower once per image and reuse its features across epochs."}
    )


class FeatureCache:
    """Frozen-tower features per image path: the tower runs once per image, not once per image per epoch."""

    def __init__(self, chat: VLMChat, enabled: bool):
        self.chat, self.enabled, self.store = chat, enabled, {}

    def __call__(self, paths: list[str]) -> dict[str, torch.Tensor]:
        missing = [p for p in dict.fromkeys(paths) if p not in self.store]
        if missing:
            pixels = self.chat.processor.pixel_values([load_image(p) for p in missing])
            with torch.no_grad():
                feats = self.chat.model.vision(pixels.to(self.chat.device))  # [n, N_patch, d_vis]
            if not self.enabled:
                return {"pixel_values": pixels}
            for p, f in zip(missing, feats):
                self.store[p] = f.cpu()
        return {"image_features": torch.stack([self.store[p] for p in paths])}  # [B, N_patch, d_vis]


def _as_conversation(stage: str, row: dict) -> list[dict]:
    if stage == "pretrain":
        return [
            {"role": "user", "content": f"<image>\n{CAPTION_PROMPTS[False]}"},
            {"role": "assistant", "content": row["caption"]},
        ]
    return row["messages"]


def _with_image(prompt: str) -> str:
    return prompt if "<image>" in prompt else f"<image>\n{prompt}"


class Collator:
    """Raw rows -> padded tensors (right padding) with labels on assistant tokens only."""

    def __init__(self, chat: VLMChat, stage: str, features: FeatureCache, independent_turns: bool = False):
        self.chat, self.stage, self.features = chat, stage, features
        self.independent_turns = independent_turns and stage == "instruct"

    def _encode(self, messages: list[dict], image: str | None):
        proc = self.chat.processor
        encode = proc.encode_independent_turns if self.independent_turns else proc.encode_conversation
        return encode(messages, num_images=int(image is not None))

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        proc = self.chat.processor
        if self.stage == "dpo":
            chosen, rejected, images = [], [], []
            for row in rows:
                prompt = {"role": "user", "content": _with_image(row["prompt"]) if row["image"] else row["prompt"]}
                c = self._encode([prompt, {"role": "assistant", "content": row["chosen"]}], row["image"])
                r = self._encode([prompt, {"role": "assistant", "content": row["rejected"]}], row["image"])
                if c is None or r is None:
                    continue
                chosen.append(c)
                rejected.append(r)
                images.append(row["image"])
            encoded, images = chosen + rejected, images + images  # [2B]: chosen first, then rejected
        else:
            encoded, images = [], []
            for row in rows:
                enc = self._encode(_as_conversation(self.stage, row), row["image"])
                if enc is not None:  # skipped: truncation would cut visual tokens or leaves nothing to learn
                    encoded.append(enc)
                    images.append(row["image"])
        if not encoded:
            raise ValueError("every sample of a batch was skipped (too long for max_length?); raise max_length")
        batch = proc.pad(encoded, "right")
        with_image = [p for p in images if p is not None]
        if with_image:
            if len(with_image) != len(images):
                raise ValueError("a batch mixes samples with and without images; not supported yet")
            batch.update(self.features(with_image))
        return batch


def _loss_fn(stage: str, beta: float):
    if stage != "dpo":

        def lm_loss(model, batch):
            out = model(**batch)
            loss = out.loss
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # DDP averages gradients over processes; normalising each process's summed loss by the *global*
                # token count makes that average equal to one process's token mean over the whole batch.
                world = torch.distributed.get_world_size()
                total = out.num_tokens.detach().clone()
                torch.distributed.all_reduce(total)
                loss = out.loss_sum * world / total.clamp(min=1)
            return loss, {"tokens": out.num_tokens.float()}

        return lm_loss

    def dpo(model, batch):
        out = model(**batch)
        n = out.logps.shape[0] // 2
        lm = extract_model_from_parallel(model).lm
        # The reference shares the base weights: a frozen copy of the starting adapter, or no adapter at all.
        reference = _active_adapter(lm, REFERENCE_ADAPTER) if REFERENCE_ADAPTER in lm.peft_config else lm.disable_adapter()
        training = model.training
        model.eval()  # the reference is deterministic: no LoRA dropout in its pass
        try:
            with torch.no_grad(), reference:
                ref = model(**batch).logps
        finally:
            model.train(training)
        loss, chosen_r, rejected_r = dpo_loss(out.logps[:n], out.logps[n:], ref[:n], ref[n:], beta)
        margin = chosen_r - rejected_r
        return loss, {"reward_margin": margin.mean(), "reward_accuracy": (margin > 0).float().mean()}

    return dpo


REFERENCE_ADAPTER = "reference"


def _text_length(stage: str, row: dict) -> int:
    """Characters of text in a sample: the length proxy for ``group_by_length`` (visual tokens are the same for all)."""
    if stage == "pretrain":
        return len(row["caption"])
    if stage == "dpo":
        return len(row["prompt"]) + max(len(row["chosen"]), len(row["rejected"]))
    return sum(len(m["content"]) if isinstance(m["content"], str) else len(str(m["content"])) for m in row["messages"])


@contextlib.contextmanager
def _active_adapter(lm, name: str):
    """Run with adapter ``name`` active, then switch back to the trained one (``default``)."""
    lm.set_adapter(name)
    try:
        yield
    finally:
        lm.set_adapter("default")  # PEFT's set_adapter also restores requires_grad on the trained adapter only


def _add_reference_adapter(chat: VLMChat, init_from: str) -> None:
    """Load the starting checkpoint's adapter a second time, frozen, as the DPO reference (TRL's ref_adapter_name).

    Disabling the adapter instead would make the reference the LLM *before* instruction tuning, so the implicit KL
    term would pull the policy back towards a model that never saw the visual instruction data.
    """
    adapter = Path(init_from) / "adapter"
    chat.model.lm.load_adapter(str(adapter), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    chat.model.lm.set_adapter("default")
    logger.info("dpo: reference = frozen copy of %s", adapter)


def load_rows(stage: str, data: DataArgs, skip_bad_rows: bool):
    from vlm_chat import data as readers

    reader = {
        "pretrain": readers.load_captions,
        "instruct": readers.load_conversations,
        "dpo": readers.load_preferences,
    }[stage]
    rows, report = reader(data.train_file, data.image_folder, skip_bad_rows=skip_bad_rows)
    if stage == "instruct" and data.pack_by_image:
        rows = readers.pack_by_image(rows, max_turns=data.max_turns_per_sample)
    rows = list(rows)
    if data.max_train_samples:
        rows = rows[: data.max_train_samples]
    logger.info("%s: %d training samples from %s (%s)", stage, len(rows), data.train_file, report)
    return rows


def build_chat(model_args: ModelArgs, seed: int) -> VLMChat:
    if model_args.init_from:
        return VLMChat.from_pretrained(model_args.init_from, is_trainable=True)
    return VLMChat.from_config(model_args.vlm_config(), seed=seed)


def run(stage: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``--config`` + overrides, build the model, train, and save ``output_dir/final`` (a VLMChat checkpoint).

    Returns:
        The engine's result dict (``final_dir``, ``history``, ...).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    model_args, data_args, stage_args, cfg = parse_config(
        [ModelArgs, DataArgs, StageArgs, TrainConfig], argv, prog=f"train/{stage}.py"
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    chat = build_chat(model_args, cfg.seed)
    lora = stage != "pretrain"
    mapper = stage != "dpo" or stage_args.train_mapper
    if lora and not chat.config.lm.use_lora:
        raise ValueError(f"stage {stage} trains LoRA but the model has no adapter (lm.use_lora is false)")
    if stage_args.dpo_reference not in ("init", "base"):
        raise ValueError(f"dpo_reference must be 'init' or 'base', got {stage_args.dpo_reference!r}")
    if stage == "dpo" and stage_args.dpo_reference == "init" and model_args.init_from:
        _add_reference_adapter(chat, model_args.init_from)
    chat.model.configure_trainable(mapper=mapper, lora=lora)
    groups = []
    if mapper:
        groups.append(
            {"name": "mapper", "params": [p for p in chat.model.mapper.parameters()], "lr": stage_args.mapper_lr}
        )
    if lora:
        groups.append(
            {
                "name": "lora",
                "params": chat.model.lora_parameters(),
                "lr": stage_args.lora_lr,
            }
        )
    # Trained weights are kept in fp32 whatever the model's dtype (LLaVA and PEFT do the same): AdamW updates below
    # bf16's resolution would be lost, and fp16 mixed precision's gradient scaler refuses fp16 gradients. The frozen
    # base keeps its half dtype; mixed_precision's autocast runs the matmuls in half precision.
    for p in (p for g in groups for p in g["params"]):
        if p.dtype != torch.float32:
            p.data = p.data.float()
    rows = load_rows(stage, data_args, cfg.skip_bad_rows)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    save_config(Path(cfg.output_dir) / "config.yaml", model_args, data_args, stage_args, cfg)
    command = " ".join([f"train/{stage}.py", *(sys.argv[1:] if argv is None else argv)])

    def on_save(directory: Path) -> None:
        card = chat._default_card(chat.config) + f"\n## Training\n\nStage `{stage}`: `{command}`\n"
        chat.save_pretrained(directory, card=card)

    collate = Collator(chat, stage, FeatureCache(chat, stage_args.cache_vision_features), data_args.independent_turns)
    return train(
        chat.model,
        rows,
        collate,
        _loss_fn(stage, stage_args.beta),
        cfg,
        param_groups=groups,
        on_save=on_save,
        gradient_checkpointing_fn=_gradient_checkpointing,
        lengths=[_text_length(stage, row) for row in rows] if cfg.group_by_length else None,
    )


def _gradient_checkpointing(model) -> None:
    model = extract_model_from_parallel(model)
    model.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.causal_lm.enable_input_require_grads()
