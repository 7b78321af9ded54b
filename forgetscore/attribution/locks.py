"""Jobs that share a cache take turns at each stage.

Two jobs started together on one training set (two queries, say) would otherwise prepare it,
compute its Fisher or sweep the same losses in one folder at the same time: one job's tidying
would delete the other's files in the middle of their writes, two running sums would fold the
same chunks, and the first job to finish would delete chunks the other still needs. Each such
stage runs under an exclusive lock named for what it computes. A job that finds the lock held
waits, then finds the result made (or the finished chunks to resume from). Under torchrun, rank 0
holds the lock for its job while the other ranks wait with it. Where ``fcntl`` is missing
(Windows), or the cache's filesystem takes no locks (a warning says so), nothing is locked, and
one job at a time may use a cache.
"""
from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from .ranks import barrier, on_rank0

try:
    import fcntl
except ImportError:
    fcntl = None

# The stages this thread holds, with how deep: a stage entered again from within itself goes on at once. Per
# thread: another thread of the process takes its turn as another process does (flock() tells two open files
# apart, whichever process opened them).
_HELD = threading.local()

# Seconds between two tries at a stage another job holds. Each try is one collective under torchrun, so a
# wait of any length never runs into the process group's timeout.
POLL_S = 1.0


def _held() -> dict[str, int]:
    if not hasattr(_HELD, "stages"):
        _HELD.stages = {}
    return _HELD.stages


class Unlockable(Exception):
    """The filesystem of a lock file takes no locks (e.g. Lustre without its flock option, NFS without a lock
    daemon)."""


# What flock() says on a filesystem without locks.
_NO_LOCKS = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}
_said_unlockable: set[str] = set()


def _acquire(path: Path, wait: bool) -> int | None:
    """A descriptor that holds `path` exclusively; None if another process holds it and not `wait`.

    Raises :class:`Unlockable` where the filesystem takes no locks.
    """
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_LOCKS:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise Unlockable(str(exc)) from None
            raise
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        # The holder we waited for removed this file on release; whoever holds the path's new file goes first.
        os.close(fd)


def _release(path: Path, fd: int) -> None:
    # Removed while still held, so that lock files do not pile up in the cache; a process waiting on
    # this file sees it gone once it gets it, and locks the path afresh.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)


@contextlib.contextmanager
def stage_lock(path: Path, doing: str, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """This job's turn at the stage that `path` (a lock file) names, for the `with`; waits for another job's.

    Every rank of a job enters it together; rank 0 holds the lock. `doing` says in the waiting message
    what the other job is doing ("computing the Fisher").
    """
    key, stages = os.path.abspath(path), _held()
    if key in stages:
        stages[key] += 1
        try:
            yield
        finally:
            stages[key] -= 1
        return
    held: list[int] = []

    def take() -> bool:
        """One try (rank 0): whether this job may go on."""
        try:
            fd = _acquire(path, wait=False)
        except Unlockable as exc:  # as on Windows: unguarded, and said once per folder
            if str(path.parent) not in _said_unlockable:
                _said_unlockable.add(str(path.parent))
                warnings.warn(f"cache: {str(path.parent)!r} is on a filesystem without file locks ({exc}); jobs "
                              "sharing this cache must not run at the same time", stacklevel=5)
            return True
        if fd is not None:
            held.append(fd)
        return fd is not None

    # Every rank learns each try's outcome (a failure on rank 0 raises on every rank).
    if fcntl is not None and not on_rank0(take):
        if log is not None:
            log(f"waiting for another job {doing} in {str(path.parent)!r}")
        while not on_rank0(take):
            time.sleep(POLL_S)
    stages[key] = 1
    try:
        yield
        barrier()  # every rank is done with the stage's files before another job may take them (or delete them)
    finally:
        del stages[key]
        if held:
            _release(path, held[0])


@contextlib.contextmanager
def unless_busy(path: Path) -> Iterator[bool]:
    """Whether no job holds the stage `path` names, holding it for the `with` if so (one process; no waiting).

    For tidying: what another job is working on is left to that job. A stage this thread is in is free.
    """
    if fcntl is None or os.path.abspath(path) in _held():
        yield True
        return
    try:
        fd = _acquire(path, wait=False)
    except Unlockable:
        yield True
        return
    try:
        yield fd is not None
    finally:
        if fd is not None:
            _release(path, fd)
