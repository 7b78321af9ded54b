"""Running a block with a given number of torch threads."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with `n` intra-op threads (None or 0: leave as is), then restore the count.

    Why it matters here: small models gain little from more threads, two threads on two busy
    cores can be many times slower than one (OpenMP threads spin at barriers), and results
    are only bit-exact for a fixed count.
    """
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
