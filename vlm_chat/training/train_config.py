"""The engine's settings (:class:`TrainConfig`, transformers ``TrainingArguments`` names) and the caption data keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from transformers import SchedulerType

__all__ = ["CaptionDataArgs", "ConfigError", "FloatDict", "TrainConfig"]


#: pip names of the tracker packages that differ from accelerate's tracker names.
_TRACKER_PACKAGES = {"comet_ml": "comet-ml"}


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key and lists the valid ones."""


class FloatDict(dict):
    """``{name: float}`` that also parses from a string, so it can be a command-line value.

    Accepted strings: JSON/YAML mappings (``'{"mapper": 1e-3, "lora": 2e-4}'``) or ``mapper=1e-3,lora=2e-4``.
    """

    def __init__(self, value: Any = None):
        if value is None:
            value = {}
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                value = yaml.safe_load(text)
            else:
                value = {}
                for item in filter(None, (part.strip() for part in text.split(","))):
                    name, sep, number = item.partition("=")
                    if not sep:
                        raise ValueError(f"expected name=value, got {item!r}")
                    value[name.strip()] = number.strip()
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping of name -> number, got {value!r}")
        super().__init__({str(k): float(v) for k, v in value.items()})


@dataclass
class TrainConfig:
    """Engine settings shared by all stages (see ``docs/training.md`` for each key)."""

    output_dir: str = field(metadata={"help": "Run directory: checkpoints/, logs/, final/, config.yaml."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, data order and dropout."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; -1 = derive from num_train_epochs."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs when max_steps is -1."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Samples per micro-batch per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (default for all groups)."})
    lr_groups: FloatDict | None = field(
        default=None, metadata={"help": "Per parameter-group learning rates, e.g. mapper=1e-3,lora=2e-4."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases/norms/scalars)."})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name (cosine, linear, ...)."})
    warmup_steps: int = field(default=0, metadata={"help": "Warmup steps; overrides warmup_ratio when > 0."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warmup as a fraction of max_steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables."})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata={"help": "accelerate mixed precision; 'no' = fp32 (CPU)."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for activation memory."})
    logging_steps: int = field(default=10, metadata={"help": "Log averaged metrics every N steps."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N steps; 0 = only at the end."})
    save_every_minutes: float = field(
        default=0.0,
        metadata={"help": "Also checkpoint at the first step boundary after this many minutes since the last "
                          "checkpoint (0: off); still between steps, so resuming stays exact."},
    )
    save_total_limit: int = field(default=2, metadata={"help": "Keep the last K checkpoints; 0 = keep all."})
    eval_steps: int = field(default=0, metadata={"help": "Run the stage's evaluation every N steps; 0 = at end."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "Checkpoint dir, or 'latest' in output_dir."}
    )
    skip_bad_rows: bool = field(default=False, metadata={"help": "Skip and count bad data rows instead of failing."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    group_by_length: bool = field(
        default=False, metadata={"help": "Batch samples of similar length together (less padding; exact resume kept)."}
    )
    # A plain str for the config parser (transformers' HfArgumentParser would turn `str | list[str]` into a list
    # field); several trackers are comma-separated, and a Python list works too.
    report_to: str = field(
        default="tensorboard",
        metadata={
            "help": "Where metrics go besides the log file: accelerate trackers (tensorboard, wandb, mlflow, trackio, "
            "comet_ml, aim, clearml, dvclive, swanlab), several comma-separated; 'all' = every installed one; 'none'."
        },
    )
    deterministic: bool = field(default=True, metadata={"help": "torch deterministic algorithms (warn-only)."})
    disable_tqdm: bool = False

    def __post_init__(self):
        if self.lr_groups is not None and not isinstance(self.lr_groups, FloatDict):
            self.lr_groups = FloatDict(self.lr_groups)
        positive = ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps")
        non_negative = ("save_steps", "save_total_limit", "eval_steps", "dataloader_num_workers", "warmup_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config key {name!r} must be >= 1, got {getattr(self, name)}")
        for name in non_negative + ("weight_decay", "max_grad_norm", "warmup_ratio", "save_every_minutes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key {name!r} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"config key 'max_steps' must be >= 1 or -1 (use num_train_epochs), got {self.max_steps}")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ConfigError(
                f"config key 'num_train_epochs' must be > 0 when max_steps is -1, got {self.num_train_epochs}"
            )
        if self.warmup_ratio >= 1:
            raise ConfigError(f"config key 'warmup_ratio' must be < 1, got {self.warmup_ratio}")
        schedulers = sorted(s.value for s in SchedulerType)
        if self.lr_scheduler_type not in schedulers:
            raise ConfigError(
                f"config key 'lr_scheduler_type': unknown scheduler {self.lr_scheduler_type!r}; valid: {schedulers}"
            )
        if self.learning_rate < 0:
            raise ConfigError(f"config key 'learning_rate' must be >= 0, got {self.learning_rate}")
        if self.report_to is None:  # YAML's `report_to: none` (null), as transformers takes it
            self.report_to = "none"
        if isinstance(self.report_to, (list, tuple)) and len(self.report_to) == 1:
            self.report_to = str(self.report_to[0])  # the command line gives a list even for one name
        self.trackers()  # an unknown or uninstalled tracker fails here, before any model is built

    def trackers(self) -> list[str]:
        """The accelerate trackers that ``report_to`` names (``log_with`` of the Accelerator); ``[]`` for ``none``.

        ``report_to`` follows transformers' ``TrainingArguments``: a name, several (a list or comma-separated), ``all``
        (every tracker whose package is installed) or ``none``.

        Returns:
            accelerate ``LoggerType`` values, in the order given.

        Raises:
            ConfigError: a name accelerate does not know, or a tracker whose package is not installed (the message
                says what to ``pip install``).
        """
        from accelerate.tracking import get_available_trackers
        from accelerate.utils import LoggerType

        value = self.report_to
        names = [value] if isinstance(value, str) else list(value)
        names = [n.strip().lower() for name in names for n in str(name).split(",") if n.strip()]
        names = [n for n in names if n != "none"]
        if not names:
            return []
        installed = [str(t.value) for t in get_available_trackers()]
        if names == ["all"]:
            return installed
        known = sorted(str(t.value) for t in LoggerType if t is not LoggerType.ALL)
        for name in names:
            if name not in known:
                raise ConfigError(
                    f"config key 'report_to': unknown tracker {name!r}; valid: {known}, 'all' or 'none'"
                )
            if name not in installed:
                package = _TRACKER_PACKAGES.get(name, name)
                raise ConfigError(
                    f"config key 'report_to': tracker {name!r} needs the {package!r} package, which is not installed "
                    f"(pip install {package}); or set report_to to one of the installed ones {installed} or 'none'"
                )
        return list(dict.fromkeys(names))


@dataclass
class CaptionDataArgs:
    """Image-caption pairs, read by ``vlm_chat.data.load_captions`` (formats: ``docs/data.md``)."""

    train_file: str = field(
        metadata={
            "help": "Caption JSONL, or an image folder holding metadata.jsonl (image key 'file_name' or 'image')."
        }
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "Root that image paths are relative to; default: the JSONL's folder."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
    image_cache_mb: int = field(
        default=1024, metadata={"help": "Keep preprocessed images in memory up to this many MB (0: off)."}
    )
