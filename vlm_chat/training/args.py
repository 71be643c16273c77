"""Typed training configuration: dataclasses per component, YAML files, command-line overrides.

A stage composes several dataclasses (say ``ContrastiveArgs``, ``CaptionDataArgs`` and :class:`TrainConfig`) and
calls :func:`parse_config`::

    model_args, data_args, train_cfg = parse_config((ContrastiveArgs, CaptionDataArgs, TrainConfig), argv)

which reads ``--config file.yaml`` (a mapping ``key: value``), then Python ``overrides``, then ``--key value``
overrides from the command line (the command line wins). Keys form one flat namespace across the dataclasses, like
``transformers.HfArgumentParser`` (which does the type conversion here); a ``nested`` section such as ``model:`` (a
whole :class:`vlm_chat.config.VLMConfig`) is a mapping in the file and dotted keys on the command line
(``--model.lm.lora_r 8``), checked by :func:`vlm_chat.config.from_dict`. Every key is checked before any training
starts:

* an unknown key, in the file or on the command line, is a :class:`ConfigError` naming the key, where it
  came from, the closest valid key, and all valid keys;
* a value of the wrong type (``per_device_train_batch_size: 2.5``, ``learning_rate: fast``) is a
  :class:`ConfigError` naming the key, the expected type, and the valid keys;
* an old name of a key that now has transformers ``TrainingArguments``' name (``num_epochs``) is a
  :class:`ConfigError` naming the new one (``num_train_epochs``), see :data:`RENAMED_KEYS`;
* ``null`` in YAML or ``none``/``null`` on the command line sets an ``Optional`` field to ``None``
  (and is an error for a field that is not optional).

:func:`save_config` writes the resolved values back as YAML; passing that file to ``--config`` reproduces
the run.
"""

import argparse
import copy
import dataclasses
import difflib
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from vlm_chat.training.train_config import CaptionDataArgs, ConfigError, FloatDict, TrainConfig

logger = logging.getLogger(__name__)

__all__ = [
    "CaptionDataArgs",
    "ConfigError",
    "FloatDict",
    "RENAMED_KEYS",
    "TrainConfig",
    "config_to_dict",
    "load_yaml",
    "parse_config",
    "save_config",
]

_NULLS = {"none", "null", "~"}


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


#: Keys renamed to transformers ``TrainingArguments``' names; the old name is an error that names the new one.
RENAMED_KEYS = {
    "per_device_batch_size": "per_device_train_batch_size",
    "num_epochs": "num_train_epochs",
    "lr_scheduler": "lr_scheduler_type",
    "resume": "resume_from_checkpoint",
    "num_workers": "dataloader_num_workers",
}


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a config file: a YAML mapping (empty file: ``{}``).

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: not valid YAML, or not a mapping; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return {str(k): v for k, v in data.items()}


def _nested_field(section: str, cls: type, dotted: str, source: str) -> Any:
    """The type annotation of ``a.b.c`` inside dataclass ``cls``; unknown parts are a ConfigError naming the key."""
    annotation: Any = cls
    walked = [section]
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(annotation):
            raise ConfigError(f"config key {'.'.join(walked)!r} in {source} is a value, not a section")
        hints = typing.get_type_hints(annotation)
        names = [f.name for f in dataclasses.fields(annotation)]
        if part not in names:
            key = ".".join([*walked, part])
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean {'.'.join([*walked, close[0]])!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}; valid keys there: {', '.join(names)}")
        walked.append(part)
        annotation = hints[part]
    return annotation


def _from_text(text: str, annotation: Any, key: str, source: str) -> Any:
    """A command-line string as a value of ``annotation`` (from_dict checks the result's type)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if text.lower() in _NULLS and type(None) in typing.get_args(annotation):
        return None
    target = args[0] if len(args) == 1 else annotation
    try:
        if target is bool:
            return string_to_bool(text)
        if target in (int, float):
            return target(text)
        if target is str or (str in args and not text.startswith("[")):
            if list[str] in args and "," in text:
                return [t.strip() for t in text.split(",") if t.strip()]
            return text
        return yaml.safe_load(text)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        raise ConfigError(f"config key {key!r} in {source}: {text!r} is not a valid {_type_name(annotation)}") from err


def _merge(into: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        into = into.setdefault(part, {})
        if not isinstance(into, dict):
            raise ConfigError(f"config key {part!r} is a value, not a section")
    into[last] = value


def _build_nested(name: str, cls: type, sources: list[tuple[str, Any]]) -> Any:
    """One nested section (e.g. ``model``) from mapping sources merged in order; None if no source sets it."""
    from vlm_chat.config import from_dict

    merged: dict[str, Any] = {}
    for source, value in sources:
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        try:
            from_dict(cls, value, source, prefix=f"{name}.")  # each source on its own: errors name their source
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None
        _deep_update(merged, value)
    if not sources:
        return None
    return from_dict(cls, merged, "config", prefix=f"{name}.")


def _deep_update(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_update(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def parse_config(
    dataclass_types: Iterable[type],
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    *,
    config_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    nested: Mapping[str, type] | None = None,
    moved: Mapping[str, str] | None = None,
) -> tuple[Any, ...]:
    """Build the dataclasses from a YAML file, Python overrides and ``--key value`` command-line overrides.

    Sources apply in this order, later ones winning: ``config_file`` (or ``--config FILE`` in ``argv``), then
    ``overrides``, then the rest of ``argv``.

    Args:
        dataclass_types: the config dataclasses to fill, in order; field names must be unique across them.
        argv: command-line arguments without the program name; default ``sys.argv[1:]``.
            ``--help`` prints every key with its default and exits.
        prog: program name for ``--help``.
        config_file: a YAML file to read first (``--config`` on the command line replaces it).
        overrides: ``{key: value}`` with Python values, checked like YAML values (``{"max_steps": 5}``).
        nested: sections that are a whole dataclass, e.g. ``{"model": VLMConfig}``: a mapping under that key in the
            file or the overrides, ``model.lm.lora_r``-style dotted keys in the overrides and on the command line
            (``--model.lm.lora_r 8``). Each becomes one more returned value (None when no source sets it).
        moved: ``{old key: new key}`` of keys that moved (e.g. into a nested section); the old key is an error naming
            the new one, like the names in :data:`RENAMED_KEYS`.

    Returns:
        One instance per dataclass, in the given order, then one value per ``nested`` section.

    Raises:
        ConfigError: unknown key (or an old name, naming the new one), wrong type, null for a non-optional key,
            missing required key, or an unreadable/malformed YAML file; the message names the key (and the file)
            and lists valid keys.
        FileNotFoundError: the config file does not exist.
    """
    dataclass_types = list(dataclass_types)
    nested = dict(nested or {})
    argv = list(sys.argv[1:] if argv is None and overrides is None and config_file is None else argv or [])
    valid_text = _valid_keys_text(dataclass_types)
    parser = _Parser(dataclass_types, valid_text, prog=prog, allow_abbrev=False)
    if "-h" in argv or "--help" in argv:
        parser.add_argument("--config", help="YAML file of key: value pairs; command-line keys override it.")
        for name, cls in nested.items():
            parser.add_argument(f"--{name}.KEY", metavar="VALUE", help=f"a key of the {name} section "
                                f"({cls.__name__}) as a dotted name, e.g. --{name}.<part>.<key> VALUE")
        parser.parse_args(["--help"])  # prints help and exits

    config_path = config_file
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
        data = load_yaml(config_path)
        sources.append((f"config file {config_path}", list(data.items())))
    if overrides:
        sources.append(("the overrides", [(str(k), v) for k, v in overrides.items()]))
    sources.append(("the command line", [(k, vals) for k, vals in _split_cli(rest)]))

    final: dict[str, tuple[str, Any]] = {}  # key -> (source, raw value); later sources win
    sections: dict[str, list[tuple[str, Any]]] = {name: [] for name in nested}
    for source, items in sources:
        from_cli = source == "the command line"
        for key, raw in items:
            head = key.partition(".")[0]
            if head in nested:
                if key == head:  # a whole section
                    if from_cli:
                        raise ConfigError(f"{source}: set keys of '{head}' one by one, e.g. --{head}.KEY value")
                    if raw is not None:
                        sections[head].append((source, raw))
                    continue
                sub = key[len(head) + 1 :]
                annotation = _nested_field(head, nested[head], sub, source)
                if from_cli and dataclasses.is_dataclass(annotation):
                    first = dataclasses.fields(annotation)[0].name
                    raise ConfigError(f"config key {key!r} in {source} is a section; set its keys, e.g. --{key}.{first}")
                if from_cli:
                    if len(raw) != 1:
                        raise ConfigError(f"config key {key!r} in {source} takes one value, got {raw!r}")
                    raw = _from_text(raw[0], annotation, key, source)
                part: dict[str, Any] = {}
                _merge(part, sub, raw)
                sections[head].append((source, part))
                continue
            if key in RENAMED_KEYS:
                raise ConfigError(
                    f"config key {key!r} in {source} is now {RENAMED_KEYS[key]!r} (transformers TrainingArguments' name)"
                )
            if moved and key in moved:
                raise ConfigError(f"config key {key!r} in {source} is now {moved[key]!r}")
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
                strings = None  # "--resume_from_checkpoint none"; for a non-optional key "none" stays a value
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
    for name, cls in nested.items():
        out.append(_build_nested(name, cls, sections[name]))
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


def config_to_dict(*objs: Any, sections: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Flatten config dataclass instances into one ``{key: plain value}`` mapping (the YAML layout).

    Args:
        *objs: flat config dataclasses; their fields become top-level keys.
        sections: nested sections (``{"model": VLMConfig(...)}``) written as mappings; None values are left out.
    """
    out: dict[str, Any] = {}
    for obj in objs:
        for f in dataclasses.fields(obj):
            if f.init:
                out[f.name] = _plain(getattr(obj, f.name))
    for name, value in (sections or {}).items():
        if value is not None:
            out[name] = _plain(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
    return out


def save_config(path: str | os.PathLike, *objs: Any, sections: Mapping[str, Any] | None = None) -> Path:
    """Write the resolved configuration as YAML (loadable again with ``--config``).

    Args:
        path: file to write; its folder is created.
        *objs: the config dataclass instances of the run.
        sections: nested sections, as in :func:`config_to_dict`.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name: every process of a multi-process run writes the same file at the same time.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("# Resolved configuration of this run; reproduce with --config <this file>.\n")
        yaml.safe_dump(config_to_dict(*objs, sections=sections), fh, sort_keys=False, allow_unicode=True)
    os.replace(tmp, path)
    return path
