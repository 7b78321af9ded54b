"""Writing files so that nothing half-written is ever left on disk."""
from __future__ import annotations

import io
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
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    write_bytes(path, buf.getvalue())


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)
