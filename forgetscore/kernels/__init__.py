"""Fused kernels for attribution by unlearning.

Four public kernels, each with a plain-PyTorch reference (``reference``), a
C++/OpenMP CPU kernel, a Triton kernel and a CUDA kernel:

- :func:`normal` — counter-based standard normals keyed by (seed, sample id, draw id);
- :func:`add_noise` — the forward diffusion step with that noise made in-kernel;
- :func:`diffusion_loss` — per-row diffusion loss with the target regenerated in-kernel;
- :func:`fisher_accumulate` — diagonal-Fisher accumulation for a linear layer
  from its inputs and output gradients, without per-sample gradients.

Every function takes ``backend="auto" | "torch" | "cpu" | "triton" | "cuda"``. On meta tensors every
function gives its result's shape and dtype, computing and checking no value.

These are plain Python functions, not registered custom ops: ``torch.compile`` runs them through graph
breaks, but ``fullgraph=True`` cannot trace them (their checks read values on the host).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import reference
from . import validate as _v
from .dispatch import available_backends, resolve, status

__all__ = ["normal", "random_bits", "add_noise", "diffusion_loss", "fisher_accumulate",
           "available_backends", "status", "reference"]

IdsLike = torch.Tensor | Sequence[int] | int


def _ids(sample_ids: IdsLike, draw_ids: IdsLike, device: torch.device | None, deferred: _v.Deferred,
         batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    single = (_v.is_int(sample_ids) or isinstance(sample_ids, torch.Tensor) and sample_ids.dim() == 0
              or _v.is_array(sample_ids) and getattr(sample_ids, "ndim", None) == 0)
    if batch is None and single:
        raise ValueError("sample_ids: expected one id per row (a 1-D tensor or list), got a single int; "
                         "wrap it in a list")
    sample_ids = _v.id_vector("sample_ids", sample_ids, _v.MAX_SAMPLE_ID, device, deferred, length=batch)
    draw_ids = _v.id_vector("draw_ids", draw_ids, _v.MAX_DRAW_ID, device, deferred, length=sample_ids.shape[0])
    return sample_ids, draw_ids


def _device(device: torch.device | str | None, sample_ids: object) -> torch.device:
    """Where the draws are made: `device`, else where the ids are (the CPU for a list)."""
    if device is None:
        return sample_ids.device if isinstance(sample_ids, torch.Tensor) else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: {device!r} is not a device; pass e.g. 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {str(device)!r} but this PyTorch sees no CUDA GPU; pass device='cpu'")
    return device


def _row_limit(name: str, numel: int) -> None:
    if numel > _v.MAX_ROW_NUMEL:
        raise ValueError(f"{name}: {numel} values per row is more than the 2**34 that a row's 32-bit block "
                         "counter addresses (beyond, the noise would repeat); use rows of at most 2**34 values")


def _shape(shape: object) -> tuple[int, ...]:
    n = _v.count(shape)
    if n is not None:
        items: list | None = [n]
    elif isinstance(shape, torch.Tensor) or _v.is_array(shape):  # 1-D: its entries, each a count
        items = list(shape) if getattr(shape, "ndim", None) == 1 else None  # type: ignore[call-overload]
    else:
        items = list(shape) if isinstance(shape, Sequence) and not isinstance(shape, (str, bytes)) else None
    dims = None if items is None else [_v.count(s) for s in items]
    if dims is None or None in dims:
        raise ValueError(f"shape: expected non-negative ints, got {shape!r}; pass e.g. (4, 16, 16)")
    _row_limit("shape", math.prod(dims))  # type: ignore[arg-type]
    return tuple(dims)  # type: ignore[arg-type]


def _differentiable(backend: str, device: torch.device, function: str, **tensors: object):
    """The backend module for a call; the PyTorch reference where autograd must see through it.

    The fused kernels return results without a graph: a gradient through them would silently be zero.
    """
    wanting = [name for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    if not wanting or not torch.is_grad_enabled():
        return resolve(backend, device)
    if backend in ("auto", "torch"):
        return resolve("torch", device)
    raise ValueError(f"{wanting[0]}: requires grad, and the {backend!r} kernels are not differentiable; use "
                     f"backend='auto' or 'torch' to differentiate through {function}, or pass "
                     f"{wanting[0]}.detach()")


def random_bits(seed: int, sample_ids: IdsLike, draw_ids: IdsLike, numel: int, *,
                device: torch.device | str | None = None, backend: str = "auto") -> torch.Tensor:
    """The raw uint32 stream behind :func:`normal`, as int64 values in [0, 2**32): shape [B, numel]."""
    seed = _v.seed(seed)
    count = _v.count(numel)
    if count is None:
        raise ValueError(f"numel: expected a non-negative int, got {numel!r}; pass the number of values per row")
    _row_limit("numel", count)
    numel = count
    device = _device(device, sample_ids)
    deferred = _v.Deferred()
    sids, dids = _ids(sample_ids, draw_ids, device, deferred)
    deferred.resolve()
    if numel == 0:  # nothing to draw (the reference cannot shape an empty stream)
        return torch.empty(sids.shape[0], 0, dtype=torch.int64, device=device)
    return resolve(backend, device).bits(seed, sids, dids, numel)


def normal(seed: int, sample_ids: IdsLike, draw_ids: IdsLike, shape: int | Sequence[int], *,
           dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
           backend: str = "auto") -> torch.Tensor:
    """Standard normals [B, *shape]; row b depends only on (seed, sample_ids[b], draw_ids[b]).

    The same row comes out whatever the batch size, the row's position, the device
    or the backend, which is what keeps the noise of a (training image, draw)
    fixed between the before- and after-unlearning passes however the data is batched.
    `draw_ids` may be a single int shared by all rows. The normals are float32 in every backend:
    ``dtype=torch.float64`` gives those same values cast up, no more precise than float32.
    """
    seed = _v.seed(seed)
    shape = _shape(shape)
    if not isinstance(dtype, torch.dtype):
        named = getattr(torch, dtype, None) if isinstance(dtype, str) else None
        fix = f"pass torch.{dtype}" if isinstance(named, torch.dtype) else "pass a torch.dtype such as torch.float32"
        raise ValueError(f"dtype: expected a torch.dtype, got the {type(dtype).__name__} {dtype!r}; {fix}")
    if dtype not in _v.FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"dtype: {dtype} is not a floating type; use float32, float64, float16 or bfloat16")
    device = _device(device, sample_ids)
    deferred = _v.Deferred()
    sids, dids = _ids(sample_ids, draw_ids, device, deferred)
    deferred.resolve()
    if math.prod(shape) == 0:  # nothing to draw (the reference cannot shape an empty stream)
        return torch.empty(sids.shape[0], *shape, dtype=dtype, device=device)
    out = resolve(backend, device).normal(seed, sids, dids, math.prod(shape))
    return out.view(sids.shape[0], *shape).to(dtype)


def _noising_args(x0: torch.Tensor, timesteps: object, alphas_cumprod: torch.Tensor, seed: int,
                  sample_ids: IdsLike, draw_ids: IdsLike, deferred: _v.Deferred):
    seed = _v.seed(seed)
    acp = _v.alphas_cumprod(alphas_cumprod, deferred)
    batch = x0.shape[0]
    if batch:
        _row_limit("x0", x0[0].numel())
    ts = _v.timesteps(timesteps, acp, batch, x0.device, deferred)
    sids, dids = _ids(sample_ids, draw_ids, x0.device, deferred, batch)
    coef_signal, coef_noise = reference.noise_coefficients(acp, ts)
    return seed, sids, dids, coef_signal, coef_noise


def add_noise(x0: torch.Tensor, timesteps: torch.Tensor | Sequence[int], alphas_cumprod: torch.Tensor,
              seed: int, sample_ids: IdsLike, draw_ids: IdsLike, *, backend: str = "auto",
              check: bool = True) -> torch.Tensor:
    """x_t = sqrt(abar[t_b]) x0[b] + sqrt(1 - abar[t_b]) eps[b], eps = normal(seed, sample_ids, draw_ids).

    The noise is generated inside the kernel and never stored. Returns x0's shape and dtype;
    the arithmetic is float32. ``check=False`` skips the checks of values held on a GPU (id and
    timestep ranges, finite x0), the call's one synchronisation, for callers that vouch for them:
    bad values then give wrong numbers instead of an error.
    """
    x0 = _v.float_tensor("x0", x0)
    deferred = _v.Deferred(check)
    seed, sids, dids, a, b = _noising_args(x0, timesteps, alphas_cumprod, seed, sample_ids, draw_ids, deferred)
    _v.finite_rows_later("x0", x0, deferred)
    if x0.numel() == 0:  # no rows, or rows without elements: nothing to launch (a kernel grid may not be empty)
        deferred.resolve()
        return x0.clone()
    flat = x0.reshape(x0.shape[0], -1).contiguous()
    module = _differentiable(backend, x0.device, "add_noise", x0=x0, alphas_cumprod=alphas_cumprod)
    out = module.add_noise(flat, a, b, seed, sids, dids)
    deferred.resolve()
    return out.view(x0.shape)


def _mask_rows(mask: torch.Tensor, shape: torch.Size, deferred: _v.Deferred) -> torch.Tensor:
    """A float32 [1 or B, D] view of a mask broadcastable to `shape`; its values are checked through `deferred`."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask: expected a tensor, got {type(mask).__name__}; pass a bool or float tensor")
    if mask.is_complex():
        raise ValueError(f"mask: dtype {mask.dtype} is complex; pass real non-negative weights (e.g. mask.abs()) "
                         "or a bool mask")
    try:
        full = torch.broadcast_shapes(mask.shape, shape)
    except RuntimeError:
        full = None
    if full != torch.Size(shape):
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not broadcast to the model output's "
                         f"{tuple(shape)}; give e.g. [H, W], [1, 1, H, W] or [B, 1, H, W]")
    batch = shape[0]
    if batch > 1 and mask.dim() == len(shape) - 1 and mask.shape[0] == batch:
        # Broadcasting reads the first dim as the output's second, whose size is also B: a per-image mask
        # that lost its channel dim would silently weigh channels instead.
        raise ValueError(f"mask: shape {tuple(mask.shape)} is ambiguous for the model output's {tuple(shape)}, "
                         f"whose batch and second dims are both {batch}; give {(batch, 1, *mask.shape[1:])} for "
                         f"one mask per image or {(1, *mask.shape)} for one mask per channel, shared by all images")
    # Widened before the rescaling below: float16/bfloat16 weights would otherwise be rounded again in their own
    # precision. float64 stays float64 until then, for weights beyond float32's range.
    m = mask.double() if mask.dtype == torch.float64 else mask.float()
    if mask.dtype != torch.bool:
        deferred.add(lambda: (torch.isfinite(m) & (m >= 0)).all(), _bad_mask_values)
    if batch == 0:  # no rows to weigh
        return torch.zeros(0, math.prod(shape[1:]), dtype=torch.float32, device=mask.device)
    if m.dim() == len(shape) and m.shape[0] == batch and batch > 1:
        rows = torch.broadcast_to(m, shape).reshape(batch, -1)
    else:
        # Constant along the batch: one row serves every row (stride 0 in the kernels).
        rows = torch.broadcast_to(m, shape)[:1].reshape(1, -1)
    # Each row scaled to a largest weight of 1 (the loss, sum(m e^2) / sum(m), does not change): weights that
    # overflow or underflow float32, or whose float32 sum would, are kept. A 0/1 mask is left as it is.
    top = rows.amax(dim=1, keepdim=True)
    rows = (rows / torch.where(top > 0, top, 1)).float().contiguous()  # an all-zero row stays zero
    deferred.add(lambda: (rows.sum(dim=1) > 0).all(), lambda: _empty_mask_rows(rows))
    return rows


def _bad_mask_values() -> None:
    raise ValueError("mask: values must be finite and non-negative; use a 0/1 or weight mask")


def _empty_mask_rows(rows: torch.Tensor) -> None:
    empty = ~(rows.sum(dim=1) > 0)
    raise ValueError(f"mask: selects no element in rows {empty.nonzero().flatten().tolist()[:10]}; "
                     "every row needs a non-empty region")


def diffusion_loss(model_output: torch.Tensor, x0: torch.Tensor, timesteps: torch.Tensor | Sequence[int],
                   alphas_cumprod: torch.Tensor, seed: int, sample_ids: IdsLike, draw_ids: IdsLike, *,
                   prediction_type: str = "epsilon", mask: torch.Tensor | None = None,
                   backend: str = "auto", check: bool = True) -> torch.Tensor:
    """Per-row mean squared error between the model output and its regenerated target, float32 [B].

    The target is eps (``"epsilon"``), v = sqrt(abar) eps - sqrt(1 - abar) x0 (``"v_prediction"``)
    or x0 (``"sample"``), with eps regenerated from (seed, sample_ids, draw_ids) exactly as
    :func:`add_noise` made it. With `mask` (broadcastable to the output), the mean runs over
    the masked elements only: sum(m (o - y)^2) / sum(m). A mask one dim short of the output whose first
    dim is the batch size B > 1 is refused: broadcasting would read it as per-channel; give [B, 1, H, W]
    per image or [1, C, H, W] per channel. ``check=False`` skips the checks of values (those of the mask
    included), as in :func:`add_noise`, and that of the result; a row whose float32 sum of squared errors
    overflows is an error in every backend.

    With a `model_output` that requires grad (and grad enabled), ``backend="auto"`` runs the reference so
    that autograd sees the loss: its last bits may then differ from the fused kernels' (another summation
    order), by about float32 rounding.
    """
    model_output = _v.float_tensor("model_output", model_output)
    x0 = _v.float_tensor("x0", x0)
    if model_output.shape != x0.shape:
        raise ValueError(f"model_output: shape {tuple(model_output.shape)} differs from x0's {tuple(x0.shape)}; "
                         "pass the UNet output for exactly these rows")
    _v.same_device(model_output=model_output, x0=x0, mask=mask)
    prediction_type = _v.prediction_type(prediction_type, reference.PREDICTION_TYPES)
    deferred = _v.Deferred(check)
    seed, sids, dids, a, b = _noising_args(x0, timesteps, alphas_cumprod, seed, sample_ids, draw_ids, deferred)
    rows = None if mask is None else _mask_rows(mask, model_output.shape, deferred)
    if x0.shape[0] == 0:
        deferred.resolve()
        return torch.empty(0, dtype=torch.float32, device=x0.device)
    if x0[0].numel() == 0:
        raise ValueError(f"model_output: rows of shape {tuple(x0.shape[1:])} hold no elements, whose mean is "
                         "undefined; pass the UNet output for rows with at least one element")
    module = _differentiable(backend, x0.device, "diffusion_loss", model_output=model_output, x0=x0, mask=mask,
                             alphas_cumprod=alphas_cumprod)
    out = module.diffusion_loss(
        model_output.reshape(x0.shape[0], -1).contiguous(), x0.reshape(x0.shape[0], -1).contiguous(),
        a, b, seed, sids, dids, prediction_type, rows)

    def explain() -> None:
        # A non-finite loss can only come from a non-finite input row: say which.
        _v.finite_rows("model_output", model_output)
        _v.finite_rows("x0", x0)
        raise ValueError("model_output: squared error overflowed float32 in rows "
                         f"{(~torch.isfinite(out)).nonzero().flatten().tolist()[:10]}; the model output is diverging")

    deferred.add(lambda: torch.isfinite(out).all(), explain)
    deferred.resolve()
    return out


def fisher_accumulate(fisher: torch.Tensor, inputs: torch.Tensor, grad_outputs: torch.Tensor, *,
                      backend: str = "auto", check: bool = True) -> torch.Tensor:
    """fisher += sum_b (G_b^T X_b)**2 for a linear layer y = x W^T, in place; returns `fisher`.

    inputs X [B, L, d_in] (or [B, d_in]), grad_outputs G [B, L, d_out] (or [B, d_out]) hold each
    sample's layer inputs and the gradients of that sample's own loss w.r.t. the layer outputs;
    G_b^T X_b is that sample's weight gradient, never materialised. With ``check=True`` the inputs are
    checked to be finite before `fisher` is touched, and the update is checked not to have overflowed
    after it (then `fisher` holds inf where it did, and the error says so): two synchronisations.
    ``check=False`` skips both for callers that check the result instead. The per-sample gradients and
    their squares are float32 (as in the reference) whatever `fisher`'s dtype; its sum over calls is
    `fisher`'s dtype. No autograd graph is recorded, whatever the inputs require.
    """
    if not isinstance(fisher, torch.Tensor) or fisher.dtype not in (torch.float32, torch.float64) or fisher.dim() != 2:
        raise ValueError("fisher: expected a 2-D float32 or float64 tensor [d_out, d_in]; "
                         "create it with torch.zeros(d_out, d_in, dtype=torch.float64)")
    inputs = _v.float_tensor("inputs", inputs, min_dim=2)
    grad_outputs = _v.float_tensor("grad_outputs", grad_outputs, min_dim=2)
    if inputs.dim() > 3 or grad_outputs.dim() != inputs.dim():
        raise ValueError(f"grad_outputs: shapes {tuple(inputs.shape)} (inputs) and {tuple(grad_outputs.shape)} "
                         "(grad_outputs) must both be [B, L, d] or both [B, d]")
    if inputs.dim() == 2:
        inputs, grad_outputs = inputs[:, None], grad_outputs[:, None]
    if inputs.shape[:2] != grad_outputs.shape[:2]:
        raise ValueError(f"grad_outputs: batch/token dims {tuple(grad_outputs.shape[:2])} differ from inputs' "
                         f"{tuple(inputs.shape[:2])}; capture both from the same forward/backward pass")
    if tuple(fisher.shape) != (grad_outputs.shape[2], inputs.shape[2]):
        raise ValueError(f"fisher: shape {tuple(fisher.shape)} does not match (d_out, d_in) = "
                         f"({grad_outputs.shape[2]}, {inputs.shape[2]}); allocate it as [d_out, d_in] like the weight")
    if fisher.requires_grad:  # e.g. an nn.Parameter: the kernels would write past autograd, the reference refuse
        raise ValueError("fisher: requires grad; accumulate into a plain tensor, e.g. torch.zeros(d_out, d_in, "
                         "dtype=torch.float64), not a parameter")
    if fisher.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError("fisher: is an inference tensor (made under torch.inference_mode()), which cannot be updated "
                         "in place outside it; allocate it outside inference mode, e.g. torch.zeros(d_out, d_in, "
                         "dtype=torch.float64)")
    if _v.overlapping(fisher):  # refused here: written back at the end, the kernel's work would be lost
        raise ValueError(f"fisher: its elements overlap in memory (strides {fisher.stride()}, as from expand()), so "
                         "it cannot be updated in place; accumulate into a tensor of its own, e.g. "
                         "torch.zeros(d_out, d_in, dtype=torch.float64)")
    _v.same_device(fisher=fisher, inputs=inputs, grad_outputs=grad_outputs)
    deferred = _v.Deferred(check)
    _v.finite_rows_later("inputs", inputs, deferred)
    _v.finite_rows_later("grad_outputs", grad_outputs, deferred)
    deferred.resolve()  # before the kernel: `fisher` is updated in place
    if inputs.shape[0] == 0 or inputs.shape[1] == 0:  # no samples (or tokens): nothing to add
        return fisher
    if inputs.dtype != grad_outputs.dtype:
        inputs, grad_outputs = inputs.float(), grad_outputs.float()
    # Taken before the update and read after it (check=True only): what this call made non-finite is reported,
    # not entries a caller's unchecked calls had already made so.
    was_finite = torch.isfinite(fisher) if check else None
    target = fisher if fisher.is_contiguous() else fisher.contiguous()
    resolve(backend, fisher.device).fisher_accumulate(target, inputs.contiguous(), grad_outputs.contiguous())
    if target is not fisher:
        fisher.copy_(target)
    if was_finite is not None:
        after = _v.Deferred()
        after.add(lambda: (torch.isfinite(fisher) | ~was_finite).all(), lambda: _fisher_overflow(fisher, was_finite))
        after.resolve()
    return fisher


def _fisher_overflow(fisher: torch.Tensor, was_finite: torch.Tensor) -> None:
    bad = (was_finite & ~torch.isfinite(fisher)).nonzero()
    shown = f"{bad[:4].tolist()}"[:-1] + (", ...]" if bad.shape[0] > 4 else "]")
    running = (" (or fisher's own float32 running sum did: accumulate into float64)"
               if fisher.dtype == torch.float32 else "")
    raise ValueError(f"fisher: entries {shown} overflowed float32 in this call and now hold inf or NaN: the "
                     f"squared per-sample gradients (G_b^T X_b)**2 exceed float32's range{running}; scale the loss "
                     "down (grad_outputs scale with it) and start again from a fresh fisher")
