"""``report_to``: accelerate's trackers pass through (tensorboard by default); unknown or uninstalled ones are clear
ConfigErrors raised when the config is made, before a model is built."""

import json

import pytest
import torch
from accelerate.utils import LoggerType

from vlm_chat.training.args import ConfigError, TrainConfig, parse_config
from vlm_chat.training.engine import train


def _cfg(out, **kw):
    base = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=0.05,
                lr_scheduler_type="constant", save_steps=0, logging_steps=1, disable_tqdm=True)
    return TrainConfig(**{**base, **kw})


def _only_tensorboard_installed(monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])


def test_names_lists_none_and_all(tmp_path, monkeypatch):
    _only_tensorboard_installed(monkeypatch)
    assert _cfg(tmp_path).trackers() == ["tensorboard"]  # the default
    assert _cfg(tmp_path, report_to="none").trackers() == []
    assert _cfg(tmp_path, report_to=[]).trackers() == []
    assert _cfg(tmp_path, report_to="all").trackers() == ["tensorboard"]
    assert _cfg(tmp_path, report_to=["tensorboard"]).trackers() == ["tensorboard"]
    assert _cfg(tmp_path, report_to="TensorBoard, tensorboard").trackers() == ["tensorboard"]


@pytest.mark.parametrize(("name", "package"), [("wandb", "wandb"), ("mlflow", "mlflow"), ("trackio", "trackio"),
                                               ("comet_ml", "comet-ml")])
def test_a_missing_tracker_names_the_package_to_install(tmp_path, monkeypatch, name, package):
    _only_tensorboard_installed(monkeypatch)
    with pytest.raises(ConfigError, match=rf"tracker '{name}' needs the '{package}' package.*pip install {package}\)"):
        _cfg(tmp_path, report_to=f"tensorboard,{name}")


def test_an_unknown_tracker_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorbord'; valid: \['aim', 'clearml', .*'wandb'\]"):
        _cfg(tmp_path, report_to="tensorbord")


def test_command_line_and_yaml_values(tmp_path, monkeypatch):
    _only_tensorboard_installed(monkeypatch)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"output_dir: {tmp_path}\nreport_to: tensorboard, none\n")
    assert parse_config([TrainConfig], ["--config", str(yaml_file)])[0].trackers() == ["tensorboard"]
    assert parse_config([TrainConfig], ["--output_dir", "x"])[0].trackers() == ["tensorboard"]  # the default
    assert parse_config([TrainConfig], ["--config", str(yaml_file), "--report_to", "none"])[0].trackers() == []
    with pytest.raises(ConfigError, match=r"pip install wandb"):
        parse_config([TrainConfig], ["--config", str(yaml_file), "--report_to", "wandb"])


def test_tensorboard_receives_the_logged_losses(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    data = [(torch.randn(3), torch.randn(1)) for _ in range(12)]

    def collate(rows):
        return {"x": torch.stack([r[0] for r in rows]), "y": torch.stack([r[1] for r in rows])}

    def loss_fn(m, batch):
        return ((m(batch["x"]) - batch["y"]) ** 2).mean(), {}

    train(model, data, collate, loss_fn, _cfg(tmp_path, report_to=["tensorboard"]))
    logged = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(tmp_path / "logs" / "train"))  # the run's scalars (hparams go to a subfolder)
    acc.Reload()
    tag = next(t for t in acc.Tags()["scalars"] if t.endswith("loss"))
    scalars = acc.Scalars(tag)
    assert [s.step for s in scalars] == [row["step"] for row in logged] == [1, 2, 3]
    assert [s.value for s in scalars] == pytest.approx([row["loss"] for row in logged], rel=1e-6)
