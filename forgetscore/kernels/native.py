"""Python face of the compiled backends in ``forgetscore._C``.

Two backend objects, ``cpu`` (C++/OpenMP) and ``cuda`` (CUDA kernels), follow
the contract in BACKENDS.md.  Importing this module never fails: when the
extension is missing or broken (no compiler at install time, ABI mismatch with
the installed torch), ``NATIVE_IMPORT_ERROR`` says why and both backends report
themselves unavailable, so dispatch can fall back to another backend.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

try:
    from forgetscore import _C  # type: ignore[attr-defined]
except Exception as exc:  # noqa: BLE001 - any load failure only disables these backends
    _C = None
    NATIVE_IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    NATIVE_IMPORT_ERROR = None

__all__ = ["NATIVE_IMPORT_ERROR", "cpu", "cuda", "cpu_available", "cuda_available"]


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
