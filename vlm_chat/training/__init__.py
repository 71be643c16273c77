"""Training: a compact accelerate engine, typed configs, and the stage-0 contrastive trainer.

Names load lazily so ``import vlm_chat.training`` stays cheap (accelerate/transformers import on use).
"""

import importlib

_EXPORTS = {
    "TrainConfig": "vlm_chat.training.args",
    "CaptionDataArgs": "vlm_chat.training.args",
    "ConfigError": "vlm_chat.training.args",
    "parse_config": "vlm_chat.training.args",
    "save_config": "vlm_chat.training.args",
    "train": "vlm_chat.training.engine",
    "NonFiniteLossError": "vlm_chat.training.engine",
    "atomic_directory": "vlm_chat.training.engine",
    "find_latest_checkpoint": "vlm_chat.training.engine",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlm_chat.training' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
