"""Stopping a training run on SIGTERM (Slurm, Kubernetes, spot instances) or SIGINT (Ctrl-C).

The first signal only sets a flag: the trainer finishes the current optimizer step, writes a complete
checkpoint (atomically, as always), logs where it is and how to resume, and exits with status 128 + the
signal number (143 for SIGTERM, 130 for SIGINT). A second signal exits at once with the same status: a
checkpoint being written then is left as a ``.tmp-checkpoint-N`` directory that ``latest`` never picks
(the directory renames that must not be cut are finished first, see
:func:`ddpm_plus.trainer.checkpointing.critical_section`), so the last complete checkpoint stays the one to resume.

With several processes the flag is combined across them at every optimizer step (one tiny all-reduce), so
all stop at the same step whichever of them got the signal.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import torch

from . import checkpointing as ckpt
from . import run_lock

__all__ = ["GracefulStop", "TrainingInterrupted"]

logger = logging.getLogger("ddpm_plus.train")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after saving ``checkpoint`` at ``step``; ``exit_code`` = 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} after optimizer step {step}; saved checkpoint {checkpoint}. "
            "Resume with the same command plus --resume_from_checkpoint latest (same flags, data and number of "
            "processes): it continues exactly where this run stopped."
        )


class GracefulStop:
    """Signal handlers for the duration of a run (installed only in the main thread; restored after)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def install(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            logger.warning(
                "received %s: finishing the current optimizer step, then saving a checkpoint and exiting "
                "(send it again to exit at once, keeping the last complete checkpoint)",
                name,
            )
            return
        print(
            f"received {name} again: exiting now (status {128 + signum}); a checkpoint being written is left "
            "incomplete and ignored, resume from the last complete one with --resume_from_checkpoint latest",
            file=sys.stderr,
            flush=True,
        )

        def leave():
            run_lock.release_all()
            os._exit(128 + signum)

        ckpt.when_safe(leave)

    def requested(self, accelerator) -> int | None:
        """The signal to stop for (the same on every process), or None. A collective when distributed."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], device=accelerator.device)
        signum = int(accelerator.gather(flag).max().item())
        return signum or None
