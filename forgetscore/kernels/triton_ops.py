"""Triton backend: the five functions of the backend contract (see BACKENDS.md).

Importing this module never raises: when Triton is missing or our kernels fail
to build, ``AVAILABLE`` is False, ``IMPORT_ERROR`` holds the exception and the
five functions raise a RuntimeError that names it.

Without a CUDA device (or with FORGETSCORE_TRITON_INTERPRET=1) the kernels run
in Triton's interpreter on CPU tensors; that is exact but very slow and meant
for testing.  Compiled, they take CUDA tensors.
"""
from __future__ import annotations

__all__ = ["AVAILABLE", "IMPORT_ERROR", "INTERPRETED", "bits", "normal", "add_noise", "diffusion_loss",
           "fisher_accumulate"]

AVAILABLE = False
IMPORT_ERROR: BaseException | None = None
INTERPRETED = False

try:
    from . import triton_fisher as _fisher
    from . import triton_jit as _jit
    from . import triton_loss as _loss
    from . import triton_noise as _noise
except Exception as exc:  # ImportError, or a Triton too old/new for our kernels
    IMPORT_ERROR = exc
else:
    INTERPRETED = _jit.INTERPRETED
    _problem = _jit.interpreter_problem()
    if _problem is None:
        AVAILABLE = True
    else:
        IMPORT_ERROR = RuntimeError(_problem)


def _require(*tensors) -> None:
    if not AVAILABLE:
        raise RuntimeError(f"the triton backend is unavailable: {IMPORT_ERROR!r}") from IMPORT_ERROR
    if not INTERPRETED:
        for t in tensors:
            if t is not None and t.device.type != "cuda":
                raise ValueError(f"the compiled triton backend needs CUDA tensors, got one on {t.device}")


def _dense(*tensors):
    # The kernels index with dense row-major strides.  The contract promises
    # contiguous inputs; this keeps a strided view (say ids[r::3]) correct
    # anyway, at no cost when the promise holds.
    return [t if t is None else t.contiguous() for t in tensors]


def bits(seed, sample_ids, draw_ids, numel):
    _require(sample_ids, draw_ids)
    return _noise.bits(seed, *_dense(sample_ids, draw_ids), numel)


def normal(seed, sample_ids, draw_ids, numel):
    _require(sample_ids, draw_ids)
    return _noise.normal(seed, *_dense(sample_ids, draw_ids), numel)


def add_noise(x0, coef_signal, coef_noise, seed, sample_ids, draw_ids):
    _require(x0, coef_signal, coef_noise, sample_ids, draw_ids)
    x0, coef_signal, coef_noise, sample_ids, draw_ids = _dense(x0, coef_signal, coef_noise, sample_ids, draw_ids)
    return _noise.add_noise(x0, coef_signal, coef_noise, seed, sample_ids, draw_ids)


def diffusion_loss(model_output, x0, coef_signal, coef_noise, seed, sample_ids, draw_ids, prediction_type, mask):
    _require(model_output, x0, coef_signal, coef_noise, sample_ids, draw_ids, mask)
    model_output, x0, coef_signal, coef_noise, sample_ids, draw_ids, mask = _dense(
        model_output, x0, coef_signal, coef_noise, sample_ids, draw_ids, mask)
    return _loss.diffusion_loss(model_output, x0, coef_signal, coef_noise, seed, sample_ids, draw_ids,
                                prediction_type, mask)


def fisher_accumulate(fisher, inputs, grad_outputs):
    _require(fisher, inputs, grad_outputs)
    inputs, grad_outputs = _dense(inputs, grad_outputs)
    if fisher.is_contiguous():
        _fisher.fisher_accumulate(fisher, inputs, grad_outputs)
    else:
        # The update must land in the caller's tensor, not in a copy.
        dense = fisher.contiguous()
        _fisher.fisher_accumulate(dense, inputs, grad_outputs)
        fisher.copy_(dense)
