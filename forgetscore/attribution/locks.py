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

Besides its stages, a job holds the whole cache folder, shared with other jobs, for as long as it uses it
(:func:`hold_folder`), so that `forgetscore cache --remove-stale` never deletes a folder under a running
job; and it claims the folder its results go to (:func:`claim_folder`), so that a second job writing
there is refused as it starts.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
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


def _folder_gone(folder: Path) -> None:
    """After making `folder` (or a file in it) failed: go on if it went meanwhile (removed by another job, which
    renames it away first) or is there by now; raise if a file stands in its place."""
    if os.path.lexists(folder) and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{str(folder)!r} is a file, not a folder; move it away")


def _acquire(path: Path, wait: bool, shared: bool = False) -> int | None:
    """A descriptor that holds `path` exclusively (or `shared`); None if another process holds it and not `wait`.

    Raises :class:`Unlockable` where the filesystem takes no locks.
    """
    for tries in itertools.count(1):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except (FileNotFoundError, FileExistsError) as exc:
            _folder_gone(path.parent)
            if tries == 1000:  # no removal takes that long: a link to a missing place stands at `path`, say
                raise OSError(exc.errno, f"cannot make the lock file {str(path)!r} ({exc.strerror}); move away "
                                         "what stands there") from None
            continue
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
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


def _unlink_own(path: Path, fd: int) -> None:
    """Remove `path` if it is still the file `fd` holds: once its folder was removed (renamed away) under the lock,
    the path may name a new job's own lock file by now."""
    with contextlib.suppress(FileNotFoundError):
        mine, there = os.fstat(fd), os.stat(path)
        if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
            os.unlink(path)


def _release(path: Path, fd: int) -> None:
    # Removed while still held, so that lock files do not pile up in the cache; a process waiting on
    # this file sees it gone once it gets it, and locks the path afresh.
    _unlink_own(path, fd)
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


# In a cache folder: every job that uses the folder holds this file shared for as long as it runs, so that
# `forgetscore cache --remove-stale`, which takes it exclusively, never deletes a folder under a running job
# (between its locked stages too: its unlearning step holds no stage lock).
JOB_LOCK = ".jobs.lock"


def hold_folder(folder: Path) -> int | None:
    """A descriptor holding `folder`'s :data:`JOB_LOCK` shared (made, with the folder, if missing); None where
    nothing can be locked. A removal in progress is waited for, and the folder is then made again."""
    if fcntl is None:
        return None
    try:
        return _acquire(Path(folder) / JOB_LOCK, wait=True, shared=True)
    except Unlockable:  # the stages say so in a warning, once per folder
        return None


def let_go_of_folder(folder: Path, fd: int | None, remove_empty: bool = False) -> None:
    """Release :func:`hold_folder`'s hold. The last job to let go removes the lock file, and with `remove_empty`
    the folder too when nothing else is in it (a preparation that failed before it wrote anything)."""
    if fd is None:
        return
    path = Path(folder) / JOB_LOCK
    try:
        # Only a job that can hold it alone is the last: the others leave the file to it.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return
    _unlink_own(path, fd)
    if remove_empty:
        with contextlib.suppress(OSError):  # not empty: what the stages made
            os.rmdir(folder)
    os.close(fd)


CLAIM = ".forgetscore-claim.lock"  # in an output folder: held by the job that will write into it


@contextlib.contextmanager
def claim_folder(folder: Path, argument: str) -> Iterator[None]:
    """This process's exclusive claim on output folder `folder` for the `with` (the folder is made if missing, and
    removed again at the end if it is still empty). Another job's claim is refused at once with a ValueError naming
    `argument` and that job, rather than found only when its results are saved, hours later."""
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # removed at the end if left empty
    path = folder / CLAIM
    fd = None
    try:
        if fcntl is not None:
            try:
                fd = _acquire(path, wait=False)
            except Unlockable:  # unguarded there, as the stages are
                pass
            else:
                if fd is None:
                    try:
                        holder = path.read_text().strip()
                    except OSError:
                        holder = ""
                    raise ValueError(f"{argument}: {str(folder)!r} is claimed by another job that will write its "
                                     f"results there ({holder or 'its process'}); wait for it to end, or give another "
                                     f"{argument}")
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
                # A job writing one folder per query claims their parent: a folder of its is not free either.
                above = folder.parent / CLAIM
                if above.is_file():
                    with unless_busy(above) as free:
                        if not free:
                            raise ValueError(f"{argument}: {str(folder)!r} is in {str(folder.parent)!r}, which "
                                             "another job claims to write its results there; wait for it to end, "
                                             f"or give another {argument}")
        yield
    finally:
        if fd is not None:
            _release(path, fd)
        for p in made:
            with contextlib.suppress(OSError):  # not empty: the results, or the user's files
                p.rmdir()
