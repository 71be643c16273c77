"""Typed training configuration: dataclasses per component, YAML files, command-line overrides.

A stage script composes several dataclasses (say ``ContrastiveModelArgs``, ``CaptionDataArgs`` and
:class:`TrainConfig`) and calls :func:`parse_config`::

    model_args, data_args, train_cfg = parse_config((ContrastiveModelArgs, CaptionDataArgs, TrainConfig))

which reads ``--config file.yaml`` (a flat mapping ``key: value``) and then ``--key value`` overrides from
the command line (the command line wins). Keys form one flat namespace across the dataclasses, like
``transformers.HfArgumentParser`` (which does the type conversion here). Every key is checked before any
training starts:

* an unknown key, in the file or on the command line, is a :class:`ConfigError` naming the key, where it
  came from, the closest valid key, and all valid keys;
* a value of the wrong type (``per_device_batch_size: 2.5``, ``learning_rate: fast``) is a
  :class:`ConfigError` naming the key, the expected type, and the valid keys;
* ``null`` in YAML or ``none``/``null`` on the command line sets an ``Optional`` field to ``None``
  (and is an error for a field that is not optional).

:func:`save_config` writes the resolved values back as YAML; passing that file to ``--config`` reproduces
the run.
"""

import dataclasses
import difflib
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from transformers import HfArgumentParser, SchedulerType

logger = logging.getLogger(__name__)

__all__ = [
    "CaptionDataArgs",
    "ConfigError",
    "FloatDict",
    "TrainConfig",
    "config_to_dict",
    "parse_config",
    "save_config",
]

_NULLS = {"none", "null", "~"}


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
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; -1 = derive from num_epochs."})
    num_epochs: float = field(default=1.0, metadata={"help": "Epochs when max_steps is -1."})
    per_device_batch_size: int = field(default=8, metadata={"help": "Samples per micro-batch per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (default for all groups)."})
    lr_groups: FloatDict | None = field(
        default=None, metadata={"help": "Per parameter-group learning rates, e.g. mapper=1e-3,lora=2e-4."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases/norms/scalars)."})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: str = field(default="cosine", metadata={"help": "transformers scheduler name (cosine, linear, ...)."})
    warmup_steps: int = field(default=0, metadata={"help": "Warmup steps; overrides warmup_ratio when > 0."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warmup as a fraction of max_steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables."})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata={"help": "accelerate mixed precision; 'no' = fp32 (CPU)."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for activation memory."})
    logging_steps: int = field(default=10, metadata={"help": "Log averaged metrics every N steps."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N steps; 0 = only at the end."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep the last K checkpoints; 0 = keep all."})
    eval_steps: int = field(default=0, metadata={"help": "Run the stage's evaluation every N steps; 0 = at end."})
    resume: str | None = field(default=None, metadata={"help": "Checkpoint dir, or 'latest' in output_dir."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Skip and count bad data rows instead of failing."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    group_by_length: bool = field(
        default=False, metadata={"help": "Batch samples of similar length together (less padding; exact resume kept)."}
    )
    report_to: Literal["tensorboard", "none"] = field(
        default="tensorboard", metadata={"help": "Where metrics go besides the log file."}
    )
    deterministic: bool = field(default=True, metadata={"help": "torch deterministic algorithms (warn-only)."})
    disable_tqdm: bool = False

    def __post_init__(self):
        if self.lr_groups is not None and not isinstance(self.lr_groups, FloatDict):
            self.lr_groups = FloatDict(self.lr_groups)
        positive = ("per_device_batch_size", "gradient_accumulation_steps", "logging_steps")
        non_negative = ("save_steps", "save_total_limit", "eval_steps", "num_workers", "warmup_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config key {name!r} must be >= 1, got {getattr(self, name)}")
        for name in non_negative + ("weight_decay", "max_grad_norm", "warmup_ratio"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key {name!r} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"config key 'max_steps' must be >= 1 or -1 (use num_epochs), got {self.max_steps}")
        if self.max_steps == -1 and self.num_epochs <= 0:
            raise ConfigError(f"config key 'num_epochs' must be > 0 when max_steps is -1, got {self.num_epochs}")
        if self.warmup_ratio >= 1:
            raise ConfigError(f"config key 'warmup_ratio' must be < 1, got {self.warmup_ratio}")
        schedulers = sorted(s.value for s in SchedulerType)
        if self.lr_scheduler not in schedulers:
            raise ConfigError(
                f"config key 'lr_scheduler': unknown scheduler {self.lr_scheduler!r}; valid: {schedulers}"
            )
        if self.learning_rate < 0:
            raise ConfigError(f"config key 'learning_rate' must be >= 0, got {self.learning_rate}")


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


# ----------------------------------------------------------------------------------------------------------------
# Parsing


def _is_optional(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return (origin is Union or origin is types.UnionType) and type(None) in typing.get_args(tp)


def _field_types(dataclass_types: Sequence[type]) -> dict[str, tuple[type, Any]]:
    """Map each init field name to (owning dataclass, resolved type hint)."""
    out: dict[str, tuple[type, Any]] = {}
    for dtype in dataclass_types:
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if f.init:
                out[f.name] = (dtype, hints[f.name])
    return out


def _valid_keys_text(dataclass_types: Sequence[type]) -> str:
    parts = []
    for dtype in dataclass_types:
        names = [f.name for f in dataclasses.fields(dtype) if f.init]
        parts.append(f"{dtype.__name__}: {', '.join(names)}")
    return "; ".join(parts)


def _to_strings(value: Any) -> list[str]:
    """A YAML value as the command-line strings argparse would receive."""
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, dict):
        return [json.dumps(value)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _to_strings(v)]
    return [str(value)]


class _Parser(HfArgumentParser):
    """HfArgumentParser whose errors raise ConfigError (with the valid keys) instead of exiting."""

    def __init__(self, dataclass_types, valid_keys_text: str, **kwargs):
        self._valid_keys_text = valid_keys_text
        super().__init__(dataclass_types, **kwargs)

    def error(self, message):  # noqa: D102 - argparse hook
        raise ConfigError(f"{message}; valid keys: {self._valid_keys_text}")


def _split_cli(argv: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["--a", "1", "--b=x", "--flag"]`` -> ``[("a", ["1"]), ("b", ["x"]), ("flag", [])]``."""
    items: list[tuple[str, list[str]]] = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            key, sep, value = token[2:].partition("=")
            items.append((key.replace("-", "_"), [value] if sep else []))
        elif not items:
            raise ConfigError(f"unexpected command-line value {token!r}: options look like --key value")
        else:
            items[-1][1].append(token)
    return items


def parse_config(
    dataclass_types: Iterable[type], argv: Sequence[str] | None = None, prog: str | None = None
) -> tuple[Any, ...]:
    """Build the dataclasses from ``--config file.yaml`` plus ``--key value`` overrides.

    Args:
        dataclass_types: the config dataclasses to fill, in order; field names must be unique across them.
        argv: command-line arguments without the program name; default ``sys.argv[1:]``.
            ``--help`` prints every key with its default and exits.
        prog: program name for ``--help``.

    Returns:
        One instance per dataclass, in the given order.

    Raises:
        ConfigError: unknown key, wrong type, null for a non-optional key, missing required key, or an
            unreadable/malformed YAML file; the message names the key (and the file) and lists valid keys.
        FileNotFoundError: the ``--config`` file does not exist.
    """
    dataclass_types = list(dataclass_types)
    argv = list(sys.argv[1:] if argv is None else argv)
    valid_text = _valid_keys_text(dataclass_types)
    parser = _Parser(dataclass_types, valid_text, prog=prog, allow_abbrev=False)
    if "-h" in argv or "--help" in argv:
        parser.add_argument("--config", help="YAML file of key: value pairs; command-line keys override it.")
        parser.parse_args(["--help"])  # prints help and exits

    config_path = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file path")
            config_path, i = argv[i + 1], i + 2
            continue
        if token.startswith("--config="):
            config_path = token.split("=", 1)[1]
        else:
            rest.append(token)
        i += 1

    types_by_key = _field_types(dataclass_types)
    # True-default bools also get argparse's "--no_<name>" complement.
    complement = {
        f"no_{name}": name for name, (_, tp) in types_by_key.items() if tp is bool and _default(name, dataclass_types)
    }
    valid = sorted(types_by_key)

    sources: list[tuple[str, list[tuple[str, Any]]]] = []
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {config_path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{config_path}: not valid YAML: {err}") from err
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{config_path}: expected a mapping of key: value, got {type(data).__name__}")
        sources.append((f"config file {config_path}", [(str(k), v) for k, v in data.items()]))
    sources.append(("the command line", [(k, vals) for k, vals in _split_cli(rest)]))

    final: dict[str, tuple[str, Any]] = {}  # key -> (source, raw value); later sources win
    for source, items in sources:
        from_cli = source == "the command line"
        for key, raw in items:
            if key in complement:
                if not from_cli:
                    raise ConfigError(f"unknown config key {key!r} in {source}; write '{complement[key]}: false'")
                key, raw = complement[key], ["false"]
            if key not in types_by_key:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown config key {key!r} in {source}{hint}; valid keys: {valid_text}")
            strings = raw if from_cli else (None if raw is None else _to_strings(raw))
            if from_cli and len(strings) == 1 and strings[0].lower() in _NULLS and _is_optional(types_by_key[key][1]):
                strings = None  # "--resume none"; for a non-optional key "none" stays a value (report_to: none)
            _check_value(parser, key, types_by_key[key][1], strings, source, valid_text, raw, from_cli)
            final[key] = (source, strings)

    tokens: list[str] = []
    nulls: dict[str, None] = {}
    for key, (_, strings) in final.items():
        if strings is None:
            nulls[key] = None
        else:
            tokens += [f"--{key}", *strings]
    try:
        objs = parser.parse_args_into_dataclasses(args=tokens, look_for_args_file=False)
    except ConfigError as err:
        if "required" in str(err):
            missing = [n for n, (d, _) in types_by_key.items() if _required(n, d) and n not in final]
            raise ConfigError(f"missing required config key(s) {missing}; valid keys: {valid_text}") from None
        raise
    out = []
    for obj in objs:
        names = {f.name for f in dataclasses.fields(obj) if f.init}
        changes = {k: None for k in nulls if k in names}
        out.append(dataclasses.replace(obj, **changes) if changes else obj)
    return tuple(out)


def _default(name: str, dataclass_types: Sequence[type]) -> Any:
    for dtype in dataclass_types:
        for f in dataclasses.fields(dtype):
            if f.name == name:
                return f.default
    return None


def _required(name: str, dtype: type) -> bool:
    f = next(f for f in dataclasses.fields(dtype) if f.name == name)
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _check_value(parser, key, tp, strings, source, valid_text, raw, from_cli) -> None:
    """Type-check one value with the same converter argparse will use, so the error can name its source."""
    if strings is None:
        if not _is_optional(tp):
            raise ConfigError(f"config key {key!r} in {source} cannot be null (type {_type_name(tp)})")
        return
    action = parser._option_string_actions[f"--{key}"]
    is_list = action.nargs in ("+", "*")
    if not is_list and len(strings) > 1:
        raise ConfigError(f"config key {key!r} in {source} takes one value, got {raw!r}; valid keys: {valid_text}")
    if not strings and not (action.nargs == "?" and action.const is not None):
        raise ConfigError(f"config key {key!r} in {source} needs a value")
    for s in strings:
        try:
            value = action.type(s) if action.type is not None else s
        except Exception as err:  # converters raise ValueError, TypeError or argparse.ArgumentTypeError
            raise ConfigError(
                f"config key {key!r} in {source}: {s!r} is not a valid {_type_name(tp)} ({err}); valid keys: {valid_text}"
            ) from None
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"config key {key!r} in {source}: {s!r} is not one of {list(action.choices)}")
    if not from_cli and isinstance(raw, bool) and action.type is str:
        # A YAML boolean for a text key is almost always a mistake (e.g. `resume: yes`); str() would hide it.
        raise ConfigError(f"config key {key!r} in {source}: boolean given for a {_type_name(tp)} value")


def _type_name(tp: Any) -> str:
    if _is_optional(tp):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"optional {_type_name(inner[0])}" if len(inner) == 1 else str(tp)
    if typing.get_origin(tp) is Literal:
        return f"one of {list(typing.get_args(tp))}"
    return getattr(tp, "__name__", str(tp))


# ----------------------------------------------------------------------------------------------------------------
# Saving


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(*objs: Any) -> dict[str, Any]:
    """Flatten config dataclass instances into one ``{key: plain value}`` mapping (the YAML layout)."""
    out: dict[str, Any] = {}
    for obj in objs:
        for f in dataclasses.fields(obj):
            if f.init:
                out[f.name] = _plain(getattr(obj, f.name))
    return out


def save_config(path: str | os.PathLike, *objs: Any) -> Path:
    """Write the resolved configuration as YAML (loadable again with ``--config``).

    Args:
        path: file to write; its folder is created.
        *objs: the config dataclass instances of the run.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name: every process of a multi-process run writes the same file at the same time.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("# Resolved configuration of this run; reproduce with --config <this file>.\n")
        yaml.safe_dump(config_to_dict(*objs), fh, sort_keys=False, allow_unicode=True)
    os.replace(tmp, path)
    return path
