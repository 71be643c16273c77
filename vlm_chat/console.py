"""Logging for the command-line entry points (``vlm-chat``, ``python app.py``, ``train/*.py``, the quickstart).

On a terminal, libraries keep their warnings and progress bars. When stderr is a file or a pipe (a CI log, ``nohup``,
``2> log``), a progress bar is only carriage-return redraws that bury the log's real lines, so libraries are
told to keep quiet: transformers, huggingface_hub and datasets draw no bars, other libraries' log records below
ERROR are dropped, Python warnings too, and tqdm bars created with tqdm's own "decide by the terminal" default stay off. Our own ``logging``
lines are kept either way.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["LOG_FORMAT", "quiet_libraries", "setup_logging", "stderr_is_terminal"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal (where progress bars and library warnings are useful)."""
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def quiet_libraries() -> None:
    """Turn off library progress bars and warnings for this process and the processes it starts."""
    # datasets and tqdm read these when a bar is made or the library imported (datasets is imported late, by the
    # data readers); they only switch bars off, so a child process inheriting them is what we want too.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm >= 4.66: the default of every bar not told otherwise
    warnings.filterwarnings("ignore")
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


class _OwnOrErrors(logging.Filter):
    """Pass our own records (``vlm_chat``, ``__main__``) and other libraries' errors; drop their info and warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name in ("__main__", "vlm_chat") or record.name.startswith(("vlm_chat.", "__main__."))
        return own or record.levelno >= logging.ERROR


def setup_logging(level: int = logging.INFO, verbose: bool = False) -> bool:
    """Configure logging for a command-line run; quiet the libraries unless stderr is a terminal or ``verbose``.

    Args:
        level: Level of the root logger (our own progress lines: ``INFO``).
        verbose: Keep library warnings and bars even when stderr is not a terminal.

    Returns:
        Whether the libraries were quieted.
    """
    logging.basicConfig(level=level, format=LOG_FORMAT)
    if verbose or stderr_is_terminal():
        return False
    quiet_libraries()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _OwnOrErrors) for f in handler.filters):
            handler.addFilter(_OwnOrErrors())
    return True
