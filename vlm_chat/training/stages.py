"""Stages 1-3 of VLM training as data: what each reads, what it trains, and its loss step.

| stage    | reads                                  | trains              | loss step                             |
|----------|----------------------------------------|---------------------|---------------------------------------|
| pretrain | captions                               | mapper              | caption tokens (cross-entropy)        |
| instruct | conversations (QA turns packed/image)  | mapper + LoRA       | assistant tokens (cross-entropy)      |
| dpo      | image, prompt, chosen, rejected        | LoRA (+ mapper)     | sigmoid DPO vs a frozen reference     |

Each row of the table is one :class:`Stage` in :data:`STAGES`. A run is a :class:`StageConfig` (a dataclass: the
model, the data, the stage's options and the engine settings); :func:`run_stage` runs it, and
:func:`load_stage_config` builds one from a YAML file, Python overrides and command-line arguments::

    from vlm_chat.training import load_stage_config, run_stage

    config = load_stage_config("pretrain", "configs/hub/pretrain.yaml", {"max_steps": 10, "model.lm.lora_r": 8})
    result = run_stage(config)      # TrainResult: result.final_dir is a VLMChat checkpoint

``train/{pretrain,instruct,dpo}.py`` are the command-line form (:func:`main`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel

from vlm_chat.card import model_card
from vlm_chat.chat import CAPTION_PROMPTS, VLMChat
from vlm_chat.config import VLMConfig
from vlm_chat.console import setup_logging
from vlm_chat.losses import dpo_loss
from vlm_chat.training.args import ConfigError, TrainConfig, parse_config, save_config
from vlm_chat.training.batches import Collator, FeatureCache
from vlm_chat.training.checkpoints import rows_fingerprint
from vlm_chat.training.engine import LossFn, TrainResult, train
from vlm_chat.training.sampler import samples_in_run

logger = logging.getLogger(__name__)

__all__ = [
    "STAGES",
    "Collator",
    "DataArgs",
    "FeatureCache",
    "Stage",
    "StageArgs",
    "StageConfig",
    "load_rows",
    "load_stage_config",
    "main",
    "run_stage",
]

REFERENCE_ADAPTER = "reference"

#: Flat model keys of earlier versions -> their place in the ``model:`` section (the old name is an error naming it).
MOVED_KEYS = {
    "vision": "model.vision.name_or_path", "feature_layer": "model.vision.feature_layer",
    "mapper": "model.mapper.kind", "mapper_depth": "model.mapper.depth", "mapper_pool": "model.mapper.pool",
    "num_queries": "model.mapper.num_queries", "mapper_layers": "model.mapper.num_layers",
    "mapper_heads": "model.mapper.num_heads", "lm": "model.lm.name_or_path", "lora_r": "model.lm.lora_r",
    "lora_alpha": "model.lm.lora_alpha", "lora_dropout": "model.lm.lora_dropout",
    "lora_target_modules": "model.lm.lora_target_modules", "load_in_4bit": "model.lm.load_in_4bit",
    "dtype": "model.lm.dtype", "max_length": "model.lm.max_length", "system_prompt": "model.system_prompt",
}  # fmt: skip


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
    train_mapper: bool | None = field(
        default=None, metadata={"help": "Train the mapper; default: the stage's own choice (all stages: yes)."}
    )
    beta: float = field(default=0.1, metadata={"help": "dpo: strength of the implicit KL penalty."})
    dpo_reference: str = field(
        default="init",
        metadata={
            "help": "dpo reference model: 'init' = the init_from checkpoint's adapter, frozen (the SFT model, as in "
            "the DPO paper); 'base' = the LLM with adapters disabled."
        },
    )
    cache_vision_features: bool = field(
        default=True,
        metadata={"help": "Run the frozen tower once per image before training (features kept in memory); "
                          "false: run it in every training step."},
    )


@dataclass
class _InitFrom:
    """The flat ``init_from`` key (parsing only; it lands in :attr:`StageConfig.init_from`)."""

    init_from: str | None = field(
        default=None, metadata={"help": "A vlm-chat checkpoint to continue from (instead of a model: section)."}
    )


@dataclass
class StageConfig:
    """One training run of a stage.

    Args:
        stage: ``pretrain``, ``instruct`` or ``dpo`` (a key of :data:`STAGES`).
        data: the training data.
        train: engine settings (transformers ``TrainingArguments`` names where they exist).
        model: a new model to assemble (the same :class:`~vlm_chat.config.VLMConfig` a checkpoint saves as
            ``config.json``); exclusive with ``init_from``.
        init_from: a vlm-chat checkpoint directory to continue from; exclusive with ``model``.
        options: the stage's own settings (learning rates, DPO beta, feature cache, ...).
        command: how the run was started, for the model card (the command-line shims fill it in).
    """

    stage: str
    data: DataArgs
    train: TrainConfig
    model: VLMConfig | None = None
    init_from: str | None = None
    options: StageArgs = field(default_factory=StageArgs)
    command: str = ""

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ConfigError(f"unknown stage {self.stage!r}; valid: {', '.join(STAGES)}")
        if (self.model is None) == (self.init_from is None):
            raise ConfigError(
                f"{self.stage}: set either 'model:' (a new model) or 'init_from' (a checkpoint to continue), "
                f"{'not both' if self.model is not None else 'got neither'}"
            )
        if self.model is not None:
            for part in ("vision", "lm"):
                if not getattr(self.model, part).name_or_path:
                    raise ConfigError(f"{self.stage}: config key 'model.{part}.name_or_path' is empty")
        if self.options.dpo_reference not in ("init", "base"):
            raise ConfigError(f"config key 'dpo_reference' must be 'init' or 'base', got {self.options.dpo_reference!r}")


# ---------------------------------------------------------------------------------------------------- loss steps


def lm_step(options: StageArgs) -> LossFn:
    """Cross-entropy on the supervised (caption / assistant) tokens."""

    def step(model, batch):
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

    return step


def dpo_step(options: StageArgs) -> LossFn:
    """Sigmoid DPO of the policy against the reference (a frozen adapter, or no adapter) on chosen/rejected pairs."""

    def step(model, batch):
        batch = dict(batch)
        bare = extract_model_from_parallel(model)
        if "pixel_values" in batch:  # cache off: the tower runs here, once per image, for policy and reference
            with torch.no_grad():
                batch["image_features"] = bare.vision(batch.pop("pixel_values"))  # [B, N_patch, d_vis]
        if "image_features" in batch:
            features = batch["image_features"]
            batch["image_features"] = torch.cat([features, features])  # [2B, ...]: chosen rows, then rejected rows
        out = model(**batch)
        n = out.logps.shape[0] // 2
        lm = bare.lm
        reference = _active_adapter(lm, REFERENCE_ADAPTER) if REFERENCE_ADAPTER in lm.peft_config else lm.disable_adapter()
        training = model.training
        model.eval()  # the reference is deterministic: no LoRA dropout in its pass
        try:
            with torch.no_grad(), reference:
                ref = model(**batch).logps
        finally:
            model.train(training)
        loss, chosen_r, rejected_r = dpo_loss(out.logps[:n], out.logps[n:], ref[:n], ref[n:], options.beta)
        margin = chosen_r - rejected_r
        return loss, {"reward_margin": margin.mean(), "reward_accuracy": (margin > 0).float().mean()}

    return step


@contextlib.contextmanager
def _active_adapter(lm, name: str):
    """Run with adapter ``name`` active, then switch back to the trained one (``default``)."""
    lm.set_adapter(name)
    try:
        yield
    finally:
        lm.set_adapter("default")  # PEFT's set_adapter also restores requires_grad on the trained adapter only


# ---------------------------------------------------------------------------------------------------- the registry


def _caption_conversation(row: dict, image_token: str) -> list[list[dict]]:
    return [[{"role": "user", "content": f"{image_token}\n{CAPTION_PROMPTS[False]}"},
             {"role": "assistant", "content": row["caption"]}]]


def _preference_conversations(row: dict, image_token: str) -> list[list[dict]]:
    text = row["prompt"]
    if row["image"] and image_token not in text:
        text = f"{image_token}\n{text}"
    prompt = {"role": "user", "content": text}
    return [[prompt, {"role": "assistant", "content": row[answer]}] for answer in ("chosen", "rejected")]


def _content_length(row: dict) -> int:
    return sum(len(m["content"]) if isinstance(m["content"], str) else len(str(m["content"])) for m in row["messages"])


@dataclass(frozen=True)
class Stage:
    """One training stage as data.

    Attributes:
        name: the stage's name (``train/<name>.py``).
        reads: ``captions``, ``conversations`` or ``preferences`` (the :mod:`vlm_chat.data` reader it uses).
        trains_mapper: whether the mapper trains by default (``train_mapper`` overrides it).
        trains_lora: whether the LoRA adapter trains.
        conversations: ``(row, image_token) -> [messages, ...]``: one conversation per row, or chosen + rejected.
        text_length: characters of text in a row, the length proxy of ``group_by_length``.
        loss_step: ``loss_step(options) -> loss_fn(model, batch) -> (loss, metrics)`` for the engine.
        reference: the loss compares against a frozen reference (DPO: ``dpo_reference: init`` loads the starting
            checkpoint's adapter a second time, frozen).
    """

    name: str
    reads: str
    trains_mapper: bool
    trains_lora: bool
    conversations: Callable[[dict, str], list[list[dict]]]
    text_length: Callable[[dict], int]
    loss_step: Callable[[StageArgs], LossFn]
    reference: bool = False


STAGES: dict[str, Stage] = {
    "pretrain": Stage("pretrain", "captions", trains_mapper=True, trains_lora=False,
                      conversations=_caption_conversation, text_length=lambda r: len(r["caption"]), loss_step=lm_step),
    "instruct": Stage("instruct", "conversations", trains_mapper=True, trains_lora=True,
                      conversations=lambda row, _: [row["messages"]], text_length=_content_length, loss_step=lm_step),
    "dpo": Stage("dpo", "preferences", trains_mapper=True, trains_lora=True, conversations=_preference_conversations,
                 text_length=lambda r: len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])),
                 loss_step=dpo_step, reference=True),
}


# ---------------------------------------------------------------------------------------------------- running


def load_rows(stage: str, data: DataArgs, skip_bad_rows: bool) -> list[dict]:
    """The training rows of ``stage`` read from ``data`` (QA rows packed per image for conversations)."""
    from vlm_chat import data as readers

    reads = STAGES[stage].reads
    reader = {"captions": readers.load_captions, "conversations": readers.load_conversations,
              "preferences": readers.load_preferences}[reads]
    rows, report = reader(data.train_file, data.image_folder, skip_bad_rows=skip_bad_rows)
    if reads == "conversations" and data.pack_by_image:
        rows = readers.pack_by_image(rows, max_turns=data.max_turns_per_sample)
    rows = list(rows)
    if data.max_train_samples:
        rows = rows[: data.max_train_samples]
    logger.info("%s: %d training samples from %s (%s)", stage, len(rows), data.train_file, report)
    return rows


def build_chat(config: StageConfig) -> VLMChat:
    """The model to train: ``init_from`` loaded trainable, or ``model`` assembled (seeded by ``train.seed``)."""
    if config.init_from is not None:
        return VLMChat.from_pretrained(config.init_from, is_trainable=True)
    return VLMChat.from_config(copy.deepcopy(config.model), seed=config.train.seed)  # building fills num_image_tokens


def _add_reference_adapter(chat: VLMChat, init_from: str) -> None:
    """Load the starting checkpoint's adapter a second time, frozen, as the DPO reference (TRL's ref_adapter_name).

    Disabling the adapter instead would make the reference the LLM *before* instruction tuning, so the implicit KL
    term would pull the policy back towards a model that never saw the visual instruction data.
    """
    adapter = Path(init_from) / "adapter"
    chat.model.lm.load_adapter(str(adapter), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    chat.model.lm.set_adapter("default")
    logger.info("dpo: reference = frozen copy of %s", adapter)


def _param_groups(chat: VLMChat, config: StageConfig, mapper: bool, lora: bool) -> list[dict]:
    groups = []
    if mapper:
        groups.append({"name": "mapper", "params": list(chat.model.mapper.parameters()), "lr": config.options.mapper_lr})
    if lora:
        groups.append({"name": "lora", "params": chat.model.lora_parameters(), "lr": config.options.lora_lr})
    # Trained weights are kept in fp32 whatever the model's dtype (LLaVA and PEFT do the same): AdamW updates below
    # bf16's resolution would be lost, and fp16 mixed precision's gradient scaler refuses fp16 gradients. The frozen
    # base keeps its half dtype; mixed_precision's autocast runs the matmuls in half precision.
    for p in (p for g in groups for p in g["params"]):
        if p.dtype != torch.float32:
            p.data = p.data.float()
    return groups


def save_stage_config(path: str | Path, config: StageConfig) -> Path:
    """Write ``config`` as a YAML file that :func:`load_stage_config` (or ``--config``) reads back."""
    flat = (_InitFrom(config.init_from), config.data, config.options, config.train)
    return save_config(path, *flat, sections={"model": config.model})


def run_stage(config: StageConfig) -> TrainResult:
    """Build the model, train the stage, and save ``output_dir/final`` (a VLMChat checkpoint).

    Args:
        config: the run (see :class:`StageConfig`; :func:`load_stage_config` reads one from YAML).

    Returns:
        The engine's :class:`~vlm_chat.training.engine.TrainResult` (``final_dir``, ``history``, ...).
    """
    stage, cfg = STAGES[config.stage], config.train
    chat = build_chat(config)
    mapper = stage.trains_mapper if config.options.train_mapper is None else config.options.train_mapper
    lora = stage.trains_lora
    if not (mapper or lora):
        raise ConfigError(f"stage {stage.name} trains only the mapper; 'train_mapper: false' leaves nothing to train")
    if lora and not chat.config.lm.use_lora:
        raise ValueError(f"stage {stage.name} trains LoRA but the model has no adapter (lm.use_lora is false)")
    if stage.reference and config.options.dpo_reference == "init" and config.init_from:
        _add_reference_adapter(chat, config.init_from)
    chat.model.configure_trainable(mapper=mapper, lora=lora)
    groups = _param_groups(chat, config, mapper, lora)
    rows = load_rows(stage.name, config.data, cfg.skip_bad_rows)
    save_stage_config(Path(cfg.output_dir) / "config.yaml", config)
    command = config.command or f"run_stage(load_stage_config({stage.name!r}, 'config.yaml'))"

    def on_save(directory: Path) -> None:
        card = model_card(chat.config, body=f"## Training\n\nStage `{stage.name}`: `{command}`\n")
        chat.save_pretrained(directory, card=card)

    lengths = [stage.text_length(row) for row in rows] if cfg.group_by_length else None
    features = FeatureCache(chat, config.options.cache_vision_features)
    if features.enabled:
        features.precompute([rows[i]["image"] for i in _rows_in_run(len(rows), cfg, lengths) if rows[i]["image"]],
                            progress=not cfg.disable_tqdm)
    return train(
        chat.model,
        rows,
        Collator(chat, stage, features, config.data.independent_turns),
        stage.loss_step(config.options),
        cfg,
        param_groups=groups,
        on_save=on_save,
        gradient_checkpointing_fn=_gradient_checkpointing,
        lengths=lengths,
        dataset_fingerprint=rows_fingerprint(rows),
    )


def _rows_in_run(num_rows: int, cfg: TrainConfig, lengths: list[int] | None) -> list[int]:
    """The rows the engine will draw (the same order, batch layout and step count), so the feature pass covers those.

    A run shorter than an epoch then costs the tower no more than it trains on.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))  # as the engine counts processes
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * (num_rows // per_step))
    return samples_in_run(num_rows, cfg.seed, per_step, steps, lengths)


def load_stage_config(stage: str, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
                      argv: Sequence[str] | None = None) -> StageConfig:
    """A :class:`StageConfig` from a YAML file, then Python ``overrides``, then command-line ``argv`` (last wins).

    Args:
        stage: ``pretrain``, ``instruct`` or ``dpo``.
        config_file: a stage YAML (flat engine/data/stage keys, the model under ``model:``); ``--config`` in
            ``argv`` replaces it.
        overrides: ``{key: value}``; model keys as dotted names (``{"model.lm.lora_r": 8}``) or a ``model`` mapping.
        argv: ``--key value`` pairs (``--model.mapper.kind perceiver``); ``--help`` lists the keys.

    Returns:
        The checked configuration.

    Raises:
        ConfigError: unknown key (naming it and the valid ones), an old key name (naming the new one), a wrong type,
            or both / neither of ``model`` and ``init_from``.
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    init, data, options, train_cfg, model = parse_config(
        [_InitFrom, DataArgs, StageArgs, TrainConfig], list(argv or []), prog=f"train/{stage}.py",
        config_file=config_file, overrides=overrides, nested={"model": VLMConfig}, moved=MOVED_KEYS,
    )
    return StageConfig(stage=stage, model=model, init_from=init.init_from, data=data, options=options, train=train_cfg)


def main(stage: str, argv: Sequence[str] | None = None) -> TrainResult:
    """Command-line entry point of ``train/<stage>.py``: ``--config FILE [--key value ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging(logging.INFO)  # library bars and warnings only on a terminal
    try:
        config = load_stage_config(stage, argv=argv)
    except ConfigError as err:  # a config mistake deserves a message, not a traceback
        raise SystemExit(f"error: {err}") from None
    config.command = shlex.join([f"train/{stage}.py", *argv])
    result = run_stage(config)
    print(f"final model: {result.final_dir}")
    return result


def _gradient_checkpointing(model) -> None:
    model = extract_model_from_parallel(model)
    model.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.causal_lm.enable_input_require_grads()
