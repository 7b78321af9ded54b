"""Which backend runs a kernel call.

``auto`` prefers compiled kernels for the tensors' device and falls back to the
plain-PyTorch reference, warning once about what is missing and how to get it.
The Triton interpreter (used for Triton on machines without a GPU) is never
picked automatically: it exists for testing and is far slower than eager.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from . import reference

BACKENDS = ("torch", "cpu", "triton", "cuda")
BACKEND_CHOICES = ("auto",) + BACKENDS
_warned: set[str] = set()


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    devices: tuple[str, ...]
    detail: str


def _triton_module() -> tuple[Any, str]:
    try:
        mod = importlib.import_module("forgetscore.kernels.triton_ops")
    except Exception as exc:  # triton missing or broken: degrade, never raise on import
        return None, f"import failed: {exc}"
    if not getattr(mod, "AVAILABLE", False):
        return None, str(getattr(mod, "IMPORT_ERROR", "triton is not installed"))
    return mod, ""


def _native_module() -> ModuleType:
    return importlib.import_module("forgetscore.kernels.native")


@functools.cache
def status() -> tuple[BackendStatus, ...]:
    """Every backend, whether it can run here, and why not (probed once per process)."""
    out = [BackendStatus("torch", True, ("cpu", "cuda"), "plain PyTorch reference")]
    native = _native_module()
    if native.cpu_available():
        out.append(BackendStatus("cpu", True, ("cpu",), "C++/OpenMP kernels in forgetscore._C"
                                 + (f" (but {native.STALE})" if native.STALE else "")))
    else:
        out.append(BackendStatus("cpu", False, ("cpu",),
                                 f"forgetscore._C did not load ({native.NATIVE_IMPORT_ERROR}); reinstall with "
                                 "`pip install --no-build-isolation .` on a machine with a C++ compiler"))
    tri, why = _triton_module()
    if tri is not None:
        interpreted = getattr(tri, "INTERPRETED", False)
        devs = ("cpu",) if interpreted else ("cuda",)
        out.append(BackendStatus("triton", True, devs,
                                 "Triton interpreter (no GPU here: for tests only, slow)" if interpreted
                                 else "compiled Triton kernels"))
    else:
        where = "" if torch.cuda.is_available() else " (it compiles for CUDA GPUs; without one only the tests use it)"
        out.append(BackendStatus("triton", False, ("cuda",), f"{why}; `pip install triton`{where}"))
    if native.cuda_available() and torch.cuda.is_available():
        out.append(BackendStatus("cuda", True, ("cuda",), "CUDA kernels in forgetscore._C"))
    else:
        why = ("no CUDA device" if native.cuda_available() else
               "forgetscore._C did not load (see the cpu backend)" if not native.cpu_available() else
               "forgetscore._C was built without CUDA; rebuild with FORGETSCORE_BUILD_CUDA=1 and a CUDA torch")
        out.append(BackendStatus("cuda", False, ("cuda",), why))
    return tuple(out)


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine."""
    return [s.name for s in status() if s.available]


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _module(name: str) -> Any:
    if name == "torch":
        return reference
    if name == "triton":
        return _triton_module()[0]
    native = _native_module()
    return native.cpu if name == "cpu" else native.cuda


def resolve(backend: str, device: torch.device) -> Any:
    """The backend module to call for tensors on `device`."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend: {backend!r} is not one of {list(BACKEND_CHOICES)}; "
                         "use 'auto' unless you are testing a specific backend")
    states = {s.name: s for s in status()}
    if backend == "auto":
        if device.type == "meta":  # shapes only: the reference computes no values there, so nothing is slow
            return reference
        order = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}.get(device.type, ())
        for name in order:
            s = states[name]
            if s.available and device.type in s.devices:
                return _module(name)
        missing = ("; ".join(f"{n}: {states[n].detail}" for n in order)
                   or "the compiled kernels run on cpu and cuda tensors only")
        _warn_once(f"fallback-{device.type}",
                   f"forgetscore: using the slow PyTorch reference kernels on {device.type} ({missing})")
        return reference
    s = states[backend]
    if not s.available:
        raise ValueError(f"backend: {backend!r} is not available here ({s.detail})")
    if device.type not in s.devices:
        raise ValueError(f"backend: {backend!r} runs on {', '.join(s.devices)} tensors here, but the tensors are on "
                         f"{device}; move them or use backend='auto'")
    return _module(backend)
