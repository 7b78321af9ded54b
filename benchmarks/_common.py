"""Helpers shared by the benchmark scripts (timing sync, number formatting, plain-text tables)."""
from __future__ import annotations

from collections.abc import Callable

import torch


def make_sync(device: torch.device) -> Callable[[], None]:
    """What to call before reading a clock: wait for queued GPU work; nothing on the CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def fmt_bytes(v: int | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(v) >= scale:
            return f"{v / scale:.{digits}f} {unit}"
    return f"{v} B"


def table(headers: list[str], rows: list[list[str]], first_numeric: int = 3) -> str:
    """Columns from `first_numeric` up to the last (a free-text note) are right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(c.rjust(w) if first_numeric <= i < len(r) - 1 else c.ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return "\n".join(out)
