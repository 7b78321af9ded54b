"""``jit``: ``triton.jit`` that falls back to Triton's interpreter without a GPU.

Triton decides between compiling and interpreting when a function is
decorated, by reading its ``TRITON_INTERPRET`` knob.  We switch that knob on
only for the duration of decorating our own kernels and restore it at once, so
that the user's own Triton code in the same process keeps whatever mode the
user chose.

Interpreted kernels run on CPU tensors and are very slow, so they get a single
fixed, large-block configuration; compiled kernels get GPU-sized ones.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "jit", "pick", "multiprocessor_count", "vector_sum", "cast_to"]


def _user_requested_interpreter() -> bool:
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is not None:
        return bool(runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


INTERPRETED: bool = (
    os.environ.get("FORGETSCORE_TRITON_INTERPRET", "0").strip() == "1"
    or _user_requested_interpreter()
    or not torch.cuda.is_available()
)


@contextlib.contextmanager
def _interpreter_switched_on():
    knobs = getattr(triton, "knobs", None)
    runtime = getattr(knobs, "runtime", None)
    if runtime is not None and hasattr(runtime, "scope"):
        # scope() restores both the knob object and the environment variable,
        # which also covers a knob that was overridden programmatically (that
        # override would otherwise win over the environment variable).
        with runtime.scope():
            runtime.interpret = True
            yield
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def jit(fn=None, **kwargs):
    """Drop-in for ``triton.jit`` (bare or with keyword arguments)."""
    if fn is None:
        return functools.partial(jit, **kwargs)
    if not INTERPRETED:
        return triton.jit(fn, **kwargs)
    with _interpreter_switched_on():
        return triton.jit(fn, **kwargs)


def pick(interpreted, compiled):
    """The interpreter-mode value or the GPU value of a launch parameter."""
    return interpreted if INTERPRETED else compiled


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    """SMs of ``device``; 1 when interpreting, where parallelism buys nothing."""
    if INTERPRETED or device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


# The helpers of triton.language that are themselves jit functions (tl.sum,
# tl.zeros, tl.zeros_like, tl.cdiv, ...) were decorated for compilation when
# Triton was imported, so an interpreted kernel cannot call them.  Kernels
# here use builtins only (tl.full instead of tl.zeros) plus the reduction
# below.
if INTERPRETED:
    _SUM_COMBINE = getattr(getattr(tl, "standard", None), "_sum_combine", None)

    if _SUM_COMBINE is None:  # pragma: no cover - other Triton versions

        @jit
        def _add(a, b):
            return a + b

        _SUM_COMBINE = _add

    @jit
    def vector_sum(x):
        """Sum of a 1-D block (the interpreter maps this combine to NumPy's sum)."""
        return tl.reduce(x, 0, _SUM_COMBINE)

else:

    @jit
    def vector_sum(x):
        """Sum of a 1-D block."""
        return tl.sum(x, axis=0)


if INTERPRETED:

    @jit
    def cast_to(x, dtype: tl.constexpr):
        """float32 -> ``dtype`` rounding to nearest even, as torch and the GPU do.

        The interpreter truncates float32 -> bfloat16, so that case rounds by
        hand on the bit pattern.
        """
        if dtype == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            r = tl.where(x != x, (b >> 16) | 0x40, r)
            return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(dtype)

else:

    @jit
    def cast_to(x, dtype: tl.constexpr):
        """float32 -> ``dtype`` rounding to nearest even."""
        return x.to(dtype)


@jit
def _loop_probe(out_ptr, n):
    acc = 0
    for _ in range(0, n):
        acc += 1
    tl.store(out_ptr, acc)


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run our kernels here, or None (always None when compiling).

    Some Triton releases' interpreters cannot take a loop bound with recent NumPy (Triton 3.6
    with NumPy 2.4: "only 0-dimensional arrays can be converted to Python scalars"); the
    backend is then reported unavailable rather than failing in every kernel.
    """
    if not INTERPRETED:
        return None
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_probe[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 - any failure means the interpreter is unusable here
        import numpy as np

        return (f"Triton {triton.__version__}'s interpreter fails here with NumPy {np.__version__} "
                f"({type(exc).__name__}: {str(exc)[:120]}); use Triton >= 3.7 for the interpreter, or a GPU")
    return None if int(out[0]) == 3 else f"Triton {triton.__version__}'s interpreter ran a loop wrongly"
