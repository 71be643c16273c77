"""What every front end (the Gradio app, the CLI, the API server) shares: model loading, generation settings, defaults.

The front ends import this module and never each other; ``launch_ui`` starts the web UI for the CLI's ``serve``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import vlm_chat

if TYPE_CHECKING:
    from vlm_chat.chat import VLMChat

logger = logging.getLogger(__name__)

#: Defaults shared by the command line and the web UI.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_TOP_P = 0.9
#: Gradio refuses larger uploads before they reach the model (the server answers 413).
DEFAULT_MAX_FILE_SIZE = "20mb"


class UsageError(Exception):
    """A problem with what the user asked for (bad flag value, missing model directory); printed without a traceback."""


def generation_kwargs(
    max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None
) -> dict[str, Any]:
    """Translate the user-facing generation settings into transformers ``generate`` keywords.

    Args:
        max_new_tokens: Upper bound on generated tokens; ``None`` keeps the library default.
        temperature: ``0`` (or ``None``) means greedy decoding, which is deterministic; above 0 samples.
        top_p: Nucleus-sampling mass, used only when sampling.

    Returns:
        Keywords for ``VLMChat.generate`` / ``stream`` / ``caption``.

    Raises:
        ValueError: a setting is out of range (the message names it).
    """
    kwargs: dict[str, Any] = {}
    if max_new_tokens is not None:
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        kwargs["max_new_tokens"] = int(max_new_tokens)
    if temperature is not None and not (temperature >= 0 and math.isfinite(temperature)):  # NaN fails both
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not temperature:
        # Passing temperature/top_p with do_sample=False only makes transformers warn; greedy ignores them.
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=float(temperature))
        if top_p is not None:
            kwargs["top_p"] = float(top_p)
    return kwargs


def resolve_model_dir(model: str | None) -> str:
    """Return the checkpoint directory to load, or raise a `UsageError` that tells the user what to pass.

    Args:
        model: The ``--model`` value; ``None`` means the shipped demo model.

    Returns:
        The directory path as a string.
    """
    path = Path(model) if model else Path(vlm_chat.DEMO_MODEL)
    if path.is_dir():
        return str(path)
    if model is None:
        raise UsageError(
            f"the demo model is not built yet (no directory {path}). Build it with `python train/quickstart.py`, "
            "or pass --model DIR with a checkpoint written by VLMChat.save_pretrained or a training run"
        )
    if path.exists():
        raise UsageError(f"--model {model}: not a directory; pass a checkpoint directory written by save_pretrained")
    raise UsageError(f"--model {model}: directory not found")


def load_model(model: str | None) -> VLMChat:
    """Load a checkpoint directory once (``None`` = the demo model), logging what was loaded."""
    from vlm_chat.chat import VLMChat

    path = resolve_model_dir(model)
    logger.info("loading model from %s", path)
    try:
        return VLMChat.from_pretrained(path)
    except (FileNotFoundError, ValueError) as e:
        # The library names the missing file or the incompatible field; say which --model it was.
        raise UsageError(f"cannot load model from {path}: {e}") from e


def launch_ui(model: str | None, **kwargs: Any) -> None:
    """Start the Gradio chat UI on ``model`` (``None`` = the demo model); keywords as :func:`vlm_chat.app.serve`."""
    from vlm_chat.app import serve

    serve(model, **kwargs)
