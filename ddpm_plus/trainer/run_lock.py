"""One training run per ``output_dir``: a lock file naming the process that holds the directory.

``output_dir/.ddpm_plus-run.lock`` holds JSON ``{"pid", "host", "started", "argv"}`` and is held with an
exclusive ``flock`` for the lifetime of the run; it is removed on exit (normal end, error, SIGTERM/SIGINT;
at interpreter exit at the latest). A second run on the same directory is refused with an error naming
the directory and the holder. A lock left behind by a process that is gone (killed with SIGKILL, a
crashed machine) is taken over:

- same host: when its pid no longer exists (and the ``flock`` is free);
- another host: never automatically (its pid cannot be checked from here); the error says so and names
  the file to delete once that run is known to be gone.

Only the main process of a distributed run takes the lock (see ``ddpm_plus.trainer.components.prepare``).
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: the pid/host check alone
    fcntl = None

from ..redaction import argv_without_secrets

__all__ = ["LOCK_NAME", "OutputDirLockedError", "RunLock", "acquire", "release", "release_all"]

LOCK_NAME = ".ddpm_plus-run.lock"


class OutputDirLockedError(RuntimeError):
    """Another run holds ``output_dir`` (or its lock file cannot be created)."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = (
        time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else ""
    )
    return f"pid {holder.get('pid')} on host {holder.get('host')!r}{when}"


class RunLock:
    """The lock of one ``output_dir``; :meth:`acquire` raises :class:`OutputDirLockedError` if it is held."""

    def __init__(self, output_dir):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self._fd: int | None = None
        self.took_over: dict | None = None  # the stale holder replaced, if any

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        for _ in range(20):  # retried only when the file is replaced under us
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OutputDirLockedError(
                    f"cannot create the run lock {self.path}: {e.strerror or e}. output_dir {self.output_dir} must "
                    "be a writable directory (training writes checkpoints and the pipeline there)."
                ) from e
            flocked = False
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    flocked = True
                except OSError as e:
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        os.close(fd)
                        raise self._held_error(self._read()) from None
                    # ENOLCK/ENOSYS/EINVAL: a filesystem without flock; the pid/host check alone
                # The file may have been removed (and recreated) by its previous holder while we waited.
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
            holder = self._read()
            mine = holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()
            if holder and not mine:
                if not self._stale(holder, flocked):
                    os.close(fd)
                    raise self._held_error(holder)
                self.took_over = holder
            try:
                os.ftruncate(fd, 0)
                payload = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.time(),
                    "argv": argv_without_secrets(sys.argv),
                }
                os.write(fd, json.dumps(payload).encode())
                os.fsync(fd)
            except OSError as e:
                os.close(fd)
                raise OutputDirLockedError(
                    f"cannot write the run lock {self.path}: {e.strerror or e} (is {self.output_dir} full or read-only?)"
                ) from e
            self._fd = fd
            return self
        raise OutputDirLockedError(f"could not take the run lock {self.path}: it keeps being replaced")

    def _stale(self, holder: dict, flocked: bool) -> bool:
        """True when the holder is known to be gone: on this host, its flock is free (it died: the kernel
        released it) or its pid does not exist. A holder on another host is never presumed gone."""
        if holder.get("host") != socket.gethostname():
            return False
        pid = holder.get("pid")
        return flocked or not (isinstance(pid, int) and _pid_alive(pid))

    def _held_error(self, holder: dict) -> OutputDirLockedError:
        who = _describe(holder) if holder else "another process"
        other_host = holder and holder.get("host") != socket.gethostname()
        hint = (
            f"If that run is gone (its machine was shut down or the job killed), delete {self.path} and start again."
            if other_host
            else "Wait for it to finish, stop it (it saves a checkpoint on SIGTERM), or use another --output_dir."
        )
        return OutputDirLockedError(f"output_dir {self.output_dir} is in use by another training run ({who}). {hint}")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._read().get("pid") == os.getpid():
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the flock

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


_HELD: dict[Path, RunLock] = {}


def acquire(output_dir) -> RunLock:
    """Take the lock of ``output_dir`` for this process (released by :func:`release` or at exit)."""
    key = Path(output_dir).resolve()
    if key in _HELD:
        raise OutputDirLockedError(f"output_dir {output_dir} is already in use by a training run in this process")
    lock = RunLock(output_dir).acquire()
    _HELD[key] = lock
    return lock


def release(output_dir) -> None:
    """Release the lock of ``output_dir`` if this process holds it."""
    lock = _HELD.pop(Path(output_dir).resolve(), None)
    if lock is not None:
        lock.release()


@atexit.register
def release_all() -> None:
    """Release every lock this process holds."""
    for key in list(_HELD):
        _HELD.pop(key).release()
