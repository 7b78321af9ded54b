"""Writing files so that nothing half-written is ever left on disk."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


def _write_atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def write_dir(out: Path, fill) -> Path:
    """Create directory `out` whole or not at all: `fill(tmp)` writes into a temporary sibling, then it is renamed.

    An existing `out` is replaced only once the new one is complete.
    """
    import shutil

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
