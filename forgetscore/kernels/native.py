"""Python face of the compiled backends in ``forgetscore._C``.

Two backend objects, ``cpu`` (C++/OpenMP) and ``cuda`` (CUDA kernels), follow
the contract in BACKENDS.md.  Importing this module never fails: when the
extension is missing or broken (no compiler at install time, ABI mismatch with
the installed torch), ``NATIVE_IMPORT_ERROR`` says why and both backends report
themselves unavailable, so dispatch can fall back to another backend.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .._sources import fingerprint

PACKAGE = Path(__file__).resolve().parents[1]
CHECKOUT_SOURCES = PACKAGE.parent / "csrc"  # present where the package is imported from a source checkout


def _why_missing(exc: Exception) -> str:
    why = f"{type(exc).__name__}: {exc}"
    if (PACKAGE.parent / "setup.py").is_file() and not any(PACKAGE.glob("_C.*")):
        # Run from the root of a checkout, `import forgetscore` finds the sources before an installed copy.
        why += (f"; forgetscore is imported from the source checkout {PACKAGE}, which holds no built extension: "
                "run from another folder to use an installed copy, or build here with "
                "`pip install --no-build-isolation -e .`")
    return why


def stale_sources(module: Any, csrc: Path = CHECKOUT_SOURCES) -> str | None:
    """Why `module` (the loaded extension) was not built from the sources in `csrc`, or None if it was
    (or there are no sources beside the package to compare with, as in an installed copy)."""
    if not (csrc / "bindings.cpp").is_file():
        return None
    built = str(getattr(module, "SOURCES", "unknown"))
    if built.startswith("s") and built[1:] == fingerprint(csrc):
        return None
    return (f"forgetscore._C ({Path(getattr(module, '__file__', '?')).name}) was not built from the sources in "
            f"{csrc} (edited since, or its last rebuild failed): the native kernels may be out of date; rebuild "
            "with `pip install --no-build-isolation -e .`")


try:
    from forgetscore import _C  # type: ignore[attr-defined]
except Exception as exc:  # noqa: BLE001 - any load failure only disables these backends
    _C = None
    NATIVE_IMPORT_ERROR: str | None = _why_missing(exc)
    STALE: str | None = None
else:
    NATIVE_IMPORT_ERROR = None
    STALE = stale_sources(_C)
    if STALE:
        warnings.warn(STALE, RuntimeWarning, stacklevel=2)

__all__ = ["NATIVE_IMPORT_ERROR", "STALE", "cpu", "cuda", "cpu_available", "cuda_available", "stale_sources"]


def cpu_available() -> bool:
    """Whether the C++ kernels loaded."""
    return _C is not None


def cuda_available() -> bool:
    """Whether the extension loaded and was compiled with the CUDA kernels.

    Says nothing about whether a GPU is present: check torch.cuda.is_available().
    """
    return _C is not None and bool(_C.has_cuda())


def _seed(seed: Any) -> int:
    # The extension takes uint64; a bool or numpy integer is normalised here so
    # that pybind11 sees a plain int.
    return int(seed)


def _missing(prefix: str, name: str):
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        why = NATIVE_IMPORT_ERROR or "forgetscore._C was built without CUDA"
        raise RuntimeError(f"forgetscore native backend '{prefix}' is unavailable: {why}")

    unavailable.__name__ = name
    return unavailable


def _make_backend(prefix: str, available: bool) -> SimpleNamespace:
    if not available:
        names = ("bits", "normal", "add_noise", "diffusion_loss", "fisher_accumulate")
        return SimpleNamespace(name=prefix, **{n: _missing(prefix, n) for n in names})
    fns = {n: getattr(_C, f"{prefix}_{n}") for n in
           ("bits", "normal", "add_noise", "diffusion_loss", "fisher_accumulate")}

    def bits(seed: int, sample_ids: torch.Tensor, draw_ids: torch.Tensor, numel: int) -> torch.Tensor:
        return fns["bits"](_seed(seed), sample_ids, draw_ids, int(numel))

    def normal(seed: int, sample_ids: torch.Tensor, draw_ids: torch.Tensor, numel: int) -> torch.Tensor:
        return fns["normal"](_seed(seed), sample_ids, draw_ids, int(numel))

    def add_noise(x0: torch.Tensor, coef_signal: torch.Tensor, coef_noise: torch.Tensor, seed: int,
                  sample_ids: torch.Tensor, draw_ids: torch.Tensor) -> torch.Tensor:
        return fns["add_noise"](x0, coef_signal, coef_noise, _seed(seed), sample_ids, draw_ids)

    def diffusion_loss(model_output: torch.Tensor, x0: torch.Tensor, coef_signal: torch.Tensor,
                       coef_noise: torch.Tensor, seed: int, sample_ids: torch.Tensor, draw_ids: torch.Tensor,
                       prediction_type: str, mask: torch.Tensor | None) -> torch.Tensor:
        return fns["diffusion_loss"](model_output, x0, coef_signal, coef_noise, _seed(seed), sample_ids, draw_ids,
                                     str(prediction_type), mask)

    def fisher_accumulate(fisher: torch.Tensor, inputs: torch.Tensor, grad_outputs: torch.Tensor) -> None:
        fns["fisher_accumulate"](fisher, inputs, grad_outputs)

    return SimpleNamespace(name=prefix, bits=bits, normal=normal, add_noise=add_noise,
                           diffusion_loss=diffusion_loss, fisher_accumulate=fisher_accumulate)


cpu = _make_backend("cpu", cpu_available())
cuda = _make_backend("cuda", cuda_available())
