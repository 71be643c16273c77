"""How a training run ends: its :class:`TrainResult`, or one of the two ways it stops early.

* :class:`NonFiniteLossError`: the loss or the gradient norm became NaN/inf; raised before the weights change.
* :class:`TrainingInterrupted`: SIGTERM or SIGINT (a scheduler's preemption, ``kill``, Ctrl-C). :class:`StopOnSignal`
  turns the first signal into a request that the engine honours at the next optimizer-step boundary: it finishes
  the step, writes a checkpoint (atomically, like every checkpoint) and raises :class:`TrainingInterrupted`, a
  ``SystemExit`` whose code is the shell's convention for death by that signal (128 + signal number: 143 for SIGTERM,
  130 for SIGINT), so a command-line run exits with it and no traceback. A second signal does not wait: the previous
  handler comes back and the signal is delivered again (SIGTERM kills, SIGINT raises ``KeyboardInterrupt``); the
  last complete checkpoint stays on disk either way.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "StopOnSignal", "TrainResult", "TrainingInterrupted"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the run stopped before updating the weights."""


class TrainingInterrupted(SystemExit):
    """A stop signal arrived; the run finished its optimizer step, saved a checkpoint and stopped.

    Attributes:
        signum: the signal (``signal.SIGTERM`` or ``signal.SIGINT``).
        step: the optimizer steps done (the checkpoint's step).
        checkpoint: the checkpoint written at ``step``; ``resume_from_checkpoint: latest`` continues from it.
        code: the process exit status, 128 + ``signum``.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        super().__init__(128 + int(signum))
        self.signum, self.step, self.checkpoint = int(signum), step, checkpoint

    def __str__(self) -> str:
        return (f"stopped by {signal.Signals(self.signum).name} after step {self.step}; checkpoint {self.checkpoint}; "
                "continue with resume_from_checkpoint: latest")


class StopOnSignal:
    """While active, the first SIGTERM/SIGINT sets :attr:`received` (the loop stops at the next step boundary); a
    second one restores the previous handlers and re-delivers the signal (abort now).

    Handlers can only be installed from the main thread; elsewhere (a run started from a worker thread) signals keep
    their usual effect, and :attr:`installed` is False.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self.installed = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            # A signal the process was told to ignore (SIGINT of a background job, `nohup`) stays ignored.
            wanted = [s for s in self.signals if signal.getsignal(s) is not signal.SIG_IGN]
            self._previous = {s: signal.signal(s, self._handle) for s in wanted}
            self.installed = bool(wanted)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous, self.installed = {}, False

    @staticmethod
    def ignore_in_worker(worker_id: int) -> None:
        """DataLoader ``worker_init_fn``: a worker ignores the stop signals, so a signal sent to the whole process
        group (Ctrl-C, a scheduler) reaches the training loop without killing the batch it waits for."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            logger.warning("received %s: finishing the current optimizer step, then saving a checkpoint and "
                           "stopping (send it again to abort without saving)", name)
            return
        logger.warning("received %s again: aborting; the last complete checkpoint stays on disk", name)
        self._restore()
        signal.raise_signal(signum)


@dataclass
class TrainResult:
    """What :func:`vlm_chat.training.engine.train` returns.

    Attributes:
        global_step: optimizer steps done (this call and any resumed run before it).
        max_steps: the run's total.
        history: one record per step run in this call (``step``, ``epoch``, ``loss``, ``lr/<group>``, metrics).
        last_checkpoint: the newest checkpoint (``output_dir/checkpoints/step-N``).
        final_dir: ``output_dir/final`` (``on_save``'s output), or None without ``on_save``.
        resumed_from: the checkpoint this call resumed from, or None.
        output_dir: the run directory.
    """

    global_step: int
    max_steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    last_checkpoint: Path | None = None
    final_dir: Path | None = None
    resumed_from: Path | None = None
    output_dir: Path | None = None
