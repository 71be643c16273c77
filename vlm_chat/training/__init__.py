"""Training: the stages as data, a compact accelerate engine, typed configs, and the stage-0 contrastive trainer.

The Python API::

    from vlm_chat.training import load_stage_config, run_stage

    config = load_stage_config("instruct", "my_instruct.yaml", {"max_steps": 100})   # a StageConfig dataclass
    result = run_stage(config)                                                         # a TrainResult

and for stage 0 ``load_contrastive_config`` / ``run_contrastive``. ``train/*.py`` are the command-line form.
Names load lazily so ``import vlm_chat.training`` stays cheap (accelerate/transformers import on use).
"""

import importlib

_EXPORTS = {
    "TrainConfig": "vlm_chat.training.train_config",
    "CaptionDataArgs": "vlm_chat.training.train_config",
    "ConfigError": "vlm_chat.training.train_config",
    "RENAMED_KEYS": "vlm_chat.training.args",
    "parse_config": "vlm_chat.training.args",
    "save_config": "vlm_chat.training.args",
    "train": "vlm_chat.training.engine",
    "TrainResult": "vlm_chat.training.outcome",
    "NonFiniteLossError": "vlm_chat.training.outcome",
    "TrainingInterrupted": "vlm_chat.training.outcome",
    "atomic_directory": "vlm_chat.atomic",
    "find_latest_checkpoint": "vlm_chat.training.checkpoints",
    "STAGES": "vlm_chat.training.stages",
    "Stage": "vlm_chat.training.stages",
    "StageConfig": "vlm_chat.training.stages",
    "DataArgs": "vlm_chat.training.stages",
    "StageArgs": "vlm_chat.training.stages",
    "load_stage_config": "vlm_chat.training.stages",
    "run_stage": "vlm_chat.training.stages",
    "ContrastiveConfig": "vlm_chat.training.contrastive",
    "ContrastiveResult": "vlm_chat.training.contrastive",
    "load_contrastive_config": "vlm_chat.training.contrastive",
    "run_contrastive": "vlm_chat.training.contrastive",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlm_chat.training' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
