"""Writing files so that nothing half-written is ever left on disk."""
from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


@functools.cache
def _umask() -> int:
    """The process's umask, read without changing it where the system allows (threads write files too)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _write_atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); the result gets the permissions of any file the user creates
        # (where the filesystem keeps permissions at all).
        try:
            os.chmod(tmp, 0o666 & ~_umask())
        except OSError:
            pass
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise _naming(exc, path) from None
        raise


# A full disk, a quota, a file-size limit: the same advice for each.
_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up", errno.EFBIG: "a file size limit"}


def _naming(exc: OSError, path: Path) -> OSError:
    """`exc` as an OSError that names the file it failed to write (NumPy's short-write error names none and has no
    errno: a nearly full disk is its usual cause, said so when the disk has next to no room left)."""
    code = exc.errno
    if code is None:
        try:
            if shutil.disk_usage(path.parent).free < 2 ** 20:
                code = errno.ENOSPC
        except OSError:
            pass
    why = _FULL.get(code)
    message = f"cannot write {str(path)!r}: {exc.strerror or exc}"
    if why:
        message += (f" ({why}); free space, or give that folder another place (--cache / FORGETSCORE_CACHE, --out); "
                    "a rerun resumes from the finished stages")
    return OSError(code, message) if code is not None else OSError(message)  # no "[Errno None]" prefix


def write_bytes(path: Path, data: bytes) -> None:
    _write_atomic(path, lambda f: f.write(data))


def write_json(path: Path, obj: object) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_npy(path: Path, array: np.ndarray) -> None:
    # Streamed into the file: no copy of the array in memory (a prepared shard can be gigabytes).
    _write_atomic(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def write_npy_rows(path: Path, shape: tuple[int, ...], dtype, parts) -> None:
    """An .npy file of `shape` written from `parts` (arrays of consecutive rows, in order) as they come.

    Only one part is in memory at a time; the file appears whole, or not at all if the parts fail
    or do not add up to `shape`.
    """
    from numpy.lib import format as npy

    dtype = np.dtype(dtype)

    def write(f) -> None:
        npy.write_array_header_1_0(f, {"descr": npy.dtype_to_descr(dtype), "fortran_order": False,
                                       "shape": tuple(shape)})
        rows = 0
        for part in parts:
            part = np.ascontiguousarray(part, dtype=dtype)
            if part.shape[1:] != tuple(shape[1:]):
                raise ValueError(f"write_npy_rows: a part of shape {part.shape} in an array of shape {shape}")
            f.write(memoryview(part).cast("B"))
            rows += part.shape[0]
        if rows != shape[0]:
            raise ValueError(f"write_npy_rows: {rows} rows written for an array of {shape[0]}")

    _write_atomic(path, write)


def check_writable(path: str | os.PathLike, argument: str) -> None:
    """That folder `path` exists or can be made there, and can be written to: checked before long work."""
    if not str(path).strip():  # Path("") is the working directory: results would land there unasked
        raise ValueError(f"{argument}: the path is empty; give a folder (\".\" for the working directory)")
    path = Path(path)
    # Before anything is looked up: a lookup of an overlong name fails itself. 255 bytes is the usual limit.
    too_long = [part.name for part in (path, *path.parents) if len(os.fsencode(part.name)) > 255]
    if too_long:
        raise ValueError(f"{argument}: the name {too_long[0][:40]!r}... is longer than the 255 bytes a file name may "
                         "have; choose a shorter path")
    for part in (path, *path.parents):
        if part.is_symlink() and not part.exists():  # exists() follows the link: the folder would fail at the end
            raise ValueError(f"{argument}: {str(part)!r} is a link to {os.readlink(part)!r}, which does not exist; "
                             "create that folder or choose another path")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{argument}: {str(path)!r} cannot be a folder: {str(probe)!r} is a file; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{argument}: {str(probe)!r} cannot be written to (permissions, or a read-only filesystem); "
                         "choose another path")
    # Permission bits do not tell everything (a superuser passes them; some filesystems refuse files all the
    # same): a file is made there and removed.
    try:
        fd, made = tempfile.mkstemp(prefix=".forgetscore-probe-", suffix=".tmp", dir=probe)
    except OSError as exc:
        # A folder that exists yet says "no such file" when a file is made in it is on a filesystem that takes
        # no new files (/proc, /sys): the bare errno would read as if the folder were missing.
        why = "its filesystem takes no new files" if exc.errno == errno.ENOENT else exc.strerror
        raise ValueError(f"{argument}: {str(probe)!r} cannot be written to ({why}); choose another path") from None
    os.close(fd)
    os.unlink(made)


def json_line(line: str, where: str, example: str) -> dict:
    """One line of a JSON-lines file, which must be an object; otherwise a ValueError naming `where` (e.g.
    "train: metadata.jsonl line 3") and showing `example`."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not JSON ({exc}); write one JSON object per line, like {example}") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{where} is a JSON {type(rec).__name__}, not an object; write it like {example}")
    return rec


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root`, and the folders themselves, to disk (before a rename publishes them)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_dir(out: Path, fill) -> Path:
    """Create directory `out` whole or not at all: `fill(tmp)` writes into a temporary sibling, then it is renamed.

    An existing `out` is replaced only once the new one is complete. A run killed between the two
    renames of a replacement leaves the old folder under a hidden name; the next call for `out`
    puts it back first (and clears what such runs left).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _recover_dir(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is private (0700)
        except OSError:
            pass
        fill(tmp)
        _fsync_tree(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            remove_dir(old)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _recover_dir(out: Path) -> None:
    """Undo what a :func:`write_dir` killed midway left: the old `out` back in place, stale copies gone."""
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not out.exists():
        try:
            os.replace(olds.pop(), out)
        except OSError:
            pass
    removals = list(out.parent.glob(f"..{out.name}.old-*.removing-*"))  # remove_dir of an old copy, cut short
    for stale in olds + removals + _older_than(out.parent.glob(f".{out.name}.tmp-*"), STALE_S):
        shutil.rmtree(stale, ignore_errors=True)


# A temporary file or folder older than this belongs to a killed run, not to one still writing it.
STALE_S = 3600.0


def _older_than(paths, seconds: float) -> list[Path]:
    now = time.time()
    out = []
    for p in paths:
        try:
            if now - p.stat().st_mtime > seconds:
                out.append(p)
        except FileNotFoundError:
            pass
    return out


def remove_dir(path: Path, strict: bool = False) -> None:
    """Delete folder `path` so that a kill midway never leaves part of it under its own name.

    It is renamed to a hidden sibling first (one atomic step), then deleted; :func:`clean_removed`
    deletes what a killed removal left. `strict`: an OSError says what could not be deleted (else what is
    left stays hidden, for a later clean-up).
    """
    path = Path(path)
    trash = path.with_name(f".{path.name}.removing-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    failures: list[str] = []

    def failed(_fn, where, exc) -> None:
        failures.append(f"{where}: {getattr(exc, 'strerror', None) or exc}")

    if sys.version_info >= (3, 12):
        shutil.rmtree(trash, onexc=failed)
    else:  # onerror's third argument is sys.exc_info()
        shutil.rmtree(trash, onerror=lambda fn, where, info: failed(fn, where, info[1]))
    if strict and failures:
        raise OSError(f"could not delete all of {str(path)!r} ({failures[0]}"
                      f"{f' and {len(failures) - 1} more' if len(failures) > 1 else ''}); what is left is in "
                      f"{str(trash)!r}")


def clean_removed(folder: Path, names: tuple[str, ...] = ("*",)) -> None:
    """Finish the removals (:func:`remove_dir`) and drop the temporary files of writes that killed runs left in
    `folder`, for files and folders named like `names` (globs) only: the folder may hold other people's.
    Temporary files go only once they are old enough not to be another process's write in progress."""
    folder = Path(folder)
    for name in names:
        for p in folder.glob(f".{name}.removing-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in _older_than(folder.glob(f".{name}.*.tmp"), STALE_S):
            p.unlink(missing_ok=True)
