"""Argument checks shared by the public kernel functions.

Every check raises ``ValueError`` naming the argument and saying how to fix it,
so that nothing malformed ever reaches native code.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SEED = 2 ** 64
MAX_SAMPLE_ID = 2 ** 63
MAX_DRAW_ID = 2 ** 32


def _fail(name: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"{name}: {problem}; {fix}")


def seed(value: object) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail("seed", f"expected a Python int, got {type(value).__name__}", "pass an integer seed")
    if not 0 <= value < MAX_SEED:
        raise _fail("seed", f"{value} is outside [0, 2**64)", "use a non-negative 64-bit seed")
    return value


def id_vector(name: str, value: object, limit: int, device: torch.device | None,
              length: int | None = None) -> torch.Tensor:
    """A 1-D int64 tensor of ids in [0, limit); an int broadcasts to `length`."""
    if isinstance(value, int) and not isinstance(value, bool) and length is not None:
        value = torch.full((length,), value, dtype=torch.int64)
    elif not isinstance(value, torch.Tensor):
        if not isinstance(value, Sequence) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise _fail(name, f"expected a 1-D integer tensor or a list of ints, got {type(value).__name__}",
                        "pass e.g. torch.tensor([...], dtype=torch.int64)")
        value = torch.tensor(list(value), dtype=torch.int64)
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise _fail(name, f"dtype {value.dtype} is not an integer type", "convert with .long()")
    if value.dim() != 1:
        raise _fail(name, f"expected a 1-D tensor, got shape {tuple(value.shape)}", "flatten it to one id per row")
    if length is not None and value.shape[0] != length:
        raise _fail(name, f"has {value.shape[0]} entries but the batch has {length} rows",
                    "give exactly one id per row")
    value = value.to(torch.int64).contiguous()
    if value.numel():
        lo, hi = int(value.min()), int(value.max())
        if lo < 0 or hi >= limit:
            raise _fail(name, f"values must lie in [0, {limit}), found {lo if lo < 0 else hi}",
                        "use non-negative ids below the limit")
    return value.to(device) if device is not None else value


def float_tensor(name: str, value: object, *, min_dim: int = 1) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise _fail(name, f"expected a torch.Tensor, got {type(value).__name__}", "convert with torch.as_tensor")
    if value.dtype not in FLOAT_DTYPES:
        raise _fail(name, f"dtype {value.dtype} is not supported", "use float32, float16 or bfloat16")
    if value.dim() < min_dim:
        raise _fail(name, f"expected at least {min_dim} dimension(s) [batch, ...], got shape {tuple(value.shape)}",
                    "add a batch dimension")
    return value


def same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            raise _fail(name, f"is on {dev} but {next(iter(devices))} is on {first}",
                        "move all tensors to one device")
    return first


def timesteps(value: object, alphas_cumprod: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    ts = id_vector("timesteps", value, alphas_cumprod.shape[0], None, length=batch)
    return ts.to(device)


def alphas_cumprod(value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != 1 or value.numel() == 0:
        raise _fail("alphas_cumprod", "expected a non-empty 1-D floating tensor (one value per train timestep)",
                    "pass scheduler.alphas_cumprod")
    if not bool(torch.isfinite(value).all()) or bool((value < 0).any()) or bool((value > 1).any()):
        raise _fail("alphas_cumprod", "values must be finite and lie in [0, 1]", "pass scheduler.alphas_cumprod")
    return value


def finite_rows(name: str, value: torch.Tensor) -> None:
    """Raise naming the rows of a [B, ...] tensor that hold NaN or inf.

    A row sum is non-finite whenever the row holds NaN or inf, and summing is one fast
    reduction with no temporary of the input's size; only when a sum is non-finite
    (which overflow alone can also cause) are the elements looked at.
    """
    rows = value.reshape(value.shape[0], -1) if value.dim() else value.reshape(1, 1)
    sums = rows.sum(dim=1) if rows.is_floating_point() else None
    if sums is not None and bool(torch.isfinite(sums).all()):
        return
    bad = ~torch.isfinite(rows).all(dim=1)
    if bool(bad.any()):
        rows_bad = bad.nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows_bad[:10])) + (", ..." if len(rows_bad) > 10 else "")
        raise _fail(name, f"holds non-finite values (NaN or inf) in rows [{shown}]",
                    "check the inputs of those rows")


def prediction_type(value: object, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise _fail("prediction_type", f"{value!r} is not one of {list(allowed)}",
                    "use the model's scheduler.config.prediction_type")
    return value  # type: ignore[return-value]
