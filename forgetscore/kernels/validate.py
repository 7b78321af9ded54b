"""Argument checks shared by the public kernel functions.

Every check raises ``ValueError`` naming the argument and saying how to fix it.
Types, shapes and devices are checked before any kernel runs, so that nothing malformed
reaches native code. Checks of values held on a device (id ranges, finiteness) go into a
:class:`Deferred`, which reads them all with one synchronisation: a synchronisation per check
stalled the GPU for far longer than the kernels themselves take. No value can make a kernel
read or write out of bounds, so these may be read after the launch.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SEED = 2 ** 64
MAX_SAMPLE_ID = 2 ** 63
MAX_DRAW_ID = 2 ** 32
MAX_ROW_NUMEL = 4 * 2 ** 32  # a row's Philox blocks are counted in 32 bits, each block giving 4 values


def _fail(name: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"{name}: {problem}; {fix}")


def _fail_now(name: str, problem: str, fix: str) -> None:
    raise _fail(name, problem, fix)


def seed(value: object) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = int(value.item())
    # numpy integers are accepted (and returned as Python ints); bool is not, as True would pass for 1.
    if not is_int(value):
        raise _fail("seed", f"expected an int, got {type(value).__name__}", "pass an integer seed")
    value = int(value)
    if not 0 <= value < MAX_SEED:
        raise _fail("seed", f"{value} is outside [0, 2**64)", "use a non-negative 64-bit seed")
    return value


class Deferred:
    """The value checks of one kernel call, read with one synchronisation per device.

    Each check adds a 0-d bool tensor, computed where its tensor lives without waiting for it,
    and a function that raises the detailed error; :meth:`resolve` reads every flag at once and
    calls the functions of the false ones in the order they were added. With ``enabled=False``
    (a caller's ``check=False``) nothing is computed or read.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._checks: list[tuple[torch.Tensor, Callable[[], None]]] = []

    def add(self, flag: Callable[[], torch.Tensor], explain: Callable[[], None]) -> None:
        if self.enabled:
            value = flag().reshape(())
            if value.device.type != "meta":  # a meta tensor holds no values to check
                self._checks.append((value, explain))

    def resolve(self) -> None:
        by_device: dict[torch.device, list[int]] = {}
        for i, (flag, _) in enumerate(self._checks):
            by_device.setdefault(flag.device, []).append(i)
        ok = [True] * len(self._checks)
        for idx in by_device.values():
            for i, v in zip(idx, torch.stack([self._checks[i][0] for i in idx]).tolist()):
                ok[i] = bool(v)
        checks, self._checks = self._checks, []
        for good, (_, explain) in zip(ok, checks):
            if not good:
                explain()


def _range_flag(value: torch.Tensor, limit: int) -> torch.Tensor:
    ok = value.min() >= 0
    return ok if limit > torch.iinfo(torch.int64).max else ok & (value.max() < limit)


def _check_range(name: str, value: torch.Tensor, limit: int) -> None:
    _check_host_range(name, [int(value.min()), int(value.max())], limit)


def id_vector(name: str, value: object, limit: int, device: torch.device | None, deferred: Deferred,
              length: int | None = None) -> torch.Tensor:
    """A 1-D int64 tensor of ids in [0, limit); an int broadcasts to `length`.

    The range of ids already on a GPU goes into `deferred`; ids on the host (lists, CPU tensors)
    are checked at once, which costs no synchronisation.
    """
    if isinstance(value, (str, bytes, bytearray)):  # Sequences, and bytes even of ints: no ids were meant
        raise _fail(name, f"expected integer ids, got {type(value).__name__} {value[:20]!r}",
                    "pass e.g. torch.tensor([...], dtype=torch.int64)")
    if is_array(value):
        value = _numpy_ids(name, value)
    if isinstance(value, torch.Tensor) and value.dim() == 0 and length is not None:
        value = value.reshape(1).expand(length)  # one id for every row, as a plain int is
    if is_int(value) and length is not None:
        _check_host_range(name, [int(value)], limit)  # before torch.full, which cannot hold every int
        value = torch.full((length,), int(value), dtype=torch.int64)
    elif not isinstance(value, torch.Tensor):
        if not isinstance(value, Sequence) or not all(is_int(v) for v in value):
            raise _fail(name, f"expected a 1-D integer tensor, array or list of ints, got {type(value).__name__}"
                        + (" holding a non-integer" if isinstance(value, Sequence) else ""),
                        "pass e.g. torch.tensor([...], dtype=torch.int64)")
        value = [int(v) for v in value]
        _check_host_range(name, value, limit)  # Python ints of any size: checked before the int64 tensor
        value = torch.tensor(value, dtype=torch.int64)
    elif value.dtype == torch.uint64 and value.device.type == "cpu":
        _check_host_range(name, value.flatten().tolist(), limit)  # as int64, 2**63 and above read negative
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise _fail(name, f"dtype {value.dtype} is not an integer type", "convert with .long()")
    if value.dim() != 1:
        raise _fail(name, f"expected a 1-D tensor, got shape {tuple(value.shape)}", "flatten it to one id per row")
    if length is not None and value.shape[0] != length:
        raise _fail(name, f"has {value.shape[0]} entries but the batch has {length} rows",
                    "give exactly one id per row")
    value = value.to(torch.int64).contiguous()
    if value.numel():
        if value.device.type != "cpu":
            deferred.add(lambda v=value: _range_flag(v, limit), lambda v=value: _check_range(name, v, limit))
        else:
            _check_range(name, value, limit)
    return value.to(device) if device is not None else value


def is_int(value: object) -> bool:
    """A Python or NumPy integer (bool is not: True would pass for 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy's bool_ is no Integral


def is_array(value: object) -> bool:
    """A NumPy array (or another array with `ndim`, `dtype` and `tolist`), not a tensor or a list."""
    return (hasattr(value, "__array__") and not isinstance(value, (torch.Tensor, Sequence))
            and all(hasattr(value, a) for a in ("ndim", "dtype", "tolist")))


def _numpy_ids(name: str, value: object) -> int | list[int]:
    """The ids of a NumPy array as Python ints (a 0-d array as one int); its shape or dtype named if wrong."""
    kind = getattr(value.dtype, "kind", "")  # type: ignore[attr-defined]
    if kind not in ("i", "u"):
        raise _fail(name, f"NumPy array of dtype {value.dtype} is not an integer type",  # type: ignore[attr-defined]
                    "convert with .astype(np.int64)")
    if value.ndim > 1:  # type: ignore[attr-defined]
        raise _fail(name, f"expected a 1-D array, got shape {tuple(value.shape)}",  # type: ignore[attr-defined]
                    "flatten it to one id per row")
    return value.tolist()  # type: ignore[attr-defined]


def count(value: object) -> int | None:
    """A non-negative count given as a Python or NumPy integer, a 0-d integer array or a 0-d integer tensor;
    None for anything else (bool included, as True would pass for 1)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool \
                or value.device.type == "meta":
            return None
        value = value.item()
    elif is_array(value):
        if value.ndim != 0 or getattr(value.dtype, "kind", "") not in ("i", "u"):  # type: ignore[attr-defined]
            return None
        value = value.item()  # type: ignore[attr-defined]
    return int(value) if is_int(value) and value >= 0 else None


def overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of `t` share memory (an expand()ed or as_strided view), so it cannot be updated in
    place: the sorted-strides test settles the usual layouts; only interleaved strides are counted out."""
    dims = sorted((abs(st), n) for n, st in zip(t.shape, t.stride()) if n > 1)
    if t.numel() <= 1:
        return False
    if dims[0][0] == 0:  # expand(): a whole dim on one element
        return True
    reach = 0  # the largest offset of the dims so far
    for st, n in dims:
        if st <= reach:
            break
        reach += st * (n - 1)
    else:
        return False
    offsets = torch.zeros((), dtype=torch.int64)
    for st, n in dims:
        offsets = (offsets[..., None] + torch.arange(n, dtype=torch.int64) * st).flatten()
    return offsets.unique().numel() < offsets.numel()


def _check_host_range(name: str, values: list[int], limit: int) -> None:
    if values and (min(values) < 0 or max(values) >= limit):
        bad = min(values) if min(values) < 0 else max(values)
        raise _fail(name, f"values must lie in [0, {limit}), found {bad}", "use non-negative ids below the limit")


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
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            raise _fail(name, f"is on {dev} but {next(iter(devices))} is on {first}",
                        "move all tensors to one device")
    return first


def timesteps(value: object, alphas_cumprod: torch.Tensor, batch: int, device: torch.device,
              deferred: Deferred) -> torch.Tensor:
    """Timesteps on `device`. Those given on a GPU are clamped, so that the gather of the coefficients
    stays in bounds whether their range check is read later (it then raises for any clamped value)
    or skipped (check=False)."""
    on_device = isinstance(value, torch.Tensor) and value.device.type != "cpu"
    ts = id_vector("timesteps", value, alphas_cumprod.shape[0], None, deferred, length=batch).to(device)
    return ts.clamp(0, alphas_cumprod.shape[0] - 1) if on_device else ts


def _acp_flag(value: torch.Tensor) -> torch.Tensor:
    return (torch.isfinite(value) & (value >= 0) & (value <= 1)).all()


def alphas_cumprod(value: object, deferred: Deferred) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != 1 or value.numel() == 0:
        raise _fail("alphas_cumprod", "expected a non-empty 1-D floating tensor (one value per train timestep)",
                    "pass scheduler.alphas_cumprod")

    deferred.add(lambda: _acp_flag(value),
                 lambda: _fail_now("alphas_cumprod", "values must be finite and lie in [0, 1]",
                                   "pass scheduler.alphas_cumprod"))
    return value


def _row_sums(value: torch.Tensor) -> torch.Tensor:
    if value.dim() < 2:
        return value.reshape(-1)
    return value.flatten(1).sum(dim=1)  # (flatten, not reshape(B, -1): B may be 0)


def finite_rows_later(name: str, value: torch.Tensor, deferred: Deferred) -> None:
    """:func:`finite_rows` through `deferred`: one row-sum reduction now, its flag read later."""
    if value.is_floating_point():
        deferred.add(lambda: torch.isfinite(_row_sums(value)).all(), lambda: finite_rows(name, value))


def finite_rows(name: str, value: torch.Tensor) -> None:
    """Raise naming the rows of a [B, ...] tensor that hold NaN or inf.

    A row sum is non-finite whenever the row holds NaN or inf, and summing is one fast
    reduction with no temporary of the input's size; only when a sum is non-finite
    (which overflow alone can also cause) are the elements looked at.
    """
    rows = value.reshape(value.shape[0], -1) if value.dim() else value.reshape(1, 1)
    sums = _row_sums(value) if rows.is_floating_point() else None
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
