"""A failure on one process stops every process, with its message.

A section that every process runs (its part of a checkpoint) or that the main process runs while the others
wait (the final pipeline, the evaluation setup) can fail on one process only: a full disk under one rank's
files, a bad file read by the main process only. Left alone, that process exits and the others block at the
next collective until the process group's timeout (30 minutes by default) or until the launcher kills them,
and the message is printed, if at all, by a process that does not report to the user.

``with all_or_none(accelerator, "writing checkpoint-4"):`` runs the section, catches an exception locally and
then agrees on the outcome with one small collective (a flag gathered from every process; only after a
failure the messages too). If any process failed, every process raises the same :class:`RankFailedError`,
naming the first failed rank, its host and its message, chained to the local exception where there is one;
``main`` prints it once per machine and exits with status 1. The call replaces a barrier (its cost in a run
that does not fail). With one process the exception is raised unchanged.

Not covered: a failure inside a section whose own collectives the other processes are already waiting in
(FSDP's and DeepSpeed's sharded ``save_state``); a process that dies without an exception (SIGKILL, OOM).
"""

from __future__ import annotations

import contextlib
import logging
import socket

import torch
from accelerate.utils import gather_object

__all__ = ["RankFailedError", "agree", "all_or_none"]

logger = logging.getLogger("ddpm_plus.train")


class RankFailedError(RuntimeError):
    """``what`` failed on one or more processes; raised on every process alike. ``failures`` is a list of
    (rank, host, message), lowest rank first; ``rank`` is the first of them."""

    def __init__(self, what: str, failures: list[tuple[int, str, str]], num_processes: int):
        self.what, self.failures, self.num_processes = what, failures, num_processes
        self.rank, host, message = failures[0]
        others = [str(rank) for rank, _, _ in failures[1:]]
        also = f" (also on rank{'s' if len(others) > 1 else ''} {', '.join(others)})" if others else ""
        super().__init__(f"{what} failed on rank {self.rank} of {num_processes} (host {host}){also}: {message}")

    def __reduce__(self):  # picklable, like the other errors a process may send
        return type(self), (self.what, self.failures, self.num_processes)


def agree(accelerator, what: str, error: BaseException | None, quiet: tuple[type, ...] = ()) -> None:
    """Collective: return if no process failed, else raise :class:`RankFailedError` on every process.

    ``error`` is this process's exception (None if it succeeded). An error of a ``quiet`` type is reported
    by its message (it already says what to do); any other is reported as ``Type: message`` and its
    traceback is logged on the process where it happened."""
    failed = torch.tensor([0 if error is None else 1], device=accelerator.device)
    if not int(accelerator.gather(failed).sum().item()):
        return
    message = None
    if error is not None:
        message = str(error) if isinstance(error, quiet) and str(error) else f"{type(error).__name__}: {error}"
        if not isinstance(error, quiet):
            logger.error("%s failed on rank %d", what, accelerator.process_index, exc_info=error)
    reports = gather_object([(accelerator.process_index, socket.gethostname(), message)])
    failures = sorted(report for report in reports if report[2] is not None)
    raise RankFailedError(what, failures, accelerator.num_processes) from error


@contextlib.contextmanager
def all_or_none(accelerator, what: str, quiet: tuple[type, ...] = ()):
    """Run the ``with`` block on this process, then :func:`agree` with the others (see the module's text).
    Every process must enter it, including those with nothing to do in the block."""
    if accelerator.num_processes == 1:
        yield
        return
    try:
        yield
    except Exception as e:
        agree(accelerator, what, e, quiet)
        raise  # not reached: agree raises when this process failed
    agree(accelerator, what, None, quiet)
