"""Device helpers for the counter-based noise: Philox4x32-10, uniforms, Box-Muller.

The scheme itself (counter layout, key, uniform, Box-Muller pairing) is
specified in ``reference.py``; these helpers reproduce it on uint32 tensors.
"""
from __future__ import annotations

import triton.language as tl

from .triton_jit import INTERPRETED, jit

PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
PHILOX_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
PHILOX_W1: tl.constexpr = tl.constexpr(0xBB67AE85)
# 2**-24 and 2*pi; the latter rounds to the same float32 as the reference's.
UNIFORM_SCALE: tl.constexpr = tl.constexpr(5.9604644775390625e-08)
TWO_PI: tl.constexpr = tl.constexpr(6.283185307179586)

_libdevice = None
if not INTERPRETED:
    try:
        from triton.language.extra import libdevice as _libdevice
    except Exception:  # pragma: no cover - very old or unusual Triton builds
        _libdevice = None

# Box-Muller needs log/sin/cos that agree with the host's to about an ulp.
# Compiled, the libdevice versions are the accurate ones (the plain tl.* ops
# may lower to hardware approximations); the interpreter does not know
# libdevice but evaluates tl.* with NumPy, which is accurate.
if _libdevice is not None:

    @jit
    def _log(x):
        return _libdevice.log(x)

    @jit
    def _sin(x):
        return _libdevice.sin(x)

    @jit
    def _cos(x):
        return _libdevice.cos(x)

else:

    @jit
    def _log(x):
        return tl.log(x)

    @jit
    def _sin(x):
        return tl.sin(x)

    @jit
    def _cos(x):
        return tl.cos(x)


@jit
def as_uint32(x):
    """Host integers arrive as int32 (two's complement of the uint32 value)."""
    return x.to(tl.uint32, bitcast=True)


@jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 counters ``c*`` with uint32 key ``(k0, k1)``."""
    for _ in tl.static_range(10):
        # umulhi/low product give the 64-bit product of two uint32 values
        # without ever leaving 32-bit registers.
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        # The key bump after the last round is unused; keeping it makes the
        # loop body uniform.
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@jit
def row_quads(quad, k0, k1, draw_id, sample_id):
    """Philox blocks for quad indices ``quad`` (uint32 tensor) of one row.

    ``draw_id`` and ``sample_id`` are the row's int64 ids; ``k0``/``k1`` the
    uint32 key halves.
    """
    d = draw_id.to(tl.uint32)
    s_lo = (sample_id & 0xFFFFFFFF).to(tl.uint32)
    s_hi = (sample_id >> 32).to(tl.uint32)
    zero = tl.full(quad.shape, 0, tl.uint32)
    return philox4x32_10(quad, zero + d, zero + s_lo, zero + s_hi, k0, k1)


@jit
def uniform(x):
    """uint32 -> float32 in (0, 1), exact: the top 24 bits plus one half."""
    return ((x >> 8).to(tl.float32) + 0.5) * UNIFORM_SCALE


@jit
def box_muller(x0, x1):
    """Two normals from two uint32 lanes: radius from ``x0``, angle from ``x1``."""
    radius = tl.sqrt_rn(-2.0 * _log(uniform(x0)))
    theta = uniform(x1) * TWO_PI
    return radius * _cos(theta), radius * _sin(theta)


@jit
def row_normal_quads(quad, k0, k1, draw_id, sample_id):
    """Four float32 normals per quad index (lanes 0..3), one Philox call each."""
    x0, x1, x2, x3 = row_quads(quad, k0, k1, draw_id, sample_id)
    n0, n1 = box_muller(x0, x1)
    n2, n3 = box_muller(x2, x3)
    return n0, n1, n2, n3


@jit
def interleave4(a, b, c, d):
    """[N] x 4 -> [4N] with element 4q + k taken from the k-th argument.

    Lets the kernels load and store contiguous (vectorisable) runs instead
    of four stride-4 streams.
    """
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), [4 * a.shape[0]])
