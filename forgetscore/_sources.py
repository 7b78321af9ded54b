"""The fingerprint of the C++/CUDA sources in csrc/.

setup.py builds it into ``forgetscore._C`` (as ``_C.SOURCES``), and a checkout that holds csrc/
compares it with its sources at import: an extension left from older sources (edited and not
rebuilt, or a rebuild that failed) then says so instead of running old kernels unnoticed.
Standard library only: setup.py loads this file by path, before anything is installed.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

SUFFIXES = (".h", ".cpp", ".cu", ".cuh")


def fingerprint(csrc: str | Path) -> str:
    """16 hex digits of the sha256 over every source file's path (relative, '/'-separated) and bytes."""
    root = Path(csrc)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
