"""Directories that appear whole or not at all: checkpoints, run outputs, saved models.

At every instant the target path holds either the complete old version or the complete new one. Used by the training
engine for checkpoints and by ``VLMChat.save_pretrained``.
"""

import ctypes
import errno
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["atomic_directory", "publish", "recover"]


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every directory (so renames and new entries are durable)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no glibc >= 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this filesystem cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def recover(final: Path) -> None:
    """Undo a crash between the two renames of the fallback swap: bring the moved-aside previous version back."""
    if final.exists():
        return
    aside = sorted(final.parent.glob(f".old-{final.name}-*"), key=lambda p: p.stat().st_mtime)
    if aside:
        logger.warning("restoring %s from %s (a previous save was interrupted)", final, aside[-1].name)
        os.replace(aside[-1], final)


def publish(tmp: Path, final: Path) -> None:
    """Make the complete ``tmp`` directory (same parent) appear as ``final``, replacing any old one.

    Args:
        tmp: a fully written directory next to ``final`` (same filesystem).
        final: the name it should appear under.

    At every instant ``final`` is either the complete old version or the complete new one: a new name is one
    ``os.replace``; an existing directory is swapped with ``renameat2(RENAME_EXCHANGE)`` where the OS has it.
    Elsewhere the old directory is first moved aside under a unique name; if the process dies before the
    new one is in place, :func:`recover` restores the old one at the next save.
    """
    _fsync_tree(tmp)
    recover(final)
    if not final.exists():
        os.replace(tmp, final)
    elif _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous version
    else:
        aside = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:12]}")
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(final.parent)
    # Leftovers of earlier interrupted saves of this directory (the new version is safely in place now).
    for stale in [*final.parent.glob(f".old-{final.name}-*"), *final.parent.glob(f".tmp-{final.name}-*")]:
        shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Write a directory atomically: fill the yielded temporary directory; it becomes ``final`` on success.

    The temporary directory lives next to ``final`` (same filesystem, so the rename is atomic); every file
    is fsynced before it is published (see :func:`publish`). If the block raises, or the process dies,
    ``final`` keeps its previous content (or stays absent); leftovers are cleaned by the next save.

    Args:
        final: the directory to create or replace.

    Yields:
        The temporary directory to write into.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

