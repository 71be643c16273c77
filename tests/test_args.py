"""Config parsing: YAML + command-line overrides, and errors that name the bad key and list the valid ones."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from vlm_chat.config import VLMConfig
from vlm_chat.training.args import (
    RENAMED_KEYS,
    CaptionDataArgs,
    ConfigError,
    FloatDict,
    TrainConfig,
    parse_config,
    save_config,
)


@dataclass
class ModelArgs:
    hidden_size: int = 32
    kind: Literal["clip", "siglip"] = "clip"
    init_from: str | None = None
    layers: list[int] = field(default_factory=lambda: [1, 2])


TYPES = (ModelArgs, CaptionDataArgs, TrainConfig)


def _yaml(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_yaml_then_cli_overrides(tmp_path):
    path = _yaml(
        tmp_path,
        "output_dir: runs/x\ntrain_file: caps.jsonl\nhidden_size: 64\nlearning_rate: 1e-3\n"
        "gradient_checkpointing: true\nlr_groups: {mapper: 1e-3, lora: 2.0e-4}\nlayers: [3, 4]\n",
    )
    model, data, cfg = parse_config(TYPES, ["--config", path, "--hidden_size", "128", "--seed=7", "--kind", "siglip"])
    assert model.hidden_size == 128  # CLI wins over YAML
    assert model.kind == "siglip"
    assert model.layers == [3, 4]
    assert data.train_file == "caps.jsonl"
    assert cfg.seed == 7
    assert cfg.learning_rate == 1e-3  # YAML's "1e-3" is a string for PyYAML; it is still parsed as a float
    assert cfg.gradient_checkpointing is True
    assert cfg.lr_groups == {"mapper": 1e-3, "lora": 2e-4}


def test_unknown_key_names_key_source_and_valid_keys(tmp_path):
    path = _yaml(tmp_path, "output_dir: o\ntrain_file: t\nlearnig_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        parse_config(TYPES, ["--config", path])
    message = str(err.value)
    assert "'learnig_rate'" in message and path in message
    assert "did you mean 'learning_rate'" in message
    assert "TrainConfig: output_dir, seed" in message and "ModelArgs: hidden_size" in message

    with pytest.raises(ConfigError, match=r"unknown config key 'hiden_size' in the command line.*valid keys"):
        parse_config(TYPES, ["--output_dir", "o", "--train_file", "t", "--hiden_size", "3"])
    with pytest.raises(ConfigError, match="unknown config key 'learn'"):  # no argparse prefix matching
        parse_config(TYPES, ["--output_dir", "o", "--train_file", "t", "--learn", "3"])


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("per_device_train_batch_size: 2.5", "per_device_train_batch_size"),
        ("learning_rate: fast", "learning_rate"),
        ("learning_rate: true", "learning_rate"),
        ("gradient_checkpointing: maybe", "gradient_checkpointing"),
        ("hidden_size: [1, 2]", "hidden_size"),
        ("output_dir: true", "output_dir"),
    ],
)
def test_wrong_type_in_yaml_names_the_key_and_valid_keys(tmp_path, yaml_text, key):
    path = _yaml(tmp_path, f"output_dir: o\ntrain_file: t\n{yaml_text}\n")
    with pytest.raises(ConfigError) as err:
        parse_config(TYPES, ["--config", path])
    assert f"'{key}'" in str(err.value) and path in str(err.value)


def test_wrong_type_and_bad_choice_on_cli():
    with pytest.raises(ConfigError, match=r"'seed' in the command line: 'x' is not a valid int.*valid keys"):
        parse_config(TYPES, ["--output_dir", "o", "--train_file", "t", "--seed", "x"])
    with pytest.raises(ConfigError, match=r"'kind'.*'vit'.*\['clip', 'siglip'\]"):
        parse_config(TYPES, ["--output_dir", "o", "--train_file", "t", "--kind", "vit"])


def test_nulls_missing_keys_and_value_checks(tmp_path):
    path = _yaml(tmp_path, "output_dir: o\ntrain_file: t\ninit_from: some/dir\nresume_from_checkpoint: null\n")
    model, _, cfg = parse_config(TYPES, ["--config", path, "--init_from", "none"])
    assert model.init_from is None and cfg.resume_from_checkpoint is None
    with pytest.raises(ConfigError, match="'seed'.*cannot be null"):
        parse_config(TYPES, ["--config", _yaml(tmp_path, "output_dir: o\ntrain_file: t\nseed: null\n", "null.yaml")])
    with pytest.raises(ConfigError, match="'seed' in the command line: 'null' is not a valid int"):
        parse_config(TYPES, ["--config", path, "--seed", "null"])
    # For a key that is not optional, "none" is an ordinary value.
    assert parse_config(TYPES, ["--config", path, "--report_to", "none"])[2].report_to == "none"
    with pytest.raises(ConfigError, match=r"missing required config key\(s\) \['output_dir'\]"):
        parse_config(TYPES, ["--train_file", "t"])
    with pytest.raises(ConfigError, match="'per_device_train_batch_size' must be >= 1"):
        parse_config(TYPES, ["--config", path, "--per_device_train_batch_size", "0"])
    with pytest.raises(ConfigError, match="unknown scheduler 'cosin'"):
        parse_config(TYPES, ["--config", path, "--lr_scheduler_type", "cosin"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        parse_config(TYPES, ["--config", str(tmp_path / "nope.yaml")])


def test_bool_flags_and_negation():
    args = ["--output_dir", "o", "--train_file", "t"]
    _, _, cfg = parse_config(TYPES, [*args, "--gradient_checkpointing", "--no_deterministic"])
    assert cfg.gradient_checkpointing is True and cfg.deterministic is False


def test_saved_config_round_trips(tmp_path):
    objs = parse_config(TYPES, ["--output_dir", "o", "--train_file", "t", "--lr_groups", "mapper=0.5", "--layers", "5"])
    saved = save_config(tmp_path / "run" / "config.yaml", *objs)
    assert "lr_groups:\n  mapper: 0.5" in saved.read_text()
    assert parse_config(TYPES, ["--config", str(saved)]) == objs


def test_float_dict_parsing():
    assert FloatDict("a=1,b=2e-3") == {"a": 1.0, "b": 0.002}
    assert FloatDict('{"a": 1}') == {"a": 1.0}
    with pytest.raises(ValueError):
        FloatDict("a")


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED_KEYS.items()))
def test_old_key_names_are_errors_naming_the_transformers_name(tmp_path, old, new):
    assert new in TrainConfig.__dataclass_fields__
    path = _yaml(tmp_path, f"output_dir: o\ntrain_file: t\n{old}: 1\n")
    with pytest.raises(ConfigError, match=rf"'{old}' in config file .* is now '{new}'"):
        parse_config(TYPES, ["--config", path])
    with pytest.raises(ConfigError, match=rf"'{old}' in the command line is now '{new}'"):
        parse_config(TYPES, ["--output_dir", "o", "--train_file", "t", f"--{old}", "1"])


def test_nested_section_from_yaml_overrides_and_dotted_cli_keys(tmp_path):
    path = _yaml(tmp_path, "output_dir: o\ntrain_file: t\nmodel:\n  lm: {name_or_path: x, lora_r: 4}\n"
                           "  mapper: {kind: mlp, pool: 2}\n")
    *_, model = parse_config(TYPES, ["--config", path, "--model.mapper.kind", "perceiver", "--model.lm.lora_dropout",
                                     "0", "--model.system_prompt", "none"],
                             overrides={"model.lm.lora_r": 8, "max_steps": 3}, nested={"model": VLMConfig})
    assert isinstance(model, VLMConfig)
    assert (model.lm.name_or_path, model.lm.lora_r, model.lm.lora_dropout) == ("x", 8, 0.0)  # CLI > overrides > YAML
    assert (model.mapper.kind, model.mapper.pool, model.system_prompt) == ("perceiver", 2, None)
    assert parse_config(TYPES, ["--output_dir", "o", "--train_file", "t"], nested={"model": VLMConfig})[-1] is None
    bad = [
        (["--model.lm.lora_rank", "3"], r"unknown config key 'model.lm.lora_rank' in the command line.*'model.lm.lora_r'"),
        (["--model.lm.lora_r", "x"], r"'model.lm.lora_r' in the command line: 'x' is not a valid int"),
        (["--model.mapper", "mlp"], r"'model.mapper' in the command line is a section"),
    ]
    for argv, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_config(TYPES, ["--config", path, *argv], nested={"model": VLMConfig})
    with pytest.raises(ConfigError, match=r"the overrides: key 'model.lm.lora_r' must be int, got str"):
        parse_config(TYPES, ["--config", path], overrides={"model": {"lm": {"lora_r": "big"}}}, nested={"model": VLMConfig})


def test_saved_config_with_a_section_round_trips(tmp_path):
    objs = parse_config(TYPES, ["--output_dir", "o", "--train_file", "t", "--model.lm.name_or_path", "x"],
                        nested={"model": VLMConfig})
    saved = save_config(tmp_path / "config.yaml", *objs[:-1], sections={"model": objs[-1]})
    assert parse_config(TYPES, ["--config", str(saved)], nested={"model": VLMConfig}) == objs
