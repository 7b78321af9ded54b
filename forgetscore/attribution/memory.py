"""Running out of GPU memory: the largest batch that fits, and an error that names the batch that did not."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

# How cuBLAS and cuDNN report an allocation they could not make: a plain RuntimeError, not torch's own
# OutOfMemoryError (e.g. a handle or workspace created after PyTorch's allocator took the memory).
_OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                 "CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says the device ran out of memory (PyTorch's error, or cuBLAS's and cuDNN's)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES))


def largest_fitting(fits: Callable[[int], None], cap: int, *, argument: str = "batch_size",
                    unit: str = "one UNet row", hint: str = "use --precision bf16, ") -> int:
    """The largest power of two <= `cap` for which ``fits(n)`` returns without running out of CUDA memory.

    Halves from the top: a try that does not fit fails at its first large allocation, so
    the probe costs little more than the forward that fits. `argument`, `unit` and `hint` word the
    error when not even one fits.
    """
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        raise ValueError(f"cap: {cap!r} must be an int >= 1")
    n = 1 << (cap.bit_length() - 1)
    while True:
        try:
            fits(n)
            return n
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
        # retried here, outside the handler, once the failed try's tensors are released
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if n == 1:
            raise ValueError(f"{argument}: 'auto' found nothing that fits: {unit} runs out of device memory; "
                             f"free GPU memory, {hint}or use a larger GPU")
        n //= 2


def summary(exc: BaseException, limit: int = 160) -> str:
    """The first line of `exc`'s message, cut to `limit` characters (PyTorch's allocator report runs long)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


class BatchOutOfMemory(torch.cuda.OutOfMemoryError):
    """A stage ran out of GPU memory; the message starts with the argument that sizes its batches.

    A subclass of PyTorch's error, so that code catching that one still catches it.
    """


@contextlib.contextmanager
def naming_the_batch(argument: str, size: int, unit: str, stage: str, effect: str = "") -> Iterator[None]:
    """Inside: an out-of-memory error becomes a :class:`BatchOutOfMemory` naming `argument` and a smaller size;
    `effect` says what else a smaller size changes, if anything.

    Without it, a stage that ran out of memory hours into a job would show PyTorch's allocator
    report, which says how much was asked for but not which option asked for it.
    """
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, BatchOutOfMemory) or not is_out_of_memory(exc):
            raise
        fix = f"give a smaller one (e.g. {size // 2}) or free GPU memory" if size > 1 else "free GPU memory"
        raise BatchOutOfMemory(f"{argument}: {stage} ran out of GPU memory at {size} {unit} a batch ({summary(exc)}); "
                               f"{fix}{effect}") from exc
