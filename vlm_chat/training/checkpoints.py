"""The engine's checkpoints on disk: layout, completeness, what they hold, and the step log.

Layout of ``output_dir``::

    checkpoints/step-N/trainer_state.json   engine position (written last: marks the checkpoint complete)
    checkpoints/step-N/accelerate/          accelerate state: trainable weights, optimizer, scheduler, RNG
    checkpoints/step-N/model/               whatever the stage's ``on_save(dir)`` writes (e.g. save_pretrained)
    final/                                  ``on_save`` output after the last step (atomic as well)
    train_log.jsonl                         one JSON line per optimizer step (loss, lr, metrics)
    logs/                                   TensorBoard event files

Only *trainable* parameters (and buffers) are stored in ``accelerate/``: frozen weights (a vision tower, an LLM under
LoRA) are rebuilt by the stage from their source, so a checkpoint costs the size of what is trained. On resume the
stored keys are checked against the model's trainable parameters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["LOG_FILE", "STATE_FILE", "check_signature", "find_latest_checkpoint", "rows_fingerprint"]

STATE_FILE = "trainer_state.json"
LOG_FILE = "train_log.jsonl"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def complete_checkpoints(checkpoint_root: Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every checkpoint under ``checkpoint_root`` whose state file exists, oldest first."""
    if not checkpoint_root.is_dir():
        return []
    found = []
    for child in checkpoint_root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint ``output_dir/checkpoints/step-N`` (with its state file), or ``None``."""
    found = complete_checkpoints(Path(output_dir) / "checkpoints")
    return found[-1][1] if found else None


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """``resume_from_checkpoint`` as a checkpoint directory: a path, or ``latest`` (None when there is none yet)."""
    if resume is None:
        return None
    if resume == "latest":
        latest = find_latest_checkpoint(output_dir)
        if latest is None:
            logger.warning("resume='latest' but %s has no complete checkpoint; starting from scratch", output_dir)
        return latest
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint: {resume} is not a complete checkpoint (no {STATE_FILE}); "
            f"checkpoints look like {output_dir / 'checkpoints' / 'step-N'}, or pass 'latest'"
        )
    return path


def rows_fingerprint(rows: Iterable[Any]) -> str:
    """A digest of the training rows as the stage read them (paths, texts, ids), for the resume check.

    Image *files* are not read: a checkpoint resumed over other rows is refused, the same rows over edited images are
    not detected.
    """
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=_stable_text).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def _stable_text(value: Any) -> str:
    """JSON fallback for encoded images (bytes) and the like: their content, never an object address."""
    if isinstance(value, (bytes, bytearray)):
        return hashlib.sha256(value).hexdigest()
    if hasattr(value, "tobytes"):  # a decoded image or an array
        return hashlib.sha256(value.tobytes()).hexdigest()
    return str(value)


def check_signature(resume_dir: Path, state: Mapping[str, Any], signature: Mapping[str, Any]) -> None:
    """Refuse to resume when what fixes the data order (seed, batch layout, process count, the rows) changed.

    Raises:
        ConfigError: naming each key that differs, with the checkpoint's value and the current one.
    """
    from vlm_chat.training.train_config import ConfigError

    # A checkpoint written before fingerprints existed has none: its rows are checked by count only.
    changed = {k: (state.get(k), v) for k, v in signature.items()
               if state.get(k) != v and not (k == "dataset_fingerprint" and k not in state)}
    if changed:
        details = ", ".join(f"{k}: checkpoint {old} vs now {new}" for k, (old, new) in changed.items())
        raise ConfigError(f"cannot resume exactly from {resume_dir}: the data order would differ ({details})")


def _trainable_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys worth saving: trainable parameters and (persistent) buffers."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in model.named_buffers()}
    return keep


def only_trainable(models, weights, output_dir) -> None:
    """accelerate save hook: drop frozen weights from the state dicts about to be written."""
    for model, state in zip(models, weights):
        keep = _trainable_keys(model)
        for key in [k for k in state if k not in keep]:
            del state[key]


def check_saved_weights(model: torch.nn.Module, state_dir: Path) -> None:
    """Refuse a checkpoint whose weights do not cover the model's trainable parameters (or name unknown keys)."""
    from safetensors import safe_open

    path = state_dir / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint is missing {path}")
    with safe_open(str(path), framework="pt") as fh:
        saved = set(fh.keys())
    state = model.state_dict(keep_vars=True)
    unexpected = sorted(saved - set(state))
    saved_ids = {id(state[k]) for k in saved if k in state}
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and id(p) not in saved_ids)
    if unexpected or missing:
        raise ValueError(
            f"checkpoint {state_dir.parent} does not match the model: missing trainable {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            " (was it written by a run with other trainable parameters?)"
        )


def truncate_log(path: Path, step: int) -> None:
    """Keep only log lines up to ``step`` so a resumed run's log equals an uninterrupted one."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
